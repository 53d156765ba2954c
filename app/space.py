"""The Hugging Face Space's app file (`app_file: app/space.py` in the front matter that
`python -m hanorec space` writes; docs/space.md). It is app/main.py's explorer with what a Space needs:

- state under one root: HANOREC_STATE_DIR (a mounted storage bucket) holds the runs, the score cache and the
  owner secret; the page and the log say at start whether that root survives a restart;
- the warm score cache built at start-up (HANOREC_WARM users, default WARM_USERS; the Docker image builds it
  at build time, a Gradio-SDK Space has no build step of ours);
- login with Hugging Face (hf_oauth: gr.LoginButton) when the Space has it; jobs launched from the ZeroGPU
  panel belong to the login name;
- on ZeroGPU, a panel that trains a tiny preset with every GPU call made by the visitor's own event handler
  (hanorec.spaces.train_on_gpu), after checking the job's GPU seconds against the visitor's quota.

Nothing here touches CUDA at import: `spaces` is imported (on ZeroGPU only) and the GPU function decorated at
module scope, as ZeroGPU expects; torch is imported when the first model loads.
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import main as M  # noqa: E402 - sets the offline environment first
from hanorec import spaces as zg  # noqa: E402
from hanorec.errors import UserError  # noqa: E402

# spaces.GPU-decorated at module scope on ZeroGPU (the function itself elsewhere)
GPU_TASK = zg.gpu_generator()
import gradio as gr  # noqa: E402 - after app.main has set the environment Gradio reads

WARM_ENV = "HANOREC_WARM"
# users warmed at start-up: `python app/main.py --warm 20` took 4 to 5 minutes on a 2-core sandbox
# (docs/space.md), well inside the 1 h startup_duration_timeout of the front matter
WARM_USERS = 20
SPACE_STEPS_MAX = 200  # the panel's slider; the quota check refuses what does not fit anyway


def warm_users() -> int:
    raw = os.environ.get(WARM_ENV, "").strip()
    if not raw:
        return WARM_USERS
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(
            f"{WARM_ENV} must be a whole number of users (0: no warm cache), got {raw!r}."
        ) from None
    if n < 0:
        raise ValueError(f"{WARM_ENV} must be 0 or more, got {n}.")
    return n


def oauth_available() -> bool:
    """A login button only where the Space has OAuth (hf_oauth sets OAUTH_CLIENT_ID) and its libraries."""
    import importlib.util

    return bool(os.environ.get("OAUTH_CLIENT_ID")) and all(
        importlib.util.find_spec(m) is not None for m in ("authlib", "itsdangerous")
    )


def make_space_context(warm: int | None = None, log=print):
    """The app's context on the persistent root, the ZeroGPU job manager where it applies, the warm cache."""
    from hanorec.jobs import JobManager

    runs, persistent, sentence = zg.state_root(ROOT / "runs")
    log(sentence)
    ctx = M.make_context(runs_dir=runs, device="cpu", demo=True, trust_proxy=M.trust_proxy(None))
    if zg.on_zero_gpu():
        ctx.jobs.close()
        per_call = zg.plan_job(10**6, **zg.SPACE_PLAN).steps_per_call
        ctx.jobs = JobManager(runs, in_process=True, handler_gpu=True, chunk_steps=per_call,
                              max_queued=M.MAX_QUEUED[True], max_per_owner=M.MAX_PER_SESSION[True])  # fmt: skip
    users = warm_users() if warm is None else warm
    if users:
        start = time.monotonic()
        M.warm(ctx, users, log=log)
        log(f"warm cache: {users} users in {time.monotonic() - start:.0f} s")
    ledger = zg.GpuLedger(runs / ".gpu-ledger.json")
    return ctx, ledger, sentence, persistent


