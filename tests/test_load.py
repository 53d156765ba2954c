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


def test_strangers_cannot_stop_each_others_jobs_and_the_caps_hold_under_load(tmp_path):
    """6 sessions launch, are refused a second job, are refused stopping another's job and stop their own,
    while 2 sessions browse and score, for a bounded time (scripts/load_app.py --job-sessions)."""
    from load_app import JOB_CAP, report, run

    out = run(sessions=2, seconds=20, max_requests=20, runs_dir=str(tmp_path), job_sessions=6)
    print(report(out))
    assert out["hung_sessions"] == 0 and not out["errors"], out["errors"][:5]
    assert not out["violations"], out["violations"][:5]
    assert out["checks"] >= 12 and 1 <= out["max_queued"] <= JOB_CAP and out["ownership_refusals"] >= 1
    assert {"train_launch", "train_stop", "data_user", "noise_draw"} <= set(out["latency"])
