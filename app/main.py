"""HaNoRec Studio explorer: `python app/main.py` (see app/README.md).

Runs from a fresh clone without installing the package: the repository root goes on sys.path first.
Offline: nothing is fetched from a model hub; the bundled demo data is the default data folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# background runs are CLI subprocesses: they find the package the same way, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    # Gradio rebuilds its monitoring summary (a DataFrame of up to 10,000 past events) after every event by
    # default; under a classroom's load that was a tenth of the server's CPU. Every 500 events is enough.
    "GRADIO_ANALYTICS_CACHE_FREQUENCY": "500",
}.items():
    os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

# Public-demo settings (docs/space.md): demo mode, login, and the limits a shared server needs.
DEMO_ENV = "HANOREC_DEMO"  # 1: demo mode (a Hugging Face Space sets SPACE_ID, which turns it on too; 0: off)
AUTH_ENV = "HANOREC_AUTH"  # "user:password" (several: comma-separated): the page asks for a login
TRUST_PROXY_ENV = "HANOREC_TRUST_PROXY"  # 1: count visitors by the last X-Forwarded-For entry (a trusted proxy)
MAX_FILE_SIZE = "2mb"  # uploads: none is taken (the upload route is refused, see refuse_uploads); kept as a bound
QUEUE_SIZE = 64  # requests waiting in Gradio's queue; more are refused at once with "queue is full"
PENDING_PER_CLIENT = 16  # requests one visitor (address or login) may have waiting or running in that queue
MAX_QUEUED = {False: 16, True: 4}  # training jobs waiting in total (demo mode: True)
MAX_PER_SESSION = {False: 4, True: 1}  # jobs waiting or running per visitor (address, or login name)
EVERY_INTERFACE = ("0.0.0.0", "::", "")  # a host that binds every interface: a login or demo mode is required

DEFAULT_DATA = ROOT / "assets" / "demo"
TABS = ("data", "train", "hardness", "noise", "compare")
TAB_TITLES = {"data": "Data", "train": "Train", "hardness": "Hardness", "noise": "Noise lab", "compare": "Compare"}
INTRO = (
    "# HaNoRec Studio\n"
    "Multimodal-LLM sequential recommendation with SFT and **HaNo-DPO** (DPO with hardness-aware beta, HaRS, "
    "and Gaussian noise on the policy, NoDO; arXiv 2511.18740). "
    "**Data**: a user's history and the task's prompt. **Train**: launch and watch small runs. "
    "**Hardness**: the negatives' lambda and beta. **Noise lab**: how noise moves the candidates' scores. "
    "**Compare**: paired comparisons of preference methods over seeds, with the difference each could detect."
)


def limits_text() -> str:
    """What a visitor may ask for, printed by --help (the same numbers the app enforces)."""
    from hanorec.jobs import COMPARE_LIMITS, OVERRIDE_NUMBERS

    numbers = ", ".join(f"{k} [{lo:g}, {hi:d}]" if whole else f"{k} [{lo:g}, {hi:g}]"
                        for k, (lo, hi, whole) in OVERRIDE_NUMBERS.items())  # fmt: skip
    return (
        "limits per visitor (a visitor is a client address, or a login name when HANOREC_AUTH is set):\n"
        f"  training jobs waiting or running: {MAX_PER_SESSION[False]} per visitor, {MAX_QUEUED[False]} waiting "
        f"in all (demo mode: {MAX_PER_SESSION[True]} and {MAX_QUEUED[True]})\n"
        f"  requests waiting or running in the event queue: {PENDING_PER_CLIENT} per visitor (--pending-per-client), "
        f"{QUEUE_SIZE} in all\n"
        f"  Compare: {COMPARE_LIMITS[False].describe()}; demo mode: launches refused (and the caps would be "
        f"{COMPARE_LIMITS[True].describe()})\n"
        "  Compare's \"more overrides\" field takes only pref.options.NAME (|value| <= 1e4) and these numbers: "
        f"{numbers}; and the switch eval.image_ablation (true or false)\n"
        "  uploads: none (the app has no upload field; Gradio's upload route is refused); exports: one per stage "
        "and checkpoint, reused, at most 6 kept\n"
        "  plug-in methods: only from the --plugins folder; never from a form or an API call"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python app/main.py",
        description="HaNoRec Studio explorer (Gradio). Host and port come from GRADIO_SERVER_NAME and "
        "GRADIO_SERVER_PORT (default 127.0.0.1:7860). Binding every interface (0.0.0.0) needs a login "
        "(HANOREC_AUTH) or demo mode.",
        epilog=limits_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="DIR",
        help="a data folder the app may read (a dataset, or a folder of datasets); repeatable; "
        f"default: the bundled demo ({DEFAULT_DATA.relative_to(ROOT)})",
    )
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of training runs (default: runs/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads for scoring (default 0 = auto: 1 on machines with up to 4 cores, where the tiny "
        "models run as fast on one thread and more threads spin-wait when the cores are shared)",
    )
    p.add_argument("--share", action="store_true", help="also open a public Gradio link (needs internet)")
    p.add_argument(
        "--plugins",
        metavar="DIR",
        default=None,
        help="a folder of .py files that register more preference methods (hanorec.methods.register): imported "
        "once at start, offered as stages, and recorded in each job that uses them so its training process "
        "imports them; no form or API call can name another file or module",
    )
    p.add_argument(
        "--pending-per-client",
        type=int,
        default=PENDING_PER_CLIENT,
        metavar="N",
        help=f"requests one visitor may have waiting or running in the event queue (default {PENDING_PER_CLIENT}; "
        "raise it when a classroom shares one address behind NAT)",
    )
    p.add_argument(
        "--trust-proxy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"count visitors by the last X-Forwarded-For entry, written by a proxy in front of the app (default: "
        f"on when {TRUST_PROXY_ENV}=1 or on a Hugging Face Space; never on a server clients reach directly)",
    )
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"demo mode for a shared public server: caps steps, evaluation prompts and noise draws per request, "
        f"and queued jobs (default: on when {DEMO_ENV}=1 or on a Hugging Face Space, which sets SPACE_ID)",
    )
    p.add_argument(
        "--warm",
        type=int,
        default=None,
        metavar="N",
        help="do not serve: compute the scores a classroom asks for first (the first N test users of the first "
        "dataset, task hit3: candidate scores and the noise lab's default draws on the LoRA and on the logits, "
        "with the default model and the untrained base), keep them in <runs>/.cache/scores, and exit; a later "
        "app on the same runs folder reads them instead of computing them (the Dockerfile runs this)",
    )
    return p.parse_args(argv)


def demo_mode(flag: bool | None = None) -> bool:
    """--demo / --no-demo, else HANOREC_DEMO (1/0), else on inside a Hugging Face Space (SPACE_ID is set)."""
    if flag is not None:
        return flag
    env = os.environ.get(DEMO_ENV, "").strip().lower()
    if env:
        return env in ("1", "true", "yes", "on")
    return bool(os.environ.get("SPACE_ID"))


def trust_proxy(flag: bool | None = None) -> bool:
    """--trust-proxy / --no-trust-proxy, else HANOREC_TRUST_PROXY (1/0), else on inside a Hugging Face Space."""
    if flag is not None:
        return flag
    env = os.environ.get(TRUST_PROXY_ENV, "").strip().lower()
    if env:
        return env in ("1", "true", "yes", "on")
    return bool(os.environ.get("SPACE_ID"))


def auth_from_env() -> list[tuple[str, str]] | None:
    """HANOREC_AUTH="user:password[,user2:password2]" -> Gradio's auth list; unset -> no login. A malformed
    value is an error (one sentence), never silently an open app."""
    raw = os.environ.get(AUTH_ENV, "").strip()
    if not raw:
        return None
    pairs = []
    for item in raw.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{AUTH_ENV} must hold user:password pairs separated by commas; one entry has no user or password.")
        pairs.append((user, password))
    return pairs


def own_temp_dir() -> str:
    """The app's own Gradio temp folder (mode 0700), not the machine-wide one that every Gradio app shares
    (where one app's files could be served back by another). Set before any component is built."""
    path = tempfile.mkdtemp(prefix="hanorec-gradio-")
    os.environ["GRADIO_TEMP_DIR"] = path
    return path


def make_context(data_dirs=None, runs_dir="runs", device="auto", threads=0, demo=False, demo_runs=None,
                 plugins=None, trust_proxy=False):  # fmt: skip
    """The AppContext for these folders: missing data folders are an error, the runs folder is created.
    torch is imported only when the first model loads, so the page is served sooner. demo: demo mode's
    caps; demo_runs: the shipped trained runs listed read-only (default assets/demo_runs); plugins: the
    operator's folder of plug-in methods (imported now, recorded in the jobs that use them); trust_proxy:
    visitors are told apart by the last X-Forwarded-For entry."""
    dirs = [Path(d).expanduser().resolve() for d in (data_dirs or [DEFAULT_DATA])]
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"The data folder {d} does not exist.")
    plugin_dir = None
    if plugins:
        plugin_dir = Path(plugins).expanduser().resolve()
        if not plugin_dir.is_dir():
            raise ValueError(f"--plugins {plugins}: not a folder; name a folder of .py files that register methods.")
        from hanorec import methods

        try:
            methods.load_plugins([str(plugin_dir)])
        except methods.MethodError as e:
            raise ValueError(f"--plugins {plugins}: {e}.") from None
    if not os.environ.get("GRADIO_TEMP_DIR"):  # one set by whoever runs the app is theirs to choose
        own_temp_dir()
    from app.common import DEMO_RUNS, AppContext  # gradio: imported once the arguments are good

    runs = Path(runs_dir).expanduser().resolve()
    runs.mkdir(parents=True, exist_ok=True)
    dirs += scenario_dirs(runs)
    jobs = _job_manager(runs, None if device == "auto" else device, demo, plugin_dir)
    return AppContext(data_dirs=dirs, runs_dir=runs, device=device, jobs=jobs, threads=threads, demo=demo,
                      demo_runs_dir=Path(demo_runs) if demo_runs else DEMO_RUNS, plugins_dir=plugin_dir,
                      trust_proxy=trust_proxy)  # fmt: skip


