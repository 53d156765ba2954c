"""GPU calls the visitor pays for, checked with a double of the ZeroGPU `spaces` package written from its
source (tests/zerogpu_double/spaces): every spaces.GPU call is made from a Gradio event handler that carries
the visitor's request (and so its X-IP-Token), with a duration from a callable within the tier's cap; CUDA is
never touched when the Space's app is imported; the job's GPU seconds are estimated and refused, in one
sentence with the figure, when over the visitor's tier."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hanorec import spaces

REPO = Path(__file__).resolve().parents[1]
DOUBLE = REPO / "tests" / "zerogpu_double"


@pytest.fixture
def double(monkeypatch):
    """The double on sys.path as `spaces`, the ZeroGPU flag on, a fresh record of calls."""
    monkeypatch.syspath_prepend(str(DOUBLE))
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    monkeypatch.setenv(spaces.ZERO_GPU_ENV, "true")
    monkeypatch.setattr(spaces, "_DECORATED", {})
    import spaces as double_spaces

    double_spaces.CALLS.clear()
    return double_spaces


def test_the_old_way_a_job_thread_calling_the_gpu_is_refused(double):
    """What the app did before: spaces.GPU called from a job thread, which has no Gradio request, so the real
    client would charge the Space's IP quota (the double refuses)."""
    errors = []

    def job():
        try:
            spaces.gpu_call(lambda: 1, 30)()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=job, name="hanorec-job-x")
    t.start()
    t.join()
    assert errors and "no request" in errors[0]
    assert double.CALLS[0]["request"] is False


def times_ten(i):  # a GPU call's function crosses to ZeroGPU's worker by name: module level, picklable
    return i * 10


def _serve_app(bridge_job, bridge):
    """A Gradio app whose one event is the handler that serves the bridge (as app/space.py's panel does)."""
    import gradio as gr

    def handler():  # no request argument: spaces.GPU reads the handler's context itself
        done = threading.Event()
        threading.Thread(target=lambda: (bridge_job(), done.set()), name="hanorec-job-t").start()
        lines = []
        for line in bridge.serve(finished=done.is_set, poll_s=0.05):
            lines.append(line)
            yield "\n".join(lines)

    with gr.Blocks(analytics_enabled=False) as demo:
        out = gr.Textbox()
        gr.Button("go").click(handler, None, out, api_name="go")
    demo.queue()
    sys.path.insert(0, str(REPO / "scripts"))
    from load_jobs import serve

    return demo, serve(demo, {})


def test_gpu_calls_run_in_the_visitors_handler_with_its_token_and_a_sized_duration(double, monkeypatch):
    """A job thread submits three GPU calls (two training chunks and the evaluation) through the bridge; the
    visitor's handler, reached over HTTP with an X-IP-Token header, makes every call: the double sees the
    request and the token in each, a generator function, in a handler thread (not the job's), each duration
    given by the job's size (the callable) and within the unauthenticated tier's whole day."""
    from gradio_client import Client

    monkeypatch.setattr(double, "MAX_DURATION_S", spaces.TIER_DAILY_S["unauthenticated"])
    bridge = spaces.GpuBridge(wait_s=60)
    plan = spaces.plan_job(6, seconds_per_step=0.5, setup_s=20, eval_s=20)
    bridge.call_s = plan.call_s
    results = []

    def job():
        for i in range(2):
            results.append(bridge.submit(times_ten, (i,), duration_s=60, label=f"training, call {i + 1}"))
        results.append(bridge.submit(str, ("evaluated",), duration_s=60, label="evaluation"))

    demo, url = _serve_app(job, bridge)
    try:
        text = Client(url, verbose=False, headers={"X-IP-Token": "visitor-token"}).predict(api_name="/go")
    finally:
        demo.close()
    assert results == [0, 10, "evaluated"]
    assert text.splitlines() == [f"GPU call {i} ({plan.call_s} s): {label}" for i, label in
                                 enumerate(["training, call 1", "training, call 2", "evaluation"], 1)]  # fmt: skip
    assert len(double.CALLS) == 3
    for call in double.CALLS:
        assert call["request"] and call["token"] == "visitor-token", call
        assert call["generator"] and call["name"] == "_gpu_task"
        assert call["thread"] != "hanorec-job-t"
        assert call["duration"] == plan.call_s <= spaces.TIER_DAILY_S["unauthenticated"]


