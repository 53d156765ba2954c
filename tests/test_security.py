"""The second probe of the explorer as a hostile visitor (issue 27): each of its fourteen faults, closed.

1-5 (critical): a visitor's Python file or module name must never be imported or run (upload route, Compare's
"more overrides", config reading, run listing). B-N: confinement of overrides, per-visitor caps that count
the client, a per-client limit on pending events, Compare's size caps, option bounds, exports, the score
cache, symbolic links, the secret in /config, and what replies reveal. scripts/security_probe.py replays all
33 attacks of both probes against a live instance.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
sys.path.insert(0, str(REPO / "scripts"))


def planted_plugin(folder: Path) -> tuple[Path, Path]:
    """A .py file that leaves a marker file when it is imported; (the file, the marker)."""
    marker = folder / "IMPORTED"
    plugin = folder / "evil.py"
    plugin.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return plugin, marker


def idle_manager(runs_dir, **kw):
    from hanorec.jobs import JobManager

    m = JobManager(runs_dir, autostart=False, python="/bin/false", **kw)
    m.tick = lambda: None
    return m


# ---- one app over HTTP, in normal mode with an idle queue ---------------------------------------------
@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from load_jobs import serve

    from app.main import build_app, launch_options, make_context

    runs_dir = tmp_path_factory.mktemp("sec-runs")
    ctx = make_context([str(DEMO)], str(runs_dir), "cpu", demo=False)
    ctx.jobs.close()  # the app's own queue (its operator's plug-ins, public messages), never starting a job
    ctx.jobs.tick = lambda: None
    ctx.jobs.max_queued, ctx.jobs.max_per_owner = 16, 1
    demo = build_app(ctx)
    url = serve(demo, launch_options(ctx))
    try:
        yield ctx, url, demo
    finally:
        demo.close()


COMPARE = dict(dataset=str(DEMO), task="hit3", sft_from="train SFT for each seed", methods=["DPO"], seeds="0",
               sft_steps=2, pref_steps=2, beta=0, lr=0, sigma=0.05, catalogue_items=10, eval_examples=5, extra="")


def compare_values(owner="", **changes) -> list:
    values = {**COMPARE, **changes}
    return [*values.values(), owner]


def call(url: str, api: str, data: list) -> str:
    """One raw API call (POST then the event stream): the stream's text."""
    import httpx

    event = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api}/{event}", timeout=60).text


