"""What every tab shares: the allowed folders, the device, the job manager, and small caches.

`AppContext` holds no method logic: loading goes through hanorec.pipeline / hanorec.runs, path checks
through hanorec.paths. Errors from the package become `gr.Error` with the package's own sentence.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from hanorec.errors import UserError
from hanorec.paths import PathError, confine

REPO = Path(__file__).resolve().parents[1]
DEMO_RUNS = REPO / "assets" / "demo_runs"  # scripts/make_demo_runs.py
TASKS = ("hit3", "hit1", "next1")
BASE_PRESET = "tiny-qwen2.5-vl"
UNTRAINED = f"untrained {BASE_PRESET} (random init)"
# Concurrency groups of the queue (see AppContext.events): light events (a user view, a prompt, a pair's
# details) have their own workers, so they never wait behind heavy ones. Heavy events (sigma sweeps, hardness,
# per-pair scoring) share a limit of half the cores: each uses a core for a second or more. Noise draws have
# a group of their own with more workers: a draw already in the result cache answers at once, and the draws
# that compute take one of the cache's compute slots (again half the cores; sweeps take them too).
LIGHT, HEAVY, NOISE = "light", "heavy", "noise"
# Errors a user can cause (the package's UserError, a missing file, a key not found); anything else is a bug
# and is reported as one sentence too.
USER_ERRORS = (UserError, FileNotFoundError, KeyError)


@contextmanager
def user_errors(what: str = ""):
    """Turn a package exception into one sentence in the UI (gr.Error), never a traceback."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise gr.Error(_sentence(e)) from None
    except Exception as e:  # noqa: BLE001 - the UI shows one sentence; the log keeps the traceback
        import logging

        logging.getLogger("hanorec.app").exception("unexpected error %s", what)
        raise gr.Error(f"Unexpected error{' ' + what if what else ''}: {type(e).__name__}: {_sentence(e)}") from None