def test_a_duration_over_the_cap_is_refused_by_the_double_and_reported_to_the_job(double, monkeypatch):
    monkeypatch.setattr(double, "MAX_DURATION_S", 30)
    bridge = spaces.GpuBridge(wait_s=5)
    from gradio.context import LocalContext

    class Req:
        headers = {"x-ip-token": "t"}

    errors = []

    def job():
        try:
            bridge.submit(times_ten, (1,), duration_s=60)
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=job)
    t.start()
    LocalContext.request.set(Req())  # this test's thread plays the handler
    list(bridge.serve(finished=lambda: not t.is_alive(), poll_s=0.05))
    t.join()
    assert errors and "larger than the maximum allowed" in errors[0]


def test_a_closure_cannot_cross_to_the_gpu_worker(double):
    """The real package pickles a call's arguments to its worker process: the double does too, so the closures
    the app once handed to spaces.GPU fail here as they would on a Space."""
    from gradio.context import LocalContext

    class Req:
        headers = {"x-ip-token": "t"}

    LocalContext.request.set(Req())
    task = spaces.gpu_generator()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        list(task(lambda: 1, (), {}, 10))
    assert list(task(times_ten, (4,), {}, 10)) == [("started", None), ("result", 40)]


def test_a_call_no_page_takes_times_out_for_the_job():
    bridge = spaces.GpuBridge(decorated=spaces._gpu_task, wait_s=0.2)
    with pytest.raises(TimeoutError, match="no page took the GPU call"):
        bridge.submit(lambda: 1, duration_s=10, label="evaluation")
    assert list(bridge.serve(finished=lambda: True, poll_s=0.01)) == []  # the abandoned call is not run