def run_folders(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(runs_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


# ---- 1-5: nothing a visitor sends is imported or executed ----------------------------------------------
def test_1_the_upload_route_is_refused(app_url):
    import httpx

    _, url, _ = app_url
    reply = httpx.post(f"{url}gradio_api/upload", files={"files": ("x.py", b"print('hi')\n")}, timeout=60)
    assert reply.status_code == 403 and "no uploads" in reply.text
    assert "/" not in reply.text.replace("</", "")  # no server path comes back


def test_2_3_a_plugin_named_in_compare_overrides_is_refused_and_never_imported(app_url, tmp_path):
    ctx, url, _ = app_url
    plugin, marker = planted_plugin(tmp_path)
    before = run_folders(ctx.runs_dir)
    for extra in (f"--pref.plugins=[{plugin}]", "--pref.plugins=[this]", f"--pref.options.x=1 --pref.plugins=[{plugin}]"):
        stream = call(url, "compare_launch", compare_values(extra=extra))
        assert "event: error" in stream and "pref.plugins cannot be set here" in stream, stream[:400]
    assert not marker.exists() and run_folders(ctx.runs_dir) == before


def test_3_4_reading_and_listing_a_config_that_names_a_plugin_imports_nothing(tmp_path):
    from hanorec import runs
    from hanorec.config import load_config

    plugin, marker = planted_plugin(tmp_path)
    cfg = load_config(overrides={"pref": {"plugins": [str(plugin)], "method": "dpo"}})
    run = tmp_path / "runs" / "planted"
    run.mkdir(parents=True)
    cfg.output_dir = str(run)
    cfg.save(run / runs.CONFIG_FILE)
    runs.write_status(run, "finished")
    runs.read_config(run)
    assert [i.name for i in runs.list_runs(tmp_path / "runs")] == ["planted"]
    runs.run_info(run)
    assert not marker.exists()


def test_3_the_apps_job_manager_records_only_the_operators_plugins(tmp_path):
    from hanorec.jobs import JobError

    plugin, marker = planted_plugin(tmp_path)
    m = idle_manager(tmp_path / "runs", plugins=[])
    quick = {"data": {"path": str(DEMO)}, "model": {"name": "tiny-llava"}}
    with pytest.raises(JobError, match="pref.plugins cannot be set by a request"):
        m.submit({**quick, "pref": {"plugins": [str(plugin)]}}, name="x")
    job = m.submit(quick, name="y")
    assert "plugins: []" in (tmp_path / "runs" / job / "config.yaml").read_text()
    assert not marker.exists()


def test_5_an_installed_module_named_in_a_config_is_not_imported_when_read(tmp_path, monkeypatch):
    from hanorec.config import load_config

    (tmp_path / "probe_module_27.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_config(overrides={"pref": {"plugins": ["probe_module_27"]}})
    assert "probe_module_27" not in sys.modules and not (tmp_path / "RAN").exists()


def test_the_operators_plugin_folder_is_imported_by_the_app_and_recorded_in_its_jobs(tmp_path):
    from app.main import make_context
    from hanorec import methods

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "hinge27.py").write_text(
        "import torch\nfrom hanorec import methods\nfrom hanorec.methods import Method, LossOutput\n"
        "from hanorec.methods.knobs import BETA\n"
        "def loss(b, pref, beta, state):\n    h = (b.policy_chosen - b.ref_chosen) - (b.policy_rejected[:, 0] - b.ref_rejected[:, 0])\n"
        "    return LossOutput(torch.relu(1 - beta * h), h.detach(), h.detach(), torch.full_like(h, beta))\n"
        "methods.register(Method(name='hinge27', label='Hinge 27 (test)', paper='test', equation='max(0, 1 - beta h)',"
        " loss_fn=loss, knobs=(BETA,), variant={'noise_target': 'none'}, beyond_paper=True))\n"
    )
    try:
        ctx = make_context([str(DEMO)], str(tmp_path / "runs"), "cpu", plugins=str(folder))
        ctx.jobs.close()
        assert "Hinge 27 (test)" in methods.variants()
        ctx.jobs.tick = lambda: None
        job = ctx.jobs.submit({"data": {"path": str(DEMO)}, "model": {"name": "tiny-llava"}}, stage="Hinge 27 (test)",
                              name="h27")  # fmt: skip
        assert f"- {folder}" in (tmp_path / "runs" / job / "config.yaml").read_text()
    finally:
        methods.unregister("hinge27")


# ---- B: the free-text override field is an allow-list ---------------------------------------------------
@pytest.mark.parametrize(
    "word, key",
    [
        ("--data.path=/etc", "data.path"),
        ("--data.image_dir=/etc", "data.image_dir"),
        ("--pref.sft_run=/tmp", "pref.sft_run"),
        ("--model.name=/usr", "model.name"),
        ("--model.trust_remote_code=true", "model.trust_remote_code"),
        ("--threads=1024", "threads"),
        ("--sft.max_steps=100000000", "sft.max_steps"),
        ("--output_dir=/tmp/x", "output_dir"),
    ],
)
def test_b_overrides_outside_the_allow_list_are_refused_naming_the_key(word, key):
    from hanorec.jobs import JobError, checked_overrides

    with pytest.raises(JobError) as info:
        checked_overrides(f"--pref.options.epsilon=0.2 {word}")
    assert str(info.value).startswith(f"{key} cannot be set here")


def test_b_allowed_overrides_are_typed_and_bounded():
    from hanorec.jobs import JobError, checked_overrides

    over = checked_overrides("--pref.options.epsilon=0.2 --pref.max_steps=40 --eval.catalogue_items=50", max_steps=60)
    assert over == {"pref": {"options": {"epsilon": "0.2"}, "max_steps": "40"}, "eval": {"catalogue_items": "50"}}
    for word, words in (("--pref.max_steps=61", "out of range"), ("--pref.beta=nan", "not a finite number"),
                        ("--pref.options.gamma=1e308", "out of range"), ("--pref.batch_size=1.5", "not a whole number"),
                        ("pref.beta=1", "must look like")):  # fmt: skip
        with pytest.raises(JobError, match=words):
            checked_overrides(word, max_steps=60)


def test_b_an_outside_dataset_through_compare_is_refused_over_http(app_url):
    ctx, url, _ = app_url
    before = run_folders(ctx.runs_dir)
    stream = call(url, "compare_launch", compare_values(extra="--data.path=/etc"))
    assert "data.path cannot be set here" in stream
    stream = call(url, "compare_launch", compare_values(dataset="/etc"))
    assert "event: error" in stream and ("outside the allowed folders" in stream or "not in the list of choices" in stream)
    assert str(DEMO) not in stream  # the dropdown's own sentence names its choices without their server path
    assert run_folders(ctx.runs_dir) == before


# ---- C: per-visitor caps count the client, not its token -------------------------------------------------
def test_c_fresh_tokens_from_one_client_share_its_cap(tmp_path):
    from hanorec.jobs import CLIENT, JobError

    m = idle_manager(tmp_path, max_queued=16, max_per_owner=2)
    quick = {"data": {"path": str(DEMO)}, "model": {"name": "tiny-llava"}}
    token = CLIENT.set("address:10.0.0.1")
    try:
        m.submit(quick, name="a1", owner="t" * 24)
        m.submit(quick, name="a2", owner="u" * 24)
        with pytest.raises(JobError, match=r"this visitor \(address or login\) already has 2 jobs"):
            m.submit(quick, name="a3", owner="v" * 24)
    finally:
        CLIENT.reset(token)
    m.submit(quick, name="b1", owner="w" * 24, client="address:10.0.0.2")  # another visitor is not affected
    assert run_folders(tmp_path) == ["a1", "a2", "b1"]


def test_c_over_http_a_fresh_token_per_launch_does_not_lift_the_cap(app_url):
    ctx, url, _ = app_url
    for name in list(ctx.jobs.queue()):
        ctx.jobs.stop(name)
    first = call(url, "compare_launch", compare_values(owner="a" * 24))
    assert "event: complete" in first, first[:300]
    second = call(url, "compare_launch", compare_values(owner="b" * 24))
    assert "already has 1 jobs waiting or running" in second, second[:300]
    for name in list(ctx.jobs.queue()):
        ctx.jobs.stop(name)


# ---- D: a per-client limit on pending events ------------------------------------------------------------
def test_d_one_client_cannot_fill_the_event_queue(tmp_path):
    import gradio as gr
    import httpx
    from load_jobs import serve

    from app.main import guard

    with gr.Blocks() as demo:
        box = gr.Number()
        gr.Button().click(lambda x: time.sleep(1.0) or x, box, box, api_name="slow", concurrency_limit=1)
    demo.queue(max_size=64)
    ctx = types.SimpleNamespace(data_dirs=[DEMO], runs_dir=tmp_path, trust_proxy=False)
    guard(demo, ctx, pending_per_client=3)
    url = serve(demo, {})
    try:
        results: list = []

        def one():
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{url}gradio_api/call/slow", json={"data": [1]})
                if r.status_code != 200:
                    results.append(("refused", r.text))
                    return
                stream = c.get(f"{url}gradio_api/call/slow/{r.json()['event_id']}").text
                results.append(("ok" if "event: complete" in stream else "refused", stream))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "refused"]
        assert len(results) == 8 and 1 <= len(ok) <= 5 and refused, [r[0] for r in results]
        assert any("per visitor" in r[1] for r in refused), refused[0][1][:300]
    finally:
        demo.close()


# ---- E, H: Compare's sizes and numbers ------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(seeds=",".join(map(str, range(1000)))), "at most 10 seeds"),
        (dict(seeds=",".join(map(str, range(100_000)))), "at most 10 seeds"),
        (dict(seeds="-1"), "'-1' is not one"),
        (dict(seeds=str(2**64)), "is not one"),
        (dict(seeds="0,1,2,3,4,5,6", methods=["DPO", "S-DPO", "IPO", "cDPO", "rDPO", "SimPO", "beta-DPO", "HaNo-DPO"]),
         "trains at most 60"),
        (dict(sft_steps=100_000_000), "out of range"),
        (dict(pref_steps=float("nan")), "not a finite number"),
        (dict(beta="abc"), "not a number"),
    ],
)
def test_e_h_compare_sizes_and_numbers_are_capped_with_one_sentence(changes, words):
    from hanorec.jobs import JobError, comparison_request

    kw = {k: v for k, v in {**COMPARE, **changes}.items() if k not in ("sft_from",)}
    with pytest.raises(JobError) as info:
        comparison_request(**kw)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_h_compare_number_fields_over_http_give_one_sentence(app_url):
    ctx, url, _ = app_url
    before = run_folders(ctx.runs_dir)
    for changes, words in ((dict(sft_steps="NaN"), "SFT max steps: nan is not a finite number"),
                           (dict(pref_steps="many"), "preference max steps: 'many' is not a number"),
                           (dict(sft_steps=10**9), "above the maximum"),
                           (dict(seeds="-1"), "is not one"), (dict(seeds=",".join(map(str, range(100_000)))), "at most 10")):  # fmt: skip
        stream = call(url, "compare_launch", compare_values(**changes))
        assert "event: error" in stream and words in stream, (changes, stream[:300])
        assert "Traceback" not in stream
    assert run_folders(ctx.runs_dir) == before


