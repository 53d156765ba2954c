"""The app under load: 20 concurrent gradio_client sessions browse users and score candidates (clean and
under noise) for a bounded time with no error and no hung session (scripts/load_app.py; latency
percentiles are printed, not asserted: speed lives in benchmarks, not in tests)."""

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_twenty_sessions_browse_and_score_without_error(tmp_path):
    from load_app import report, run

    out = run(sessions=20, seconds=45, max_requests=40, runs_dir=str(tmp_path))
    print(report(out))
    assert out["hung_sessions"] == 0
    assert not out["errors"], out["errors"][:5]
    assert set(out["latency"]) == {"data_user", "noise_draw"}
    assert out["requests"] >= 20 * 2  # every session got through at least one user switch and one noise draw