def scenario_dirs(runs: Path) -> list[Path]:
    """The teaching-scenario datasets (hanorec.data.teaching_datasets), made once under <runs>/.cache/scenarios
    and offered in every dataset picker; none when the runs folder cannot take them (one line on stderr)."""
    from hanorec.data import teaching_datasets

    try:
        return [teaching_datasets(runs / ".cache" / "scenarios")]
    except OSError as e:
        print(f"The teaching-scenario datasets could not be written under {runs}: {e}", file=sys.stderr)
        return []


def _job_manager(runs: Path, device: str | None, demo: bool = False, plugins: Path | None = None):
    """The app's queue: its caps, its operator's plug-ins only (never a request's), and public messages (no
    path of this machine, no traceback)."""
    from hanorec.jobs import JobManager

    return JobManager(runs, device=device, max_queued=MAX_QUEUED[demo], max_per_owner=MAX_PER_SESSION[demo],
                      plugins=[str(plugins)] if plugins else [], public=True)  # fmt: skip


def build_app(ctx):
    import gradio as gr

    import app.tabs as tabs
    from app.common import images_dir

    # item images are served from their files directly, and so are the images the app makes (images_dir)
    gr.set_static_paths([str(d) for d in ctx.data_dirs] + [str(images_dir())])
    memoize_static_check()
    remember_missing_imports()
    with gr.Blocks(title="HaNoRec Studio", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        for name in TABS:
            with gr.Tab(TAB_TITLES[name], id=name, elem_id=f"tab-{name}"):
                tabs.build(name, ctx)
    demo.queue(default_concurrency_limit=2, max_size=QUEUE_SIZE)
    guard(demo, ctx)
    return demo


def guard(demo, ctx, pending_per_client: int | None = None) -> None:
    """What every request goes through (app/README.md, "Shared use"):

    - each handler runs with hanorec.jobs.CLIENT set to the request's visitor (address, or login name), so
      the job caps count visitors, not the owner tokens a client chooses;
    - an error's sentence names no absolute path of this machine (hanorec.paths.redact) and holds no
      traceback;
    - one visitor may have at most ``pending_per_client`` requests waiting or running in the event queue
      (default PENDING_PER_CLIENT), so nobody fills the queue for everyone else."""
    import gradio as gr

    from app.common import request_client
    from hanorec.jobs import CLIENT
    from hanorec.paths import redact

    limit = PENDING_PER_CLIENT if pending_per_client is None else pending_per_client
    proxy = bool(getattr(ctx, "trust_proxy", False))
    named = ctx.roots() if hasattr(ctx, "roots") else [*((d.name, d) for d in ctx.data_dirs), ("runs", ctx.runs_dir)]
    roots = {str(ROOT): ".", **{str(folder): alias for alias, folder in named}}  # the menus' names (public_path)
    demo._hanorec_pending_limit = limit
    if getattr(demo, "_hanorec_guarded", False):
        return
    demo._hanorec_guarded = True
    process_api = demo.process_api

    async def guarded_api(*args, **kwargs):
        request = kwargs.get("request", args[3] if len(args) > 3 else None)
        request = request[0] if isinstance(request, list) and request else request
        token = CLIENT.set(request_client(request, trust_proxy=proxy) if request is not None else None)
        try:
            return await process_api(*args, **kwargs)
        except gr.Error as e:  # the handler's sentence, or Gradio's own (a value not among a dropdown's choices)
            e.message = redact(str(e.message), roots)
            e.args = (e.message,)
            raise
        finally:
            CLIENT.reset(token)

    demo.process_api = guarded_api
    queue = demo._queue
    push = queue.push

    def visitor(event) -> str:
        return request_client_of(event.request, event.username, proxy)

    async def limited_push(body, request, username):
        me = request_client_of(request, username, proxy)
        waiting = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
        running = [e for job in list(queue.active_jobs) if job for e in job]
        mine = sum(1 for e in waiting + running if visitor(e) == me)
        if mine >= demo._hanorec_pending_limit:
            return (False, f"You already have {mine} requests waiting or running (at most "
                           f"{demo._hanorec_pending_limit} per visitor); wait for them to finish.", "queue_full")  # fmt: skip
        return await push(body, request, username)

    queue.push = limited_push


def request_client_of(request, username, proxy: bool) -> str:
    """The visitor of a raw request (Starlette) and its login name, as app.common.client_id."""
    from app.common import client_id

    client = getattr(request, "client", None)
    return client_id(getattr(client, "host", None), getattr(request, "headers", None), username, trust_proxy=proxy)


class RefuseUploads:
    """ASGI middleware: Gradio's upload route answers 403 with one sentence. No component of the app takes a
    file, and an open route let anyone store files on the server (and learn their paths)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path", "").rstrip("/").rsplit("/", 1)[-1] == "upload":
            body = b'{"detail": "This app takes no uploads."}'
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


STATIC_MEMO_SIZE = 100_000


def memoize_static_check() -> None:
    """Remember which returned files lie in the static folders (gr.set_static_paths), per path and folders.

    Gradio checks every file a handler returns (a user view returns ~60 item images) by testing that it
    exists and resolving it and every static folder (symlinks, each path component): under a classroom's load
    that was two thirds of a user view's server time (BENCHMARKS.md section 7). Only "yes" answers are kept
    (a file inside a static folder stays there while the app runs; a "no" is asked again, so a file that
    appears later is still found), at most STATIC_MEMO_SIZE of them; new static folders make a new key.
    A Gradio without this check is left as it is."""
    from gradio import utils
    from gradio.data_classes import FileData, _StaticFiles

    original = getattr(utils, "_is_static_file", None)
    if original is None or getattr(utils.is_static_file, "memoized", False):
        return
    known: set = set()

    def is_static_file(file_path) -> bool:
        path = file_path.path if isinstance(file_path, FileData) else file_path
        if not isinstance(path, (str, Path)):
            return False
        folders = list(_StaticFiles.all_paths)
        key = (str(path), isinstance(path, str), tuple(map(str, folders)))
        if key in known:
            return True
        found = original(path, folders)
        if found:
            if len(known) >= STATIC_MEMO_SIZE:
                known.clear()
            known.add(key)
        return found

    is_static_file.memoized = True
    utils.is_static_file = is_static_file


OPTIONAL_PLOT_MODULES = ("bokeh", "matplotlib")


def remember_missing_imports(names=OPTIONAL_PLOT_MODULES) -> list[str]:
    """Make ``import NAME`` fail at once for optional modules that are not installed (Python's own rule: a
    None in sys.modules stops an import with ImportError). Gradio tries ``import matplotlib`` around every
    event it runs, and ``import bokeh`` for every new page's plot components: a failed import searches every
    folder on sys.path again, each time (a tenth of the server's CPU under a classroom's load). Installed
    modules are left alone. Returns the names marked missing."""
    import importlib.util

    marked = []
    for name in names:
        if name in sys.modules:
            continue
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = None
            marked.append(name)
    return marked


def launch_options(ctx) -> dict:
    """demo.launch() keywords every launch uses (main, the load script, the tests): the upload limit, the
    data folders served, and the login from HANOREC_AUTH."""
    from starlette.middleware import Middleware

    return {"max_file_size": MAX_FILE_SIZE, "allowed_paths": [str(d) for d in ctx.data_dirs], "auth": auth_from_env(),
            "app_kwargs": {"middleware": [Middleware(RefuseUploads)]}}  # fmt: skip


WARM_TASK = "hit3"


def warm(ctx, users: int, log=print) -> dict:
    """--warm: the first ``users`` test users' candidate scores and default noise draws (both targets) for the
    default model and the untrained base, through the app's result cache and its disk store
    (hanorec.explore.warm_scores). Returns the totals of warm_scores' counts."""
    from app.common import example_for, test_users
    from app.tabs.noise import DEFAULT_SEED, DEFAULT_SIGMA, TARGETS, default_draws
    from hanorec.explore import warm_scores

    if users < 1:
        raise ValueError(f"--warm takes a number of users of at least 1, got {users}.")
    choices = ctx.dataset_choices()
    if not choices:
        raise ValueError("--warm found no dataset in the data folders.")
    dataset = choices[0][1]
    names = test_users(ctx.prepared(dataset, WARM_TASK))[:users]
    examples = [example_for(ctx, dataset, WARM_TASK, u)[1] for u in names]
    totals = {"examples": 0, "read": 0, "computed": 0}
    for model in dict.fromkeys([ctx.default_model(), "base"]):
        bundle, _ = ctx.model(model, dataset, WARM_TASK)
        data = ctx.prepared(dataset, WARM_TASK)
        counts = warm_scores(bundle, data.dataset, examples, sigma=DEFAULT_SIGMA, draws=default_draws(ctx),
                             seed=DEFAULT_SEED, targets=TARGETS, cache=ctx.results)  # fmt: skip
        log(f"warm: {model}: {counts['examples']} users, {counts['read']} results already stored, "
            f"{counts['computed']} computed")  # fmt: skip
        for k in totals:
            totals[k] += counts[k]
    return totals


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        auth_from_env()  # a malformed login setting stops the app before anything starts
        if args.pending_per_client < 1:
            raise ValueError(f"--pending-per-client takes a number of at least 1, got {args.pending_per_client}.")
        ctx = make_context(args.data, args.runs, args.device, args.threads, demo=demo_mode(args.demo),
                           plugins=args.plugins, trust_proxy=trust_proxy(args.trust_proxy))  # fmt: skip
        options = launch_options(ctx)
        host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
        if host.strip() in EVERY_INTERFACE and not options["auth"] and not ctx.demo and args.warm is None:
            raise ValueError(f"GRADIO_SERVER_NAME={host} serves every network interface, and without a login any "
                             f"visitor could train on this machine: set {AUTH_ENV}=user:password, or demo mode "
                             f"({DEMO_ENV}=1), or serve 127.0.0.1.")  # fmt: skip
        if args.warm is not None:
            warm(ctx, args.warm)
            return
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    demo = build_app(ctx)
    guard(demo, ctx, args.pending_per_client)
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    device = "auto (cuda when available, chosen when the first model loads)" if args.device == "auto" else args.device
    extra = (" demo mode;" if ctx.demo else "") + (" login required;" if options["auth"] else "")
    print(f"HaNoRec Studio: data {', '.join(map(str, ctx.data_dirs))}; runs {ctx.runs_dir}; device {device};{extra}")
    demo.launch(server_name=host, server_port=port, share=args.share, **options)


if __name__ == "__main__":
    main()