# ---- I: method options are bounded ---------------------------------------------------------------------
def test_i_method_options_have_an_upper_bound():
    from hanorec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"pref.options.gamma = '?1e\+?308'? is out of range"):
        load_config(overrides=["--pref.method=simpo", "--pref.options.gamma=1e308", "--pref.noise_target=none"])
    assert load_config(overrides=["--pref.method=simpo", "--pref.options.gamma=2"]).pref.options["gamma"] == 2.0


# ---- G, J: exports ------------------------------------------------------------------------------------
def test_g_j_exports_are_reused_never_collide_and_cannot_be_captured(tmp_path, monkeypatch):
    from hanorec import export
    from hanorec.jobs import JobError
    from hanorec.train.checkpoint import STATE_FILE

    runs_dir = tmp_path / "runs"
    run = runs_dir / "r1"

    def checkpoint(step: int) -> None:
        folder = run / "hano_dpo" / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text("{}")

    checkpoint(4)
    made = []

    def fake_export(run_dir, stage, out, merge=False, command=None):  # the writing itself is tested in test_export
        time.sleep(0.2)
        made.append(out.name)
        out.mkdir(parents=True)
        (out / "model.bin").write_bytes(b"0" * 1000)
        return out

    monkeypatch.setattr(export, "_check_stage", lambda run, stage: None)
    monkeypatch.setattr(export, "export_stage", fake_export)
    root = export.exports_dir(runs_dir)
    results, errors = [], []

    def ask():
        try:
            results.append(export.export_for_download(run, "hano_dpo", root))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 1 and len({str(r[1]) for r in results}) == 1  # one export, reused
    assert results[0][0].name == "r1-hano_dpo-step-4"
    for i in range(10):  # a newer checkpoint is a new export; at most MAX_EXPORTS folders are kept
        checkpoint(10 + i)
        export.export_for_download(run, "hano_dpo", root)
    assert len(made) == 11
    kept = [p for p in root.iterdir() if p.is_dir()]
    assert len(kept) == export.MAX_EXPORTS
    assert root.name == ".exports"
    m = idle_manager(runs_dir)
    with pytest.raises(JobError, match="may use letters"):
        m.submit({"data": {"path": str(DEMO)}}, name=".exports")


