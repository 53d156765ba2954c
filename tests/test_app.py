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
    ctx = make_context([str(DEMO)], str(runs), "cpu")
    yield ctx
    if ctx.jobs is not None:
        ctx.jobs.close()


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

    with pytest.raises(ValueError, match="does not exist"):
        make_context([str(tmp_path / "nothere")], str(tmp_path / "runs"))
    out = subprocess.run(
        [sys.executable, str(ROOT / "app" / "main.py"), "--data", str(tmp_path / "nothere")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


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
    assert len(history) >= 6 and sum("◆" in h["caption"] for h in history) == 3
    assert sum("★" in h["caption"] for h in history) == 3
    rows = cands["data"]
    assert len(rows) == 7 and sum(r[2] == "✓" for r in rows) == 3  # hit3: 3 true among 7 candidates
    assert sorted(r[5] for r in rows) == list(range(1, 8))
    assert prompt.count("<image>") == 3 and answer.count("\n") == 2
    assert "<|image_pad|>" in seen and seen.count("<|image_pad|>") > 3  # placeholders expanded
    assert len(seen_images) == 3 and len(cand_images) == 7


def test_a_repeated_user_view_is_the_same_and_comes_from_the_cache(client, app_ctx):
    """A classroom asks for the same users again: the second view of a user is served whole from the result
    cache (no new entry, one more hit) and is the same view."""
    user = "u017"  # not viewed by another test of this module
    first = client.predict(str(DEMO), "hit3", user, "base", api_name="/data_user")
    entries, hits = len(app_ctx.results), app_ctx.results.hits
    again = client.predict(str(DEMO), "hit3", user, "base", api_name="/data_user")
    assert len(app_ctx.results) == entries and app_ctx.results.hits > hits
    assert again[1:5] == first[1:5]
    def path(item) -> Path:
        image = item["image"]
        return Path(image["path"] if isinstance(image, dict) else image)

    assert [path(h) for h in again[0]] == [path(h) for h in first[0]]


def test_the_static_folder_check_is_memoised_for_files_inside_only(tmp_path):
    """Gradio's check that a returned file lies in a static folder is remembered for files inside one (it
    resolved every path on every request); a file outside is asked again, and one that appears later is found."""
    from gradio import utils
    from gradio.data_classes import FileData

    from app.main import memoize_static_check

    memoize_static_check()
    assert getattr(utils.is_static_file, "memoized", False)
    memoize_static_check()  # once only
    image = next(p for p in (DEMO / "images").iterdir() if p.is_file())
    before = list(gradio.data_classes._StaticFiles.all_paths)
    gradio.set_static_paths([str(DEMO), str(tmp_path)])
    try:
        assert utils.is_static_file(str(image)) and utils.is_static_file(FileData(path=str(image)))
        later = tmp_path / "later.png"
        assert not utils.is_static_file(str(later))  # not there yet
        later.write_bytes(b"x")
        assert utils.is_static_file(str(later))
        assert not utils.is_static_file(str(ROOT / "README.md")) and not utils.is_static_file(None)
    finally:
        gradio.data_classes._StaticFiles.all_paths = before


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen3-vl", "tiny-gemma3", "tiny-smolvlm"])
def test_data_tab_what_each_family_sees(client, app_ctx, preset):
    """Every family's untrained preset is a choice of the Data tab (and a backbone of the Train tab); what the
    model sees shows its own chat text with each image's tokens expanded."""
    from app.tabs.train import PRESETS, backbone_name
    from hanorec.backbones import for_preset

    assert preset in PRESETS and backbone_name(app_ctx, preset) == preset
    assert f"base:{preset}" in [v for _, v in app_ctx.model_choices()]
    users, *_ = client.predict(str(DEMO), "hit3", api_name="/data_open")
    out = client.predict(str(DEMO), "hit3", users["value"], f"base:{preset}", api_name="/data_user")
    cands, seen, seen_images = out[1], out[5], out[6]
    token = for_preset(preset).image_token
    assert seen.count(token) == 3 * 16  # 3 history images, 16 visual tokens each
    assert len(seen_images) == 3 and len(cands["data"]) == 7


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


def _first_user(client, task="hit3"):
    users, *_ = client.predict(str(DEMO), task, api_name="/data_open")
    return users["value"]


def test_noise_lab_moves_scores_and_sigma_zero_is_clean(client):
    user = _first_user(client)
    text0, fig0, table0 = client.predict(str(DEMO), "hit3", user, "base", "lora", 0.0, 20, 0, api_name="/noise_draw")
    assert "Top-1 changed in **0%**" in text0 and "rms(A)" in text0
    shifts0 = [row[table0["headers"].index("shift_std")] for row in table0["data"]]
    assert max(abs(s) for s in shifts0) == 0.0  # sigma 0: every draw is the clean score
    text, fig, table = client.predict(str(DEMO), "hit3", user, "base", "lora", 0.05, 20, 0, api_name="/noise_draw")
    shifts = [row[table["headers"].index("shift_std")] for row in table["data"]]
    assert min(shifts) > 0 and fig != fig0
    assert len(table["data"]) == 7
    text_l, _, _ = client.predict(str(DEMO), "hit3", user, "base", "logits", 0.5, 20, 0, api_name="/noise_draw")
    assert "logits" in text_l


def test_a_repeated_noise_draw_is_served_whole_from_the_cache(client, app_ctx):
    """The same draw asked again (another student, the lab's defaults) is the cached answer: no new entry,
    the same text, figure and table; another seed is a new answer."""
    user = "u021"  # not drawn by another test of this module
    args = (str(DEMO), "hit3", user, "base", "lora", 0.02, 12, 0)
    first = client.predict(*args, api_name="/noise_draw")
    entries, hits = len(app_ctx.results), app_ctx.results.hits
    again = client.predict(*args, api_name="/noise_draw")
    assert len(app_ctx.results) == entries and app_ctx.results.hits == hits + 1
    assert again == first
    other = client.predict(*args[:-1], 1, api_name="/noise_draw")
    assert other[1] != first[1] and len(app_ctx.results) > entries


def test_missing_optional_modules_fail_to_import_at_once():
    """Gradio tries ``import matplotlib`` around every event and ``import bokeh`` for every new session; a
    module that is not installed is marked missing once, so the import fails without searching sys.path
    again; installed modules are left alone."""
    import importlib

    from app.main import remember_missing_imports

    name = "hanorec_no_such_module_for_this_test"
    try:
        assert remember_missing_imports((name, "json")) == [name]
        with pytest.raises(ImportError):
            importlib.import_module(name)
        assert importlib.import_module("json").dumps([1]) == "[1]"
        assert remember_missing_imports((name,)) == []  # already marked
    finally:
        sys.modules.pop(name, None)


@pytest.mark.slow
def test_warm_precomputes_the_first_users_and_a_second_run_reads_them(tmp_path, capsys):
    """python app/main.py --warm N: the first N users' scores (candidates, default draws on LoRA and logits)
    for the default model and the base are computed into <runs>/.cache/scores; run again, all are read."""
    from app.main import main

    main(["--data", str(DEMO), "--runs", str(tmp_path), "--warm", "2"])
    first = capsys.readouterr().out
    assert first.count("2 users, 0 results already stored, 6 computed") == 2, first  # two models
    assert len(list((tmp_path / ".cache" / "scores").glob("*.npz"))) == 12
    main(["--data", str(DEMO), "--runs", str(tmp_path), "--warm", "2"])
    again = capsys.readouterr().out
    assert again.count("6 results already stored, 0 computed") == 2, again
    with pytest.raises(SystemExit):
        main(["--data", str(DEMO), "--runs", str(tmp_path), "--warm", "0"])
    assert "at least 1" in capsys.readouterr().err


def test_noise_sweep_kl_grows_with_sigma(client):
    user = _first_user(client)
    fig, table = client.predict(str(DEMO), "hit3", user, "base", "logits", 25, 0, 0.02, api_name="/noise_sweep")
    cols = table["headers"]
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert rows[0]["sigma"] == 0 and rows[0]["kl_mean"] == 0
    assert rows[-1]["kl_mean"] > rows[1]["kl_mean"] > 0


def test_noise_lab_bad_user_is_one_sentence(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="has no test prompt"):
        client.predict(str(DEMO), "hit3", "nobody", "base", "lora", 0.01, 5, 0, api_name="/noise_draw")


def test_hardness_tab_on_the_untrained_model(client):
    text, fig, table, users = client.predict(str(DEMO), "hit3", "base", 10, 1.0, "random", 0, api_name="/hardness_compute")
    assert "training pairs" in text and "lambda: min" in text and "beyond the paper" not in text
    cols = table["headers"]
    lam = [r[cols.index("lambda")] for r in table["data"]]
    assert len(lam) > 100 and min(lam) < 1 < max(lam)
    text_t, _, table_t, _ = client.predict(str(DEMO), "hit3", "base", 10, 0.05, "random", 0, api_name="/hardness_compute")
    lam_t = [r[cols.index("lambda")] for r in table_t["data"]]
    assert "beyond the paper" in text_t and max(lam_t) - min(lam_t) > max(lam) - min(lam)  # sharper profiles widen it
    pair_text, aligned, profiles, images = client.predict(
        str(DEMO), "hit3", "base", 10, 1.0, "embedding", 0, users["value"], api_name="/hardness_pair"
    )
    assert "lambda =" in pair_text and len(aligned["data"]) == 3 and len(images) == 6
    grid = client.predict(str(DEMO), "hit3", "base", "random", 0, api_name="/hardness_grid")
    assert len(grid["data"]) == 16


def test_hardness_tab_numbers_are_pair_details(client, app_ctx):
    """What the tab shows for a pair (D, lambda, beta, each aligned distance) and for every pair (lambda) are
    hanorec.hardness's pair_detail and pairs_table on a separately built item index of the same model."""
    from hanorec.explore import training_pairs
    from hanorec.hardness import ItemIndex, pair_detail, pairs_table

    text, _, table, users = client.predict(str(DEMO), "hit3", "base", 10, 1.0, "embedding", 0, api_name="/hardness_compute")
    user = users["value"]
    pair_text, aligned, _, _ = client.predict(
        str(DEMO), "hit3", "base", 10, 1.0, "embedding", 0, user, api_name="/hardness_pair"
    )
    cfg, data = app_ctx.config(str(DEMO), "hit3"), app_ctx.prepared(str(DEMO), "hit3")
    index = ItemIndex.from_model(app_ctx.model("base", str(DEMO), "hit3")[0], data.dataset)
    pairs = training_pairs(cfg, data, index.ids, index.embeddings, sampling="embedding", seed=0)
    pt = pairs_table(pairs, index, beta0=cfg.pref.beta, k=10, temperature=1.0)
    n = next(i for i, p in enumerate(pairs) if p.example.user == user)
    detail = pair_detail(pairs[n], index, mean_distance=pt.attrs["mean_distance"], beta0=cfg.pref.beta, k=10)
    assert f"Pair {n} of user {user}: D = {detail.distance:.5f}" in pair_text
    assert f"**lambda = {detail.lam:.5f}**" in pair_text and f"**beta = {detail.beta:.5f}**" in pair_text
    cols = aligned["headers"]
    assert [r[cols.index("positive")] for r in aligned["data"]] == detail.items["positive"].tolist()
    assert [r[cols.index("negative")] for r in aligned["data"]] == detail.items["negative"].tolist()
    shown = [r[cols.index("distance")] for r in aligned["data"]]
    assert shown == pytest.approx(detail.items["distance"].tolist(), abs=5e-6)  # shown to 5 decimals
    cols = table["headers"]
    assert [r[cols.index("lambda")] for r in table["data"]] == pytest.approx(pt["lambda"].tolist(), abs=5e-7)
    assert [r[cols.index("D")] for r in table["data"]] == pytest.approx(pt["distance"].tolist(), abs=5e-7)
    assert f"{len(pt)} training pairs" in text


def test_hardness_per_pair_view_needs_a_preference_stage(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="preference stage"):
        client.predict(str(DEMO), "hit3", "base", api_name="/hardness_stats")


@pytest.mark.slow
def test_train_tab_through_gradio_client(client):
    """Launch a tiny SFT run through the Train tab's API, follow it to the end by polling, then list and
    compare it: the same calls the page makes."""
    import time

    from hanorec import methods

    # the form's fields (app.tabs.train.FORM_FIELDS), then every registered method's own knobs at their defaults
    option_defaults = [k.default for m in methods.all_methods() for k in methods.option_knobs(m)]
    job_update, status, owner = client.predict(
        str(DEMO), "tiny-llava", "SFT", "hit3", "train SFT first, in this run", 0.1, 0.05, "lora", 3, "random",
        1, 0, 2, 2, "none (metrics.jsonl only)", 0, "via-client", [], 10, 1.0, *option_defaults, "",  # "": no owner yet
        api_name="/train_launch",
    )  # fmt: skip
    job = job_update["value"]
    assert job == "via-client" and "via-client" in status and len(owner) >= 16  # the new owner token
    end, text = time.time() + 300, ""
    while time.time() < end:
        text, *_ = client.predict(job, api_name="/train_poll")
        if "finished" in text or "failed" in text:
            break
        time.sleep(1)
    assert "finished" in text, text
    table, chosen, *_ = client.predict(api_name="/train_runs")
    assert "via-client" in [row[0] for row in table["data"]]
    cmp_table, fig = client.predict(["via-client::sft"], "loss", api_name="/train_compare")
    assert cmp_table["data"] and cmp_table["data"][0][0] == "via-client"


def test_made_images_are_files_named_by_content_in_a_static_folder():
    """What the model sees (and placeholders) are written once as PNG files named by their content, in a
    folder the app serves statically, so a cached view hands Gradio paths instead of pictures to encode."""
    from PIL import Image

    from app.common import image_file, images_dir

    a = Image.new("RGB", (8, 8), (10, 20, 30))
    first, again = image_file(a), image_file(a.copy())
    assert first == again and Path(first).parent == images_dir()
    assert image_file(Image.new("RGB", (8, 8), (10, 20, 31))) != first
    with Image.open(first) as back:
        assert back.size == (8, 8) and back.getpixel((0, 0)) == (10, 20, 30)


def test_resolved_paths_are_remembered_only_while_they_exist(app_ctx, tmp_path):
    """resolve_path remembers an existing confined path for a few seconds; a path removed since is not
    served from memory, and a refusal is asked again every time."""
    import gradio

    folder = app_ctx.runs_dir / "remembered-then-removed"
    folder.mkdir()
    assert app_ctx.resolve_path(str(folder)) == folder.resolve()
    assert app_ctx.resolve_path(str(folder)) == folder.resolve()  # from memory
    folder.rmdir()
    with pytest.raises(gradio.Error):
        app_ctx.resolve_path(str(folder))
    for _ in range(2):
        with pytest.raises(gradio.Error):
            app_ctx.resolve_path(str(tmp_path))  # outside the allowed folders, every time


def test_hardness_tab_marks_the_planted_false_negatives(client, app_ctx):
    """The app makes the teaching scenarios at start and offers them; on the false-negatives one the Hardness
    tab marks the rejected items of the true item's own colour and genre and says whether lambda finds them."""
    scenario = next(v for _, v in app_ctx.dataset_choices() if v.endswith("demo-false-negatives-30"))
    text, fig, table, _ = client.predict(scenario, "hit3", "base", 10, 1.0, "random", 0, api_name="/hardness_compute")
    assert "False negatives (planted at 0.3)" in text
    cols = table["headers"]
    marked = [r[cols.index("false negatives")] for r in table["data"]]
    assert 0.2 < sum(bool(m) for m in marked) / len(marked) < 0.9
    plain, _, plain_table, _ = client.predict(str(DEMO), "hit3", "base", 10, 1.0, "random", 0, api_name="/hardness_compute")
    assert "not planted here" in plain
    assert sum(bool(r[-1]) for r in plain_table["data"]) < sum(bool(m) for m in marked) / 2