def visitor_of(profile, request) -> tuple[str, str]:
    """(the key a job and the quota ledger use, the tier). A login name when logged in with Hugging Face;
    otherwise the client's address (the identity the rest of the app gives a visitor who is not logged in)."""
    name = getattr(profile, "username", None)
    if isinstance(name, str) and name.strip():
        return f"hf:{name.strip()}", zg.tier_of(name)
    # behind the Hub's proxy every client is the proxy: the visitor is the X-Forwarded-For entry that proxy wrote,
    # the last one (app.common.client_id, the rule the job caps and the event queue use too: a client's own,
    # forgeable entries come before it)
    from app.common import client_id

    client = getattr(request, "client", None)
    key = client_id(getattr(client, "host", None), getattr(request, "headers", None) or {}, None, trust_proxy=True)
    return f"ip:{key.split(':', 1)[1]}", zg.tier_of(None)


def gpu_panel(ctx, ledger) -> None:
    """The ZeroGPU training panel (inside the Blocks)."""
    from app.tabs.train import form_overrides

    gr.Markdown(
        "Train a tiny preset on ZeroGPU. Every GPU call runs from this page's own request, so it counts "
        "against **your** daily ZeroGPU quota (2 min without login, 5 min with a free account); the job's GPU "
        "seconds are estimated first and a job that does not fit is refused with the figure."
    )
    with gr.Row():
        stage = gr.Dropdown(["SFT", "HaNo-DPO"], value="SFT", label="Stage")
        steps = gr.Slider(1, SPACE_STEPS_MAX, value=30, step=1, label="Training steps")
    go = gr.Button("Train on ZeroGPU", variant="primary")
    out = gr.Textbox(label="GPU calls", lines=8)

    def steps_of(stage_name, n_steps, request, profile):
        visitor, tier = visitor_of(profile, request)
        if stage_name not in ("SFT", "HaNo-DPO"):
            yield f"Stage must be SFT or HaNo-DPO, not {str(stage_name)[:40]!r}."
            return
        try:
            n = int(n_steps)
        except (TypeError, ValueError, OverflowError):
            n = 0
        if not 1 <= n <= SPACE_STEPS_MAX:
            yield f"Training steps must be a whole number from 1 to {SPACE_STEPS_MAX}, got {str(n_steps)[:40]}."
            return
        # a refused job (JobError, ConfigError) is one sentence on the page
        try:
            over = form_overrides(str(M.DEFAULT_DATA), "tiny-llava", stage_name, M.WARM_TASK, max_steps=n)
            yield from zg.train_on_gpu(ctx.jobs, over, stage=stage_name, steps=n, visitor=visitor, tier=tier,
                                       ledger=ledger, sft_run=None)  # fmt: skip
        except (UserError, ValueError) as e:
            yield str(e)

    # a login parameter only where the Space has OAuth: Gradio attaches its OAuth routes (and needs authlib)
    # for any handler that asks for a profile
    if oauth_available():

        def run(stage_name, n_steps, request: gr.Request, profile: gr.OAuthProfile | None):
            lines = []
            for line in steps_of(stage_name, n_steps, request, profile):
                lines.append(line)
                yield "\n".join(lines)
    else:

        def run(stage_name, n_steps, request: gr.Request):
            lines = []
            for line in steps_of(stage_name, n_steps, request, None):
                lines.append(line)
                yield "\n".join(lines)

    go.click(run, [stage, steps], out, concurrency_limit=4, api_name="train_on_zerogpu")


def build_space(ctx, ledger, sentence: str):
    demo = M.build_app(ctx)
    with demo:
        with gr.Row():
            if oauth_available():
                gr.LoginButton()
            gr.Markdown(sentence)
        if zg.on_zero_gpu():
            with gr.Tab("ZeroGPU", id="zerogpu"):
                gpu_panel(ctx, ledger)
    return demo


def main() -> None:
    try:
        M.auth_from_env()
        ctx, ledger, sentence, _ = make_space_context()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    demo = build_space(ctx, ledger, sentence)
    options = M.launch_options(ctx)
    if oauth_available():
        options["auth"] = None  # the Hub's login replaces the password login (kept for self-hosting)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"), **options)


if __name__ == "__main__":
    main()