# ---- K: the score cache bounds a file before loading it ------------------------------------------------
def test_k_a_planted_score_file_is_bounded_before_it_is_loaded(tmp_path):
    import hashlib

    import numpy as np

    from hanorec.serving import DiskStore

    store = DiskStore(tmp_path)
    key = hashlib.sha256(b"k").hexdigest()
    store.save(key, {"scores": np.arange(6.0).reshape(2, 3)})
    assert store.load(key)["scores"].shape == (2, 3)
    path = tmp_path / f"{key}.npz"
    np.savez_compressed(path, scores=np.zeros((16_000, 16_000), np.float32))  # ~1 GB unpacked, ~1 MB on disk
    assert path.stat().st_size < 2 << 20  # a small file, as the probe planted
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert store.load(key) is None and not path.exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was unpacked
    np.savez(path, scores=np.zeros((2, 2, 2, 2, 2), np.float32))  # too many dimensions
    assert store.load(key) is None
    path.write_bytes(b"0" * ((4 << 20) + 1))  # DiskStore.MAX_FILE_BYTES + 1
    assert store.load(key) is None


# ---- L: symbolic links in typed folders ---------------------------------------------------------------
def test_l_a_link_loop_is_one_sentence_and_a_swapped_folder_is_checked_again(tmp_path):
    import gradio as gr

    from app.common import AppContext
    from hanorec.paths import PathError, confine

    data = tmp_path / "data"
    data.mkdir()
    (data / "loop").symlink_to(data / "loop")
    with pytest.raises(PathError, match="loop of symbolic links"):
        confine("loop", [data])
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "ds").mkdir()
    ctx = AppContext(data_dirs=[data], runs_dir=tmp_path / "runs")
    assert ctx.resolve_path("ds") == (data / "ds").resolve()
    (data / "ds").rmdir()
    (data / "ds").symlink_to(outside)  # swapped within the 10 s memory
    with pytest.raises(gr.Error, match="leads outside"):
        ctx.resolve_path("ds")
    with pytest.raises(gr.Error, match="loop of symbolic links"):
        ctx.resolve_path("loop")