@pytest.mark.slow  # a fresh interpreter importing torch and gradio: 10 to 35 s on a loaded 2-core machine
def test_importing_the_space_app_touches_no_cuda_and_decorates_at_module_scope(tmp_path):
    """The Space's app file imported with ZeroGPU on and every CUDA entry point of torch booby-trapped: the
    import (and building the page) calls none of them, and the GPU function is decorated during the import."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        "touched = []\n"
        "def trap(name):\n"
        "    def f(*a, **k):\n"
        "        touched.append(name)\n"
        "        raise RuntimeError('CUDA touched: ' + name)\n"
        "    return f\n"
        "for name in ('init', '_lazy_init', 'is_available', 'device_count', 'current_device', 'set_device',\n"
        "             'synchronize', 'get_device_name', 'mem_get_info'):\n"
        "    setattr(torch.cuda, name, trap(name))\n"
        "import app.space as S\n"
        "import spaces\n"
        "assert spaces.DECORATED == ['_gpu_task'], spaces.DECORATED\n"
        "assert touched == [], touched\n"
        "print('ok', S.GPU_TASK.__name__)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{DOUBLE}:{REPO}", "SPACES_ZERO_GPU": "true",
           "HOME": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    r = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok _gpu_task", r.stdout + r.stderr


# ---- the estimate before queuing, and the visitor's ledger --------------------------------------------------
PLAN = {"seconds_per_step": 0.5, "setup_s": 20.0, "eval_s": 20.0, "call_cap_s": 60}


def test_plan_sizes_calls_to_the_job():
    small = spaces.plan_job(6, **PLAN)
    assert small.calls == (40, 40) and small.steps_per_call == 6  # the evaluation call's 20 + 20 s sizes both
    big = spaces.plan_job(200, **PLAN)
    assert big.steps_per_call == 80 and big.calls == (60,) * 4 and big.seconds == 240
    assert spaces.plan_job(200, trainings=2, **PLAN).calls == (60,) * 7  # SFT then HaNo-DPO, then evaluation
    with pytest.raises(ValueError, match="do not fit in a GPU call of 60 s"):
        spaces.plan_job(5, seconds_per_step=50, setup_s=20)
    with pytest.raises(ValueError, match="positive number"):
        spaces.plan_job(5, seconds_per_step=float("nan"))


def test_refusal_names_the_figure_and_offers_a_size_that_fits():
    plan = spaces.plan_job(200, **PLAN)
    msg = spaces.quota_refusal(plan, "unauthenticated", **PLAN)
    assert msg == ("This job needs about 240 GPU seconds (4 calls) but your unauthenticated ZeroGPU quota has "
                   "120 s left today (log in with Hugging Face for more); 80 steps would fit.")  # fmt: skip
    assert spaces.plan_job(80, **PLAN).seconds <= 120 < spaces.plan_job(81, **PLAN).seconds
    assert spaces.quota_refusal(plan, "free", **PLAN) is None  # 300 s
    assert "nothing fits" in spaces.quota_refusal(plan, "free", used_s=290, **PLAN)
    assert spaces.tier_of(None) == "unauthenticated" and spaces.tier_of("ana") == "free"
    assert spaces.tier_of("ana", "pro") == "pro" and spaces.tier_of("ana", "emperor") == "free"


def test_ledger_counts_a_rolling_day_and_survives_a_restart(tmp_path):
    now = [1000.0]
    ledger = spaces.GpuLedger(tmp_path / "ledger.json", clock=lambda: now[0])
    ledger.add("hf:ana", 40)
    ledger.add("hf:ana", 23)
    assert spaces.GpuLedger(tmp_path / "ledger.json", clock=lambda: now[0]).used("hf:ana") == 63
    assert ledger.used("hf:bo") == 0
    now[0] += 24 * 3600
    assert ledger.used("hf:ana") == 0
    (tmp_path / "ledger.json").write_text('{"hf:ana": {"start": "x", "used": -5}}')  # damaged: counts nothing
    assert ledger.used("hf:ana") == 0


class _Manager:
    """The JobManager contract train_on_gpu uses; its job makes two GPU calls through the bridge."""

    def __init__(self):
        self.bridges, self.state, self.submitted = {}, {}, []

    def bridge_for(self, job):
        return self.bridges.setdefault(job, spaces.GpuBridge(decorated=spaces._gpu_task, wait_s=10))

    def submit(self, overrides, *, stage, name, sft_run, owner):
        self.submitted.append((stage, name, owner))
        self.state[name] = "running"

        def run():
            self.bridges[name].submit(lambda: None, duration_s=60, label="training, call 1")
            self.bridges[name].submit(lambda: None, duration_s=60, label="evaluation")
            self.state[name] = "finished"

        threading.Thread(target=run).start()
        return name

    def status(self, job):
        return type("S", (), {"state": self.state[job], "message": ""})()


def test_train_on_gpu_refuses_before_queuing_and_charges_the_visitor(tmp_path):
    manager, ledger = _Manager(), spaces.GpuLedger(tmp_path / "l.json")
    lines = list(spaces.train_on_gpu(manager, {}, stage="SFT", steps=200, visitor="ip:1.2.3.4",
                                     tier="unauthenticated", ledger=ledger, plan_kw=PLAN))  # fmt: skip
    assert len(lines) == 1 and "needs about 240 GPU seconds" in lines[0] and not manager.submitted
    start = time.monotonic()
    lines = list(spaces.train_on_gpu(manager, {}, stage="SFT", steps=6, visitor="hf:ana", tier="free",
                                     ledger=ledger, plan_kw=PLAN))  # fmt: skip
    assert time.monotonic() - start < 10
    job = manager.submitted[0][1]
    assert manager.submitted == [("SFT", job, "hf:ana")]
    assert lines == [f"{job}: queued; about 80 GPU seconds in 2 calls of 40 s", "GPU call 1 (40 s): training, call 1",
                     "GPU call 2 (40 s): evaluation", f"{job}: finished"]  # fmt: skip
    assert ledger.used("hf:ana") == 80 and ledger.used("ip:1.2.3.4") == 0


def test_state_root_says_whether_it_survives_a_restart(tmp_path, monkeypatch):
    monkeypatch.delenv(spaces.STATE_ENV, raising=False)
    runs, persistent, sentence = spaces.state_root(tmp_path / "runs")
    assert (
        runs == (tmp_path / "runs").resolve()
        and not persistent
        and "lost when the Space restarts" in sentence
    )
    monkeypatch.setenv(spaces.STATE_ENV, "relative/dir")
    with pytest.raises(ValueError, match="must be an absolute path"):
        spaces.state_root()
    monkeypatch.setenv(spaces.STATE_ENV, str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="not a folder"):
        spaces.state_root()
    monkeypatch.setenv(spaces.STATE_ENV, str(tmp_path))
    runs, persistent, sentence = spaces.state_root()
    assert runs == tmp_path.resolve() / "runs" and runs.is_dir()
    monkeypatch.setattr(spaces.os.path, "ismount", lambda p: Path(p) == tmp_path.resolve())
    runs, persistent, sentence = spaces.state_root()
    assert persistent and "survives a restart" in sentence


def test_the_space_app_builds_on_its_state_root_with_the_zerogpu_tab(double, tmp_path, monkeypatch):
    """app/space.py on ZeroGPU (the double): state under HANOREC_STATE_DIR, said on the page; jobs hand their
    GPU calls to the visitor's handler; the ZeroGPU tab is there; the visitor is keyed on the login name."""
    monkeypatch.setenv(spaces.STATE_ENV, str(tmp_path))
    monkeypatch.delitem(sys.modules, "app.space", raising=False)
    import app.space as S

    ctx, ledger, sentence, persistent = S.make_space_context(warm=0, log=lambda *a: None)
    try:
        assert ctx.runs_dir == tmp_path.resolve() / "runs" and ledger.path.parent == ctx.runs_dir
        assert ctx.jobs.in_process and ctx.jobs.handler_gpu and ctx.demo
        demo = S.build_space(ctx, ledger, sentence)
        config = demo.get_config_file()
        texts = [c.get("props", {}).get("value") for c in config["components"]]
        assert sentence in texts and any(
            c.get("props", {}).get("label") == "ZeroGPU" for c in config["components"]
        )
    finally:
        ctx.jobs.close()
    profile = type("P", (), {"username": "ana"})()
    request = type("R", (), {"client": type("C", (), {"host": "10.0.0.7"})()})()
    assert S.visitor_of(profile, request) == ("hf:ana", "free")
    assert S.visitor_of(None, request) == ("ip:10.0.0.7", "unauthenticated")
    request.headers = {"x-forwarded-for": "198.51.100.1, 203.0.113.9"}  # a forged entry, then the proxy's
    assert S.visitor_of(None, request) == ("ip:203.0.113.9", "unauthenticated")
    monkeypatch.setenv(S.WARM_ENV, "many")
    with pytest.raises(ValueError, match="HANOREC_WARM must be a whole number"):
        S.warm_users()