# ---- numbers typed in a field (or sent to the API) ---------------------------------------------------
def number(value, label: str, *, integer: bool = False, minimum=None, maximum=None, optional: bool = False):
    """A field's value as a finite float (or int), else gr.Error with one sentence naming the field.

    The one coercion of every number field (number_field and slider_field call it before a handler runs):
    strings, lists, booleans, NaN, infinities, fractions in a whole-number field and values outside
    [minimum, maximum] are refused. optional: an empty field (None or '') is None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise gr.Error(f"{label}: the field is empty; type a number.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise gr.Error(f"{label}: {value[:40]!r} is not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise gr.Error(f"{label}: a number is needed, not {type(value).__name__} {str(value)[:40]}.")
    if not math.isfinite(value):
        raise gr.Error(f"{label}: {value} is not a finite number.")
    if integer:
        if float(value) != int(value):
            raise gr.Error(f"{label}: {value:g} is not a whole number.")
        value = int(value)
    if minimum is not None and value < minimum:
        raise gr.Error(f"{label}: {value:g} is below the minimum, {minimum:g}.")
    if maximum is not None and value > maximum:
        raise gr.Error(f"{label}: {value:g} is above the maximum, {maximum:g}.")
    return value


def number_field(*args, **kwargs) -> gr.Number:
    """gr.Number whose value goes through number() (one sentence for NaN, text, lists...) before a handler.
    (The instance's preprocess is replaced: a subclass would make Gradio write a .pyi file beside this one.)"""
    field_ = gr.Number(*args, **kwargs)
    label = str(field_.label or "number")

    def preprocess(payload):
        return number(payload, label, integer=field_.precision == 0, minimum=field_.minimum,
                      maximum=field_.maximum, optional=True)  # fmt: skip

    field_.preprocess = preprocess
    return field_


def slider_field(*args, **kwargs) -> gr.Slider:
    """gr.Slider whose value goes through number() before a handler (the API can send anything)."""
    field_ = gr.Slider(*args, **kwargs)
    label = str(field_.label or "slider")
    whole = float(field_.step).is_integer() and float(field_.minimum).is_integer()

    def preprocess(payload):
        return number(payload, label, integer=whole, minimum=field_.minimum, maximum=field_.maximum)

    field_.preprocess = preprocess
    return field_


# ---- who launched a job: a token kept in the browser ------------------------------------------------
OWNER_STORAGE_KEY = "hanorec-owner"


def owner_token(value) -> str:
    """The browser's owner token (from gr.BrowserState), or a fresh one when it has none or sent nonsense:
    a fresh token owns nothing, so only the browser that launched a job can stop or resume it."""
    if isinstance(value, str) and 16 <= len(value) <= 128 and value.isascii() and value.replace("-", "").replace("_", "").isalnum():
        return value
    return secrets.token_urlsafe(24)


# The BrowserState's "secret" is sent to every page in /config, so it is no secret: it only names the stored
# value's encoding, and stays the same across restarts so a browser keeps its token. The token is the secret.
OWNER_STORAGE_CODE = "hanorec-owner-token-v1"


def owner_state(ctx) -> gr.BrowserState:
    """The owner token in the browser's localStorage (a reload, a closed tab and an app restart all keep
    ownership). Nothing secret of the server goes to the page (see OWNER_STORAGE_CODE)."""
    # default "" (not None): a page or API call without a token is a stranger, never the local Python caller.
    # One state per page, shared by the tabs that launch jobs (Train, Compare), so they hold the same token.
    from gradio.context import Context

    page = Context.root_block
    cached = getattr(ctx, "_owner_state", None)
    if cached is not None and cached[0] is page:
        return cached[1]
    state = gr.BrowserState("", storage_key=OWNER_STORAGE_KEY, secret=OWNER_STORAGE_CODE)
    try:
        ctx._owner_state = (page, state)
    except AttributeError:  # a context that takes no new attributes: each tab keeps its own state
        pass
    return state


# ---- who is asking: the client's address, or its login ----------------------------------------------
def client_id(host: str | None, headers=None, username: str | None = None, *, trust_proxy: bool = False) -> str:
    """The visitor a request counts against (job caps, pending events): its login name when a login is set,
    else its address. Behind a proxy the operator trusts (--trust-proxy; on by default on a Hugging Face
    Space), the last X-Forwarded-For entry, which that proxy wrote; a client's own entries come before it."""
    if username:
        return f"login:{username}"
    if trust_proxy and headers is not None:
        forwarded = headers.get("x-forwarded-for") or ""
        last = forwarded.split(",")[-1].strip()
        if last:
            return f"address:{last[:64]}"
    return f"address:{host or 'unknown'}"


def request_client(request, *, trust_proxy: bool = False) -> str | None:
    """client_id of a gr.Request (or a Starlette request), None when there is none (a local Python call)."""
    if request is None:
        return None
    client = getattr(request, "client", None)
    host = getattr(client, "host", None) if client is not None else None
    return client_id(host, getattr(request, "headers", None), getattr(request, "username", None),
                     trust_proxy=trust_proxy)  # fmt: skip


# Demo mode (a public Space): what one visitor may ask of a shared GPU.
RESOLVED_TTL = 10.0  # seconds an existing confined path is remembered (AppContext.resolve_path)
DEMO_LIMITS = {"max_steps": 60, "eval_examples": 100, "draws": 50, "epochs": 1}


def _identity(path: Path):
    """(device, inode, type) of the path itself (a link is not followed), or None when it is gone: a folder
    swapped for a link, or for another folder, has another identity. A resolved path has no link in its
    parents, so a parent swapped for a link changes what lstat finds too."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mode >> 12)


def _sentence(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.split()) or type(e).__name__
    return text if text.endswith((".", "!", "?")) else text + "."


class _LRU:
    """A tiny thread-safe LRU cache: switching back to a dataset or model is instant."""

    def __init__(self, size: int):
        self.size, self.data, self.lock = size, OrderedDict(), threading.RLock()
        self.building: dict = {}  # key -> the lock held while that value is made (made once, not per caller)

    def get(self, key, make: Callable):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
            building = self.building.setdefault(key, threading.Lock())
        with building:
            with self.lock:
                if key in self.data:  # another session made it while this one waited
                    self.data.move_to_end(key)
                    return self.data[key]
            try:
                value = make()
            finally:
                with self.lock:
                    self.building.pop(key, None)
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value


@dataclass
class AppContext:
    """Shared state of one running app (see app/tabs/*.py: each `build(ctx)`)."""

    data_dirs: list[Path]
    runs_dir: Path
    device: str = "auto"  # "auto" becomes cuda / cpu when the first model loads (torch is imported then)
    jobs: object = None  # hanorec.jobs.JobManager
    threads: int = 0  # torch CPU threads; 0 = default_threads()
    heavy_limit: int = 0  # heavy events at once (noise draws, sweeps, hardness); 0 = default_heavy_limit()
    light_limit: int = 4  # light events at once (user views, prompts)
    noise_limit: int = 16  # noise draws in flight: cached ones answer at once, computing ones wait for a slot
    # scoring results (clean and noisy candidate scores) per model, dataset, example and noise setting
    results: object = field(default_factory=lambda: _result_cache(), repr=False)
    demo: bool = False  # demo mode: DEMO_LIMITS cap steps, evaluation prompts and noise draws
    plugins_dir: Path | None = None  # the operator's plug-in folder (python app/main.py --plugins DIR)
    trust_proxy: bool = False  # client_id reads the last X-Forwarded-For entry (a proxy the operator trusts)
    demo_runs_dir: Path | None = None  # trained runs shipped with the app, listed read-only
    _data: _LRU = field(default_factory=lambda: _LRU(6), repr=False)
    _models: _LRU = field(default_factory=lambda: _LRU(3), repr=False)
    _extra: _LRU = field(default_factory=lambda: _LRU(8), repr=False)
    _threads_set: bool = field(default=False, repr=False)
    _resolved: dict = field(default_factory=dict, repr=False)  # resolve_path's recent answers

    def __post_init__(self):
        # scores that cost seconds are also kept on disk, for the next process (a restart, or --warm at build)
        if getattr(self.results, "store", "absent") is None and self.runs_dir is not None:
            from hanorec.serving import DiskStore

            self.results.store = DiskStore(Path(self.runs_dir) / ".cache" / "scores")

    def limit(self, name: str, default=None):
        """The cap on a request's size: DEMO_LIMITS[name] in demo mode, else `default` (None: no cap)."""
        return DEMO_LIMITS.get(name, default) if self.demo else default

    # ---- paths -----------------------------------------------------------------------------
    def roots(self) -> list[tuple[str, Path]]:
        """(public name, folder) of every allowed folder: `runs` for the runs folder, `demo_runs` for the
        shipped runs, each data folder by its own name (`name-2`, `name-3`... when a name is taken). A menu
        value names a path by these (public_path), never by the server's absolute path."""
        out: list[tuple[str, Path]] = []
        named = [("runs", self.runs_dir), *[("demo_runs", d) for d in self._demo_dirs()]]
        named += [(Path(d).name, d) for d in self.data_dirs]
        for name, folder in named:
            if folder is None:
                continue
            folder = Path(folder).resolve()
            if any(folder == f for _, f in out):
                continue
            name = name.replace("::", "_").strip() or "data"
            alias, n = name, 1
            while any(alias == a for a, _ in out):
                n += 1
                alias = f"{name}-{n}"
            out.append((alias, folder))
        return out

    def public_path(self, path) -> str:
        """The public name of a path inside an allowed folder, "<folder's public name>/<relative part>" (see
        roots): what a menu shows and sends back; resolve_path reads it. A path outside every folder (never
        listed by the app) becomes ".../<its last component>", still no absolute path of this machine."""
        path = Path(path)
        path = path if path.is_absolute() else Path(os.path.abspath(path))
        for candidate in dict.fromkeys([path, path.resolve()]):
            inside = [(a, f) for a, f in self.roots() if candidate == f or f in candidate.parents]
            if inside:  # the innermost folder (a data folder may lie inside another)
                alias, folder = max(inside, key=lambda af: len(af[1].parts))
                rel = candidate.relative_to(folder).as_posix()
                return alias if rel == "." else f"{alias}/{rel}"
        return f".../{path.name}"

    def public_text(self, text: str) -> str:
        """text with every absolute path in it named by public_path's names (hanorec.paths.redact)."""
        from hanorec.paths import redact

        return redact(text, {str(folder): alias for alias, folder in self.roots()})

    def path_menu(self, dropdown: gr.Dropdown) -> gr.Dropdown:
        """A dataset or model picker whose values are public names (public_path) that also takes what a name
        stands for from an API caller: a path (a model: "<path>::<stage>") that resolve_path confines is read
        as its public name before Gradio checks it is one of the choices, so exactly the listed datasets and
        models are taken, however they are spelled. (The instance's preprocess is replaced, as number_field
        does.)"""
        check = dropdown.preprocess

        def preprocess(payload):
            if isinstance(payload, str) and payload not in [v for _, v in dropdown.choices]:
                payload = self.public_value(payload)
            return check(payload)

        dropdown.preprocess = preprocess
        return dropdown

    def public_value(self, value: str) -> str:
        """A dataset value ("<path>") or a run's model value ("<path>::<stage>") with its path as its public
        name, when the path is confined (resolve_path); anything else as it came (the picker refuses it)."""
        run, sep, stage = value.rpartition("::") if "::" in value else (value, "", "")
        try:
            return self.public_path(self.resolve_path(run)) + sep + stage
        except gr.Error:
            return value

    def _from_public(self, text) -> str | None:
        """The absolute path a public name stands for (not yet checked: resolve_path confines it), or None
        when the text does not start with a folder's public name."""
        if not isinstance(text, str) or "\x00" in text:
            return None
        head, _, rest = text.strip().partition("/")
        for alias, folder in self.roots():
            if head == alias:
                return str(folder / rest) if rest else str(folder)
        return None

    def resolve_path(self, user_text: str, *, must_exist: bool = True) -> Path:
        """A menu's public name (public_path) or a typed path, confined to the data folders and the runs
        folder, else gr.Error (one sentence). A public name is read first; any other text (a relative path,
        an absolute path inside the folders) goes through hanorec.paths.confine as typed.

        An existing path that passed is remembered for RESOLVED_TTL seconds (every view and draw names its
        dataset and model again; resolving each component costs milliseconds under a classroom's load): a
        remembered answer is used only while the path still exists, and refusals are never remembered."""
        key = (user_text, must_exist)
        if must_exist and isinstance(user_text, str):
            hit = self._resolved.get(key)
            if hit is not None and time.monotonic() - hit[0] < RESOLVED_TTL and _identity(hit[1]) == hit[2]:
                return hit[1]  # the same file as before: not removed, not swapped for a link (lstat's inode)
        allowed = [*self.data_dirs, self.runs_dir, *self._demo_dirs()]
        public = self._from_public(user_text)
        try:
            if public is not None and (not must_exist or os.path.lexists(public)):
                try:  # the same checks as a typed path ('..', links leading outside, loops...)
                    path = confine(public, allowed, must_exist=must_exist)
                except PathError as e:
                    raise PathError(str(e).replace(repr(public), repr(user_text.strip()))) from None
            else:
                path = confine(user_text, allowed, must_exist=must_exist)
        except PathError as e:  # the allowed folders by their public names, as the menus show them
            raise gr.Error(self.public_text(str(e))) from None
        if must_exist and isinstance(user_text, str):
            if len(self._resolved) >= 1024:
                self._resolved.clear()
            self._resolved[key] = (time.monotonic(), path, _identity(path))
        return path

    def _demo_dirs(self) -> list[Path]:
        return [self.demo_runs_dir] if self.demo_runs_dir is not None and Path(self.demo_runs_dir).is_dir() else []

    def dataset_choices(self) -> list[tuple[str, str]]:
        from hanorec.explore import find_datasets

        return [(self.public_path(p),) * 2 for p in find_datasets(self.data_dirs)]

    # ---- data ------------------------------------------------------------------------------
    def config(self, dataset: str, task: str, overrides: dict | None = None):
        from hanorec.config import load_config

        path = self.resolve_path(dataset)
        over = {"data": {"path": str(path)}, "task": {"name": task}}
        for k, v in (overrides or {}).items():
            over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) else v
        with user_errors("reading the configuration"):
            return load_config(overrides=over)

    def prepared(self, dataset: str, task: str):
        """hanorec.pipeline.PreparedData for the dataset and task (default config, seed 0), cached."""
        from hanorec.pipeline import prepare_data

        cfg = self.config(dataset, task)
        with user_errors("loading the dataset"):
            # deferred draws and counts (made when a view needs them); frozen: the app keeps the data a while
            make = lambda: prepare_data(cfg, defer=True, freeze=True)  # noqa: E731
            return self._data.get(("data", cfg.data.path, task), make)

    def prepared_for(self, cfg):
        """PreparedData exactly as the run with this config made it (its seed, task, subset), cached."""
        from hanorec.pipeline import prepare_data

        key = ("run-data", cfg.to_yaml())
        with user_errors("loading the run's dataset"):
            return self._data.get(key, lambda: prepare_data(cfg))

    # ---- models ----------------------------------------------------------------------------
    def torch_ready(self) -> str:
        """Import torch (not needed to serve the page), set its threads, resolve device "auto"; the device."""
        import torch

        if not self._threads_set:
            torch.set_num_threads(self.threads or default_threads())
            self._threads_set = True
        if self.device == "auto":
            self.device = pick_device()
        return self.device

    def base_model(self, dataset: str, task: str = "hit3", preset: str = BASE_PRESET):
        """An untrained tiny preset (by default the paper family's) for a dataset (random init, tokenizer
        trained on its text) with a fresh LoRA (B = 0, so its scores are the base model's), cached."""
        from hanorec.models import TINY_PRESETS, add_lora
        from hanorec.pipeline import prepare_model

        if preset not in TINY_PRESETS:
            raise gr.Error(f"{preset!r} is not a tiny preset; use one of {', '.join(TINY_PRESETS)}.")
        cfg = self.config(dataset, task, {"model": {"name": preset}})
        data = self.prepared(dataset, task)

        def make():
            self.torch_ready()
            bundle = prepare_model(cfg, data.dataset)
            add_lora(bundle, cfg.lora)
            bundle.model.to(self.device).eval()
            return bundle

        with user_errors("building the model"):
            key = ("base", cfg.data.path) if preset == BASE_PRESET else ("base", cfg.data.path, preset)
            return self._models.get(key, make)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value) for every model a panel can score with: the trained demo runs (read-only), the
        untrained presets (the paper family's first, then one per other family), then each run's stages."""
        from hanorec.models import TINY_PRESETS

        out = [(f"demo (trained, read-only): {run['name']} / {stage}", f"{self.public_path(run['path'])}::{stage}")
               for d in self._demo_dirs() for run in list_runs(d) for stage in run["stages"]]  # fmt: skip
        out.append((UNTRAINED, "base"))
        out += [(f"untrained {p} (random init)", f"base:{p}") for p in TINY_PRESETS if p != BASE_PRESET]
        for run in list_runs(self.runs_dir):
            out += [(f"{run['name']} / {stage}", f"{self.public_path(run['path'])}::{stage}") for stage in run["stages"]]
        return out

    def default_model(self) -> str:
        """What every model picker shows first: the trained demo HaNo-DPO stage when it ships, else the base."""
        values = [v for _, v in self.model_choices()]
        return next((v for v in values if v.endswith("::hano_dpo") and self._is_demo(v)), "base")

    def _is_demo(self, value: str) -> bool:
        run = value.rpartition("::")[0]
        path = Path(self._from_public(run) or run)
        return any(d.resolve() in path.resolve().parents for d in self._demo_dirs())

    def model(self, source: str, dataset: str, task: str = "hit3"):
        """(bundle, run config or None) for a value of model_choices(); cached."""
        if not source or source == "base":
            return self.base_model(dataset, task), None
        if source.startswith("base:"):  # another family's untrained preset
            return self.base_model(dataset, task, source.removeprefix("base:")), None
        run_path, _, stage = source.rpartition("::")
        path = self.resolve_path(run_path)

        def make():
            self.torch_ready()
            bundle, cfg = load_run_stage(path, stage)
            if cfg is not None and not Path(cfg.data.path).is_absolute() and self._is_demo(str(path) + "::"):
                cfg.data.path = str(REPO / cfg.data.path)  # a shipped run names the demo data relative to the repo
            bundle.model.to(self.device).eval()
            return bundle, cfg

        with user_errors(f"loading {stage} of run {path.name}"):
            return self._models.get(("run", str(path), stage), make)

    def cached(self, key, make: Callable):
        """A small general cache for derived values (item embeddings, neighbour profiles)."""
        return self._extra.get(key, make)

    def cached_model(self, key, make: Callable):
        return self._models.get(key, make)

    def events(self, kind: str) -> dict:
        """Queue settings of an event of this kind (LIGHT, HEAVY or NOISE): its concurrency group and limit."""
        if kind == HEAVY:
            return {"concurrency_id": HEAVY, "concurrency_limit": self.heavy_limit or default_heavy_limit()}
        if kind == LIGHT:
            return {"concurrency_id": LIGHT, "concurrency_limit": max(1, self.light_limit)}
        if kind == NOISE:
            return {"concurrency_id": NOISE, "concurrency_limit": max(1, self.noise_limit)}
        raise ValueError(f"unknown event kind {kind!r}; use {LIGHT!r}, {HEAVY!r} or {NOISE!r}")


def _result_cache():
    from hanorec.serving import ResultCache

    return ResultCache(max_entries=512, heavy_slots=default_heavy_limit())


def list_runs(root: Path) -> list[dict]:
    """Runs under root with their stages (hanorec.runs)."""
    from hanorec import runs

    return [
        {"name": r.name, "path": str(r.path), "stages": list(r.stages), "status": r.status}
        for r in runs.list_runs(root)
    ]


def load_run_stage(run_path: Path, stage: str):
    """(bundle, RunConfig) of a run's stage (hanorec.runs)."""
    from hanorec import runs

    bundle = runs.load_stage(run_path, stage)
    return bundle, runs.read_config(run_path, stage)


def on_load(fn, inputs, outputs) -> None:
    """Run fn when the page loads (inside a tab's build, the enclosing Blocks is the page)."""
    from gradio.context import Context

    Context.root_block.load(fn, inputs, outputs, api_visibility="private")


def item_image(ds, item: str):
    """An item's image for a gallery: its file (served as is, no re-encoding) or the grey placeholder (as a
    file, image_file)."""
    path = ds.items[item].image_path
    return str(path) if path is not None else image_file(ds.load_image(item))


MAX_IMAGE_FILES = 20_000  # generated image files kept; beyond, the oldest half is removed
_IMAGES_LOCK = threading.Lock()
_images_dir: Path | None = None  # made on first use, one per app process
_image_names: set[str] = set()  # names written to it (counted against MAX_IMAGE_FILES without listing it)


def images_dir() -> Path:
    """A folder of this app process for images it makes (what the model sees, placeholders), served as a
    static folder (app.main.build_app): a cached view then hands Gradio a path, not a picture to encode,
    hash and copy on every request."""
    global _images_dir
    import tempfile

    with _IMAGES_LOCK:
        if _images_dir is None:
            base = os.environ.get("GRADIO_TEMP_DIR") or None
            _images_dir = Path(tempfile.mkdtemp(prefix="hanorec-images-", dir=base))
        return _images_dir


def image_file(image) -> str:
    """A PIL image as a PNG file in images_dir(), named by its content (the same picture is written once)."""
    import hashlib
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    folder = images_dir()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if path.exists():
        return str(path)
    with _IMAGES_LOCK:
        if len(_image_names) >= MAX_IMAGE_FILES:  # the oldest half goes (a cached view shows them again after a refresh)
            files = sorted(folder.glob("*.png"), key=lambda f: f.stat().st_mtime)
            for old_file in files[: len(files) // 2]:
                old_file.unlink(missing_ok=True)
            _image_names.clear()
            _image_names.update(f.name for f in folder.glob("*.png"))
        tmp = folder / f".{path.name}.{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        _image_names.add(path.name)
    return str(path)


def default_threads() -> int:
    """1 on machines with up to 4 cores: the tiny models run as fast on one thread, and more threads spin-wait
    when the cores are shared; half the cores (at most 8) on bigger machines."""
    import os

    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(8, cores // 2)


def default_heavy_limit() -> int:
    """Heavy events at once: half the cores (at least 1), so the other half keeps serving light events."""
    import os

    return max(1, (os.cpu_count() or 1) // 2)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- shared pieces of the tabs -----------------------------------------------------------------
def frozen_plot(fig):
    """A plotly figure as gr.Plot's serialised value (its JSON, made once): an answer kept in a cache is then
    not serialised again for every session that asks for it."""
    from gradio.components.plot import PlotData

    return PlotData(type="plotly", plot=fig.to_json())


def example_for(ctx: AppContext, dataset: str, task: str, user: str):
    """(PreparedData, the user's test Example for the task) exactly as a run with the default config builds it."""
    if not user:
        raise gr.Error("Pick a user first.")
    data = ctx.prepared(dataset, task)
    if hasattr(data.test, "for_user"):  # hanorec.tasks.ExampleList: only this user's example is formatted
        example = data.test.for_user(user)
        if example is not None:
            return data, example
    else:
        for e in data.test:
            if e.user == user:
                return data, e
    raise gr.Error(f"User {user!r} has no test prompt for task {task} (too few interactions).")


def users_for(ctx: AppContext, dataset: str, task: str):
    """The user dropdown's choices: users with a test prompt for the task (the first one selected)."""
    users = test_users(ctx.prepared(dataset, task))
    return gr.update(choices=users[:MAX_USER_CHOICES], value=users[0] if users else None)


MAX_USER_CHOICES = 2000  # a dropdown of 100,000 users freezes a browser; any other user id can be typed


def test_users(data) -> list[str]:
    """The users with a test prompt, in order, without formatting any prompt (hanorec.tasks.ExampleList)."""
    return data.test.users() if hasattr(data.test, "users") else [e.user for e in data.test]


def example_pickers(ctx: AppContext, prefix: str, *, with_model: bool = True, with_user: bool = True):
    """Dataset, task, user (and model) dropdowns wired together; returns them."""
    from functools import partial

    datasets = ctx.dataset_choices()
    with gr.Row():
        dataset = ctx.path_menu(gr.Dropdown(datasets, value=datasets[0][1] if datasets else None, label="Dataset",
                                                scale=3))  # fmt: skip
        task = gr.Dropdown(list(TASKS), value="hit3", label="Task", scale=1)
        user = gr.Dropdown([], label="User (test prompt)", scale=2, allow_custom_value=True) if with_user else None
        model = (
            ctx.path_menu(gr.Dropdown(ctx.model_choices(), value=ctx.default_model(), label="Model", scale=3,
                                          elem_id=f"{prefix}-model"))  # fmt: skip
            if with_model
            else None
        )
        refresh = gr.Button("Refresh models", scale=1, size="sm", elem_id=f"{prefix}-refresh") if with_model else None
    if with_user:
        fill = partial(users_for, ctx)
        dataset.change(fill, [dataset, task], user, api_visibility="private")
        task.change(fill, [dataset, task], user, api_visibility="private")
        on_load(fill, [dataset, task], user)
    if with_model:
        refresh.click(lambda: gr.update(choices=ctx.model_choices()), None, model, api_name=f"{prefix}_models")
    return dataset, task, user, model


# ---- downloads ------------------------------------------------------------------------------------
_DOWNLOADS: dict = {}


def downloads_dir() -> Path:
    """A folder of this app process for files offered for download (tables as CSV, exported models)."""
    import tempfile

    if "dir" not in _DOWNLOADS:
        _DOWNLOADS["dir"] = Path(tempfile.mkdtemp(prefix="hanorec-downloads-"))
    return _DOWNLOADS["dir"]


def table_download(name: str, table):
    """The DownloadButton's new value: the table as a CSV file (hanorec.export.write_table_csv)."""
    import uuid

    from hanorec.export import write_table_csv

    if table is None or len(table) == 0:
        return gr.update(value=None, interactive=False)
    with user_errors("writing the table"):
        path = write_table_csv(table, downloads_dir() / uuid.uuid4().hex[:12], name)
    return gr.update(value=str(path), interactive=True)


def download_buttons(**tables) -> list:
    """One "Download <name> (CSV)" button per table (name=component), in a row, each following its table."""
    from functools import partial

    buttons = []
    with gr.Row():
        for name, table in tables.items():
            label = name.replace("_", " ")
            button = gr.DownloadButton(f"Download {label} (CSV)", size="sm", interactive=False)
            table.change(partial(table_download, name), table, button, api_visibility="private",
                         show_progress="hidden")  # fmt: skip
            buttons.append(button)
    return buttons