# ---- M: no secret in /config ----------------------------------------------------------------------------
def test_m_config_holds_no_server_secret(app_url):
    import httpx

    ctx, url, _ = app_url
    config = httpx.get(f"{url}config", timeout=60).text
    secret_file = Path(ctx.runs_dir) / ".app-secret"
    assert not secret_file.exists() or secret_file.read_text().strip() not in config
    from app.common import OWNER_STORAGE_CODE  # a fixed public name, the same in every app

    states = [c for c in json.loads(config)["components"] if c.get("type") == "browserstate"]
    assert states and all(c["props"].get("secret") == OWNER_STORAGE_CODE for c in states)


# ---- N: no absolute path and no traceback in a reply ---------------------------------------------------
def test_n_job_logs_and_errors_carry_no_server_path_or_traceback(app_url):
    from hanorec import runs
    from hanorec.jobs import JOB_FILE

    ctx, url, _ = app_url
    run = Path(ctx.runs_dir) / "failed-n"
    run.mkdir()
    (run / JOB_FILE).write_text(json.dumps({"stage": "SFT", "commands": ["run"], "owner": None}))
    (run / "job.log").write_text(
        f"$ python -m hanorec run --config={run}/config.yaml\nTraceback (most recent call last):\n"
        f'  File "{REPO}/hanorec/cli.py", line 1, in main\n    boom()\nRuntimeError: boom in {run}/x.bin\n'
    )
    runs.write_status(run, "failed", message=f"failed reading {run}/config.yaml")
    from gradio_client import Client

    client = Client(url, verbose=False)
    client.predict(api_name="/train_runs")  # the page's refresh: the job picker learns the job
    reply = json.dumps(client.predict("failed-n", api_name="/train_poll"), default=str)
    assert "boom" in reply
    for secret in (str(ctx.runs_dir), str(REPO), "Traceback", 'File \\"'):
        assert secret not in reply, secret
    stream = call(url, "compare_launch", compare_values(sft_from="no-such-run"))
    assert "event: error" in stream and str(ctx.runs_dir) not in stream and str(DEMO) not in stream


def test_n_public_names_stand_for_paths_inside_the_roots_and_stay_confined(tmp_path):
    import gradio as gr

    from app.common import AppContext

    taken, first, second = tmp_path / "a" / "runs", tmp_path / "b" / "data", tmp_path / "c" / "data"
    for folder in (taken, first / "ds", second / "ds", tmp_path / "runs" / "r1" / "sft", tmp_path / "outside"):
        folder.mkdir(parents=True)
    ctx = AppContext(data_dirs=[taken, first, second, first], runs_dir=tmp_path / "runs")
    assert [a for a, _ in ctx.roots()] == ["runs", "runs-2", "data", "data-2"]  # each folder once, names unique
    assert ctx.public_path(second / "ds") == "data-2/ds" and ctx.public_path(tmp_path / "runs") == "runs"
    assert ctx.resolve_path("data-2/ds") == (second / "ds").resolve()
    assert ctx.resolve_path(str(second / "ds")) == (second / "ds").resolve()  # a typed absolute path still works
    assert ctx.public_value(f"{tmp_path / 'runs' / 'r1'}::sft") == "runs/r1::sft"
    assert ctx.public_path(tmp_path / "outside") == ".../outside"  # never the absolute path, even outside
    (tmp_path / "runs" / "escape").symlink_to(tmp_path / "outside")
    (tmp_path / "runs" / "loop").symlink_to(tmp_path / "runs" / "loop")
    for name, words in (("data/../data-2", "'..'"), ("runs/escape", "leads outside"), ("runs/loop", "loop"),
                        ("runs/%2e%2e", "URL-encoded"), ("data-2/ds\x00", "NUL")):  # fmt: skip
        with pytest.raises(gr.Error, match=words) as refused:
            ctx.resolve_path(name)
        assert str(tmp_path) not in str(refused.value), refused.value  # the folders by their public names
    assert ctx.public_value(str(tmp_path / "outside")) == str(tmp_path / "outside")  # left for the picker to refuse


