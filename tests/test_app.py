"""The explorer app: launched in-process on a free port and driven through gradio_client on the demo data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_ctx(tmp_path_factory):
    from app.main import make_context

    runs = tmp_path_factory.mktemp("runs")
    return make_context([str(DEMO)], str(runs), "cpu")


@pytest.fixture(scope="module")
def client(app_ctx):
    from gradio_client import Client

    from app.main import build_app

    demo = build_app(app_ctx)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def test_help_runs_from_a_fresh_clone_without_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "app" / "main.py"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for option in ("--data", "--runs", "--device", "GRADIO_SERVER_PORT"):
        assert option in out.stdout


def test_missing_data_folder_is_one_sentence(tmp_path):
    from app.main import make_context

    with pytest.raises(SystemExit, match="does not exist"):
        make_context([str(tmp_path / "nothere")], str(tmp_path / "runs"))


def test_resolve_path_confines_to_allowed_folders(app_ctx, tmp_path):
    assert app_ctx.resolve_path(str(DEMO)) == DEMO.resolve()
    for bad in ("../../etc", "/etc/passwd", "%2e%2e%2fetc", str(tmp_path)):
        with pytest.raises(gradio.Error):
            app_ctx.resolve_path(bad)


def _file(path_or_dict) -> Path:
    return Path(path_or_dict["image"]["path"] if isinstance(path_or_dict, dict) else path_or_dict)


def test_data_tab(client):
    users, summary, table, *figs = client.predict(str(DEMO), "hit3", api_name="/data_open")
    assert users["value"] and "240 users have a test prompt" in summary
    stats = dict(zip(table["headers"], zip(*table["data"])))
    assert "users" in stats["statistic"] and "240" in stats["value"]
    assert all(f is not None for f in figs)
    user = users["value"]
    history, cands, cand_images, prompt, answer, seen, seen_images = client.predict(
        str(DEMO), "hit3", user, "base", api_name="/data_user"
    )
    assert len(history) >= 6 and any("in prompt" in h["caption"] for h in history)
    rows = cands["data"]
    assert len(rows) == 7 and sum(r[3] == "✓" for r in rows) == 3  # hit3: 3 true among 7 candidates
    assert sorted(r[6] for r in rows) == list(range(1, 8))
    assert prompt.count("<image>") == 3 and answer.count("\n") == 2
    assert "<|image_pad|>" in seen and seen.count("<|image_pad|>") > 3  # placeholders expanded
    assert len(seen_images) == 3 and len(cand_images) == 7


@pytest.mark.parametrize("task, n_candidates", [("hit1", 2), ("next1", 20)])
def test_data_tab_other_tasks(client, task, n_candidates):
    users, *_ = client.predict(str(DEMO), task, api_name="/data_open")
    out = client.predict(str(DEMO), task, users["value"], "base", api_name="/data_user")
    assert len(out[1]["data"]) == n_candidates
    assert "<image>" in out[3]


def test_data_tab_errors_are_one_sentence(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="outside the allowed folders"):
        client.predict("/etc", "hit3", api_name="/data_open_typed")
    with pytest.raises(AppError, match="'..'"):
        client.predict("../secret", "hit3", api_name="/data_open_typed")