def test_a_job_without_a_handler_to_serve_it_is_refused_on_zerogpu(tmp_path):
    """With handler_gpu, a job launched elsewhere than the ZeroGPU tab (the Train tab, a notebook) would wait
    for a handler that never comes: it is refused in one sentence instead."""
    from hanorec.jobs import JobError, JobManager

    manager = JobManager(tmp_path / "runs", autostart=False, in_process=True, handler_gpu=True)
    with pytest.raises(JobError, match="trains from the ZeroGPU tab"):
        manager.submit({}, name="from-train-tab")
    assert not (tmp_path / "runs" / "from-train-tab").exists()


@pytest.mark.slow  # a real tiny SFT job (4 steps, 2 evaluation prompts): about 20 to 60 s on a 2-core machine
def test_a_real_job_trains_through_the_visitors_handler(double, tmp_path, monkeypatch):
    """The ZeroGPU tab's action with the real JobManager and a tiny SFT job: every GPU call (two training
    chunks, then the evaluation) is made by this thread, which plays the event handler with the visitor's
    request, each at the planned duration; the job finishes with its results and the ledger holds the calls."""
    from gradio.context import LocalContext

    from app.tabs.train import form_overrides
    from hanorec import runs
    from hanorec.jobs import JobManager

    monkeypatch.setattr(double, "MAX_DURATION_S", 60)
    plan_kw = {"seconds_per_step": 20.0, "setup_s": 20.0, "eval_s": 20.0, "call_cap_s": 60}  # 2 steps a call
    manager = JobManager(tmp_path / "runs", poll_s=0.2, in_process=True, handler_gpu=True, chunk_steps=2)
    ledger = spaces.GpuLedger(tmp_path / "runs" / ".gpu-ledger.json")
    demo = REPO / "assets" / "demo"
    over = form_overrides(str(demo), "tiny-llava", "SFT", "hit3", max_steps=4, eval_examples=2)

    class Req:
        headers = {"x-ip-token": "ana-token"}

    LocalContext.request.set(Req())
    try:
        lines = list(spaces.train_on_gpu(manager, over, stage="SFT", steps=4, visitor="hf:ana", tier="pro",
                                         ledger=ledger, plan_kw=plan_kw))  # fmt: skip
    finally:
        manager.close()
    job = lines[0].split(":")[0]
    assert lines[-1] == f"{job}: finished", lines
    assert [c["duration"] for c in double.CALLS] == [60, 60, 60] and all(
        c["token"] == "ana-token" for c in double.CALLS
    )
    assert all(c["thread"] == threading.current_thread().name for c in double.CALLS)
    assert runs.read_results(tmp_path / "runs" / job)["rows"] and ledger.used("hf:ana") == 180