def server_folders(ctx) -> list[str]:
    """The absolute folders of the server a reply must not name: data, runs, shipped runs, repo, temp."""
    import os

    from app.common import images_dir

    folders = [*map(str, ctx.data_dirs), str(ctx.runs_dir), str(REPO), str(images_dir())]
    folders += [str(d) for d in ctx._demo_dirs()] + [os.environ.get("GRADIO_TEMP_DIR") or str(images_dir())]
    return sorted(set(folders), key=len, reverse=True)


def without_files(value):
    """A reply without Gradio's file payloads (FileData: its path and /gradio_api/file= URL name the served
    file by its path, which Gradio needs to serve it); everything else as it is."""
    if isinstance(value, dict):
        if "url" in value and "path" in value or (value.get("meta") or {}).get("_type") == "gradio.FileData":
            return None
        return {k: without_files(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_files(v) for v in value]
    return value


def reply_text(stream: str) -> str:
    """The JSON of an API call's answer (its event stream's data lines), without file payloads."""
    data = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:") and line[5:].strip()]
    assert data and "event: complete" in stream, stream[:500]
    return json.dumps(without_files(data))


def test_n_menus_and_replies_name_no_server_folder(app_url):
    """The page's /config and the pickers' replies name datasets, models, runs and comparisons by public
    names (AppContext.public_path), and a picked name still opens the same dataset and model."""
    import httpx

    ctx, url, _ = app_url
    comparison = Path(ctx.runs_dir) / "cmp-n"
    comparison.mkdir(exist_ok=True)
    (comparison / "comparison.json").write_text("{}")
    config = httpx.get(f"{url}config", timeout=60).text
    dropdowns = [c["props"] for c in json.loads(config)["components"] if c.get("type") == "dropdown"]
    values = {p["label"]: p.get("value") for p in dropdowns}
    dataset, model = values["Dataset"], values["Score candidates with"]
    replies = {
        "/config": config,
        "dataset open": reply_text(call(url, "data_open_typed", [dataset, "hit3"])),
        "model list": reply_text(call(url, "data_models", [])),
        "run list": reply_text(call(url, "train_runs", [])),
        "compare list": reply_text(call(url, "compare_refresh", [])),
    }
    user = json.loads(replies["dataset open"])[-1][1]["value"]
    replies["user view"] = reply_text(call(url, "data_user", [dataset, "hit3", user, model]))
    for what, text in replies.items():
        for folder in server_folders(ctx):
            assert folder not in text, (what, folder)
    assert ctx.resolve_path(dataset) == DEMO.resolve()  # the picked name opens the same dataset
    assert model.startswith("demo_runs/") and ctx.resolve_path(model.rpartition("::")[0]).is_relative_to(REPO)
    assert '"cmp-n"' not in replies["compare list"] and "runs/cmp-n" in replies["compare list"]
    view = json.loads(replies["user view"])[-1]
    assert view[0] and view[1]["data"] and all(row[3] is not None for row in view[1]["data"])  # scored by the model


# ---- safe defaults: a plain `docker run` is demo mode; every interface needs a login --------------------
def test_the_image_starts_demo_mode_and_the_app_refuses_every_interface_without_a_login(tmp_path, monkeypatch, capsys):
    from app import main as app_main

    dockerfile = (REPO / "Dockerfile").read_text()
    assert "GRADIO_SERVER_NAME=0.0.0.0" in dockerfile and "HANOREC_DEMO=1" in dockerfile
    for var in ("HANOREC_AUTH", "HANOREC_DEMO", "SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setattr(app_main, "build_app", lambda ctx: pytest.fail("the app was built"))
    with pytest.raises(SystemExit) as info:
        app_main.main(["--runs", str(tmp_path / "runs"), "--no-demo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "serves every network interface" in err and "HANOREC_AUTH" in err and err.count("\n") == 1


def test_help_prints_the_caps_and_the_cli_takes_an_operators_plugin_folder(tmp_path, capsys):
    from app.main import parse_args
    from hanorec.cli import _split_args, main

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("at most 10 seeds, 10 methods, 60 models trained in all, 2000 steps per model",
                  "16 per visitor (--pending-per-client)", "pref.options.NAME", "--plugins DIR"):  # fmt: skip
        assert words in text, words
    assert _split_args(["--plugins=/x/plugins"])[1] == ["--pref.plugins=[/x/plugins]"]
    plugin, marker = planted_plugin(tmp_path)
    assert main(["config", "--plugins", str(tmp_path), "--pref.method=not_yet_registered"]) == 0  # read only
    assert "not_yet_registered" in capsys.readouterr().out and not marker.exists()