@pytest.mark.slow  # the Space's page served, then a real tiny SFT job (4 steps): about 15 to 60 s on 2 cores
def test_the_space_pages_zerogpu_tab_trains_with_the_visitors_token(double, tmp_path, monkeypatch):
    """app/space.py's ZeroGPU tab through HTTP (gradio_client with an X-IP-Token header, as the Hub's proxy
    sends it): a job over the unauthenticated tier is refused in one sentence with the figure before anything
    is queued; a 4-step job trains in two calls (training, evaluation) made with the visitor's token."""
    from gradio_client import Client

    monkeypatch.setattr(double, "MAX_DURATION_S", spaces.TIER_DAILY_S["unauthenticated"])
    monkeypatch.setenv(spaces.STATE_ENV, str(tmp_path))
    monkeypatch.delitem(sys.modules, "app.space", raising=False)
    import app.space as S

    sys.path.insert(0, str(REPO / "scripts"))
    from load_jobs import serve

    ctx, ledger, sentence, _ = S.make_space_context(warm=0, log=lambda *a: None)
    demo = S.build_space(ctx, ledger, sentence)
    url = serve(demo, S.M.launch_options(ctx))
    try:
        client = Client(url, verbose=False, headers={"X-IP-Token": "visitor-token"})
        refused = client.predict("SFT", 200, api_name="/train_on_zerogpu")
        assert refused.startswith("This job needs about 240 GPU seconds") and "80 steps would fit" in refused
        assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("gpu-")]
        text = client.predict("SFT", 4, api_name="/train_on_zerogpu")
    finally:
        demo.close()
        ctx.jobs.close()
    lines = text.splitlines()
    assert lines[0].endswith("queued; about 80 GPU seconds in 2 calls of 40 s") and lines[-1].endswith(
        ": finished"
    )
    assert [(c["duration"], c["token"]) for c in double.CALLS] == [(40, "visitor-token")] * 2
    assert ledger.used("ip:127.0.0.1") == 80
