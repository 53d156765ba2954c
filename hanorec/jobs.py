"""Background training jobs: one run at a time per device, a visible queue, stop and resume.

    jobs = JobManager("runs")
    job = jobs.submit({"sft": {"max_steps": 30}}, stage="SFT")      # -> job id (the run folder's name)
    jobs.status(job)            # JobStatus: queued (position) / running (stage, step, total) / finished ...
    jobs.stop(job)              # SIGTERM: the CLI checkpoints after the current step and stops
    jobs.resume(job)            # back in the queue; the CLI resumes from the newest checkpoint

A job is a run folder (hanorec.runs) holding config.yaml (the resolved configuration), job.json (the CLI
commands to run, e.g. `python -m hanorec sft --config=<run>/config.yaml` then `pref`), status.json and
job.log. A small runner process (`python -m hanorec.jobs <run>`, in its own session) runs those commands
one after the other as subprocesses, so a crash or a stop never takes the app down and a run continues
when the browser or the app closes.

The queue is the run folders whose status is 'queued', in submission order: nothing else is kept, so a
browser reload or an app restart finds every job again. Queued jobs start when a JobManager on the same
runs folder is alive (it checks every `poll_s` seconds and on every call); one job runs at a time per
runs folder, which is one device (`device`: 'cpu', 'cuda:N' or auto, given to the run through
CUDA_VISIBLE_DEVICES).

Shared use (a public demo): `submit(..., owner=token)` records a hash of the launching browser's token, and
`stop` / `resume` with another token are refused (a local caller passes no token and may do anything);
`max_queued` and `max_per_owner` cap the queue, checked under the queue lock. Every run folder is read on its
own: a damaged job.json lists that job as 'unreadable' with its sentence and takes it out of the queue,
and the others work on. Symbolic links in the runs folder are never followed, for jobs or listings.

On a ZeroGPU Space (hanorec.spaces.on_zero_gpu) a subprocess never gets the GPU, which exists only inside
calls decorated with `spaces.GPU` in the app's own process. There a job runs in a thread of the app
instead (`run_job_chunked`): the same commands, with training done by hanorec.spaces.train_in_chunks (a
sequence of short GPU calls, each resuming from the newest checkpoint) and the evaluation in one more GPU
call; status, metrics, checkpoints and results land in the same run folder, so the Train tab reads them
as before. Stop ends the running call at its next step (with a checkpoint); resume queues it again.
Local runs are unchanged.
"""

from __future__ import annotations

import contextvars
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hanorec import runs
from hanorec.errors import UserError

JOB_FILE = "job.json"
LOG_FILE = "job.log"
LOCK_FILE = ".jobs.lock"


def stages() -> tuple[str, ...]:
    """What a job can train: SFT, or any row of the method registry (hanorec.methods.variants)."""
    from hanorec import methods

    return ("SFT", *methods.variants())


def __getattr__(name: str):
    if name == "STAGES":  # read when asked, so a method registered later is a stage too
        return stages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class JobError(UserError, ValueError):
    """A job request that cannot be honoured (unknown job, bad stage, nothing to resume): one sentence."""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
UNREADABLE = "unreadable"  # the state of a job whose job.json cannot be read (listed, never run)


# Who is asking (the app sets it per request: the client's address, or its login name when a login is set).
# Per-visitor caps count it rather than the browser's owner token, which a client can change at will.
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("hanorec_client", default=None)


def owner_key(token: str | None) -> str | None:
    """What job.json keeps of an owner token: a hash, so no file or listing reveals the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else None


def read_job(run: Path) -> dict:
    """A job's job.json, or JobError naming the file when it is damaged (truncated, not an object, a link)."""
    path = Path(run) / JOB_FILE
    if path.is_symlink():
        raise JobError(f"{path} is a symbolic link; a job's files are never read through links")
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path} is missing") from None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise JobError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(job, dict) or not isinstance(job.get("commands"), list):
        raise JobError(f"{path} is unreadable (it holds no list of commands)")
    return job


@dataclass
class JobStatus:
    job_id: str
    run_dir: Path
    state: str  # queued | running | finished | stopped | failed
    stage: str = "SFT"  # what was asked for: SFT or a preference variant
    position: int | None = None  # 1 = next to start (queued jobs only)
    command: str | None = None  # the CLI command running now (sft, pref, run)
    step: int | None = None
    total: int | None = None
    epoch: float | None = None
    elapsed_s: float | None = None
    message: str = ""
    log_tail: str = ""
    metrics: list[dict] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # the job's CLI commands, in order

    @property
    def fraction(self) -> float:
        if self.state == "finished":
            return 1.0
        return min(1.0, self.step / self.total) if self.step and self.total else 0.0

    def describe(self) -> str:
        """One line for a person: 'running: pref step 12/30', 'queued: position 2', 'failed: <sentence>'."""
        if self.state == "queued":
            return f"{self.job_id}: queued, position {self.position}"
        if self.state == "running":
            where = f" {self.command}" if self.command else ""
            if self.command in self.commands and len(self.commands) > 1:
                where += f" (command {self.commands.index(self.command) + 1} of {len(self.commands)})"
            if self.command == COMPARE and self.message:
                where += f", {self.message}"
            if self.step is not None:
                total = f"/{self.total}" if self.total else ""
                return f"{self.job_id}: running{where}, step {self.step}{total}"
            return f"{self.job_id}: running{where}, preparing data and model"
        return f"{self.job_id}: {self.state}" + (f": {self.message}" if self.message else "")


def default_env() -> dict:
    """On small machines a run uses one torch thread: the tiny models are as fast on one, and two threads
    spin-wait badly (8-15x slower) whenever anything else, the app included, uses the cores."""
    return {"OMP_NUM_THREADS": "1"} if (os.cpu_count() or 1) <= 4 else {}


def device_env(device: str | None) -> dict:
    """The environment that puts a run on the app's device: 'cuda:N' shows it GPU N only, 'cpu' no GPU."""
    if not device or device in ("auto", "cuda"):
        return {}
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if re.fullmatch(r"cuda:\d+", device):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    raise JobError(f"device {device!r} is not one of cpu, cuda, cuda:N or auto")


def available_trackers() -> list[str]:
    """Experiment trackers accelerate can mirror the metrics to on this machine (`--sft.log_with=...`)."""
    from accelerate.utils import imports

    names = ("tensorboard", "wandb", "trackio")
    return [n for n in names if getattr(imports, f"is_{n}_available", lambda: False)()]


COMPARE = "compare"  # the stage of a comparison job: `python -m hanorec compare` with the job's args


def commands_for(stage: str, sft_run: str | None = None) -> list[str]:
    """The CLI commands of a job: SFT is `run` (SFT + evaluation); a preference variant trains SFT in the
    same folder first (`sft`, a no-op once finished) then `pref`, or only `pref` on another run's SFT model;
    a comparison is `compare` (hanorec.pipeline.run_comparison, resumable)."""
    if stage == "SFT":
        return ["run"]
    if stage == COMPARE:
        return [COMPARE]
    if stage not in stages():
        raise JobError(f"stage {stage!r} is not one of {list(stages())}")
    return ["pref"] if sft_run else ["sft", "pref"]


def stage_of(command: str, cfg) -> str:
    """The stage folder a CLI command trains into."""
    return runs.SFT_STAGE if command in ("run", "sft") else cfg.pref.method


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class JobManager:
    """Queue and run training jobs in the background under `runs_dir` (see the module docstring)."""

    def __init__(
        self,
        runs_dir: str | Path,
        *,
        device: str | None = None,
        poll_s: float = 1.0,
        autostart: bool = True,
        python: str = sys.executable,
        env: dict | None = None,
        in_process: bool | None = None,
        chunk_steps: int | None = None,
        chunk_seconds: float | None = None,
        gpu_duration_s: int | None = None,
        max_queued: int | None = None,
        max_per_owner: int | None = None,
        plugins: list[str] | None = None,
        public: bool = False,
        handler_gpu: bool = False,
        bridge_wait_s: float = 600.0,
    ):
        """max_queued: jobs waiting at most (None: no cap); max_per_owner: jobs waiting or running per visitor
        (the CLIENT of the request: its address or login; without one, per owner token).
        plugins: None: a job's pref.plugins is what its overrides say (a notebook or the CLI's own operator);
        a list (the app: its operator's --plugins folder, or []): every job records exactly these, and
        overrides or a base config naming others are refused, so no request chooses what a job imports.
        public: messages and log tails are shown to strangers: no absolute path of this machine, no traceback.
        in_process: run jobs in a thread of this process through train_in_chunks (None: on ZeroGPU only);
        chunk_steps / chunk_seconds: each GPU call's budget (default: half of gpu_duration_s, 60 s).
        handler_gpu: in-process jobs hand their GPU calls to a hanorec.spaces.GpuBridge per job (bridge_for),
        which the visitor's event handler serves, so every call is charged to that visitor (a Space's ZeroGPU);
        a call no page takes within bridge_wait_s stops the job (resume continues from its checkpoint)."""
        from hanorec import spaces

        self.in_process = spaces.on_zero_gpu() if in_process is None else in_process
        self.chunking = {
            "max_steps_per_call": chunk_steps,
            "max_seconds_per_call": chunk_seconds,
            "gpu_duration_s": gpu_duration_s or spaces.DEFAULT_DURATION_S,
        }
        self._stops: dict[str, threading.Event] = {}
        self.handler_gpu, self.bridge_wait_s = handler_gpu, bridge_wait_s
        self._bridges: dict = {}
        self._device_env = device_env(device)
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.max_queued = max_queued
        self.max_per_owner = max_per_owner
        self.plugins = None if plugins is None else [str(x) for x in plugins]
        self.public = public
        self.python = python
        self.env = dict(env or {})
        self._procs: dict[str, subprocess.Popen] = {}
        self._closed = threading.Event()
        self._thread = None
        if autostart:
            self._thread = threading.Thread(target=self._loop, args=(poll_s,), daemon=True, name="hanorec-jobs")
            self._thread.start()

    # ---- submitting ----------------------------------------------------------------------------
    def submit(
        self,
        overrides: dict | list[str] | None = None,
        *,
        stage: str = "SFT",
        config: str | Path | None = None,
        name: str | None = None,
        sft_run: str | Path | None = None,
        args: list[str] | None = None,
        owner: str | None = None,
        client: str | None = None,
    ) -> str:
        """Queue a run: the resolved config (preset file <- stage's variant <- overrides) goes to
        <runs_dir>/<name>/config.yaml; returns the job id (the run folder's name). ConfigError for bad values,
        ModelError for a backbone that is neither a preset, a folder nor a cached id, JobError for a taken name
        or a full queue. owner: the launching browser's token (only a hash is stored); stop and resume with
        another token are refused. Everything is checked before the run folder exists, and a failure while
        writing it removes it, so a refused launch leaves nothing queued.

        stage "compare" queues a comparison (one job: SFT and every method per task and seed, see
        hanorec.pipeline.run_comparison); ``args`` are its CLI arguments (``--seeds=0,1``, ``--tasks=hit3``,
        ``--variants=DPO,IPO``, ``--from-sft=<run>``) and its folder holds comparison.json when it finishes."""
        from hanorec.config import load_config, parse_overrides
        from hanorec.models import check_model_name

        commands = commands_for(stage, sft_run)
        over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
        if self.handler_gpu and (name is None or name not in self._bridges):
            raise JobError(
                "on this ZeroGPU Space a job trains from the ZeroGPU tab, where each GPU call is made (and paid "
                "for) by your own request"
            )
        if stage == COMPARE and self.in_process:
            raise JobError("a comparison runs as a CLI subprocess; on this Space run `python -m hanorec compare`")
        if args and stage != COMPARE:
            raise JobError("only a comparison job takes command-line arguments")
        if stage not in ("SFT", COMPARE):
            from hanorec import methods

            over = _merge({"pref": methods.variant_of(stage)}, over)
        if sft_run:
            sft = Path(sft_run).resolve()
            if runs.latest_checkpoint(sft / runs.SFT_STAGE) is None:
                raise JobError(f"run {sft} has no SFT checkpoint to start {stage} from")
            over = _merge(over, {"pref": {"sft_run": str(sft)}})
        name = name or self._new_name(stage)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise JobError(f"run name {str(name)[:120]!r} may use letters, digits, '.', '_' and '-' only")
        run = self.runs_dir / name
        if os.path.lexists(run):
            raise JobError(f"a run named {name!r} already exists in {self.runs_dir}")
        over = _merge(over, {"output_dir": str(run)})
        if self.plugins is not None:  # the operator's plug-ins, never a request's
            asked = (over.get("pref") or {}).get("plugins") if isinstance(over.get("pref"), dict) else None
            if asked not in (None, self.plugins):
                raise JobError("pref.plugins cannot be set by a request; the app's operator names the plug-in "
                               "folder at start (python app/main.py --plugins DIR)")  # fmt: skip
            over = _merge(over, {"pref": {"plugins": list(self.plugins)}})
        cfg = load_config(config, over)
        check_model_name(cfg.model.name)  # form and local cache, before anything is queued
        data = Path(cfg.data.path)
        if not data.is_dir():
            raise JobError(f"dataset folder {cfg.data.path} does not exist")
        cfg.data.path = str(data.resolve())
        client = client if client is not None else CLIENT.get()
        with _lock(self.runs_dir):
            self._check_caps(owner_key(owner), owner_key(client))
            try:
                run.mkdir(parents=False)  # under the lock: of two launches with one name, the second gets this
            except FileExistsError:
                raise JobError(f"a run named {name!r} already exists in {self.runs_dir}") from None
            try:
                cfg.save(run / runs.CONFIG_FILE)
                job = {
                    "stage": stage,
                    "commands": commands,
                    "args": [str(a) for a in (args or [])],
                    "cwd": str(Path.cwd()),
                    "device": self.device,
                    "submitted": time.time(),
                    "owner": owner_key(owner),
                    "client": owner_key(client),
                }
                runs._write_json(run / JOB_FILE, job)
                runs.write_status(run, "queued", queued_at=time.time(), stage=stage)
            except BaseException:
                shutil.rmtree(run, ignore_errors=True)  # never half a job in the queue
                raise
        self.tick()
        return name

    def _check_caps(self, owner: str | None, client: str | None = None) -> None:
        """JobError when the queue is full, or when this visitor already has its share waiting or running
        (the caller holds the queue lock, so two launches at once cannot both take the last place). A visitor
        is the request's client (address or login) when known, else its owner token."""
        field_, who = ("client", client) if client is not None else ("owner", owner)
        if self.max_queued is None and (self.max_per_owner is None or who is None):
            return
        queued = mine = 0
        for run in self._job_dirs():
            state = runs.read_status(run).get("status")
            if state not in ("queued", "running"):
                continue
            queued += state == "queued"
            if who is not None and self.max_per_owner is not None:
                try:
                    mine += read_job(run).get(field_) == who
                except JobError:
                    pass
        if self.max_queued is not None and queued >= self.max_queued:
            raise JobError(
                f"the queue is full ({queued} jobs waiting, at most {self.max_queued}); launch again when one has started"
            )
        if who is not None and self.max_per_owner is not None and mine >= self.max_per_owner:
            whom = "this visitor (address or login)" if field_ == "client" else "this browser"
            raise JobError(
                f"{whom} already has {mine} jobs waiting or running (at most {self.max_per_owner}); "
                "wait for one to end or stop one"
            )

    def _new_name(self, stage: str) -> str:
        base = time.strftime("%Y%m%d-%H%M%S") + "-" + runs.stage_slug(stage).replace("_", "-")
        name, i = base, 2
        while os.path.lexists(self.runs_dir / name):
            name, i = f"{base}-{i}", i + 1
        return name

    # ---- reading back ------------------------------------------------------------------------
    def _run(self, job_id: str) -> Path:
        """The job's run folder: a real folder directly in runs_dir (a symbolic link is never followed)."""
        if not isinstance(job_id, str) or not NAME.fullmatch(job_id):
            raise JobError(f"no job named {str(job_id)[:120]!r} in {self.runs_dir}")
        run = self.runs_dir / job_id
        if run.is_symlink():
            raise JobError(f"{run} is a symbolic link; jobs are never run or read through links")
        if not _real_dir(run) or not (run / JOB_FILE).is_file():
            raise JobError(f"no job named {job_id!r} in {self.runs_dir}")
        return run

    def queue(self) -> list[str]:
        """Queued job ids, next to start first."""
        queued = []
        for run in self._job_dirs():
            st = runs.read_status(run)
            if st.get("status") == "queued":
                at = st.get("queued_at", 0.0)
                queued.append((at if isinstance(at, (int, float)) else 0.0, run.name))
        return [name for _, name in sorted(queued)]

    def running(self) -> str | None:
        """The run training now in runs_dir, if any: a job, or a CLI run started by hand into this folder
        (it holds the device too, so the queue waits for it)."""
        for run in sorted(self.runs_dir.iterdir()):
            if _real_dir(run) and (run / runs.STATUS_FILE).is_file() and runs.read_status(run).get("status") == "running":
                return run.name
        return None

    def _job_dirs(self) -> list[Path]:
        """Real folders holding a job.json directly in runs_dir: symbolic links are skipped, never followed."""
        return [p for p in sorted(self.runs_dir.iterdir()) if _real_dir(p) and (p / JOB_FILE).is_file()]

    def jobs(self) -> list[JobStatus]:
        """Every job: the running one, then the queue in order, then the rest newest first. A job whose
        folder cannot be read is listed with state 'unreadable' and its sentence; the others are unaffected."""
        self.tick()
        out = []
        for p in self._job_dirs():
            try:
                out.append(self.status(p.name, tick=False, detail=False))
            except (JobError, OSError, ValueError) as e:
                out.append(JobStatus(p.name, p, UNREADABLE, stage="?", message=self.shown(str(e))))
        order = {"running": 0, "queued": 1}
        return sorted(
            out,
            key=lambda s: (order.get(s.state, 2), s.position or 0, -runs._mtime(s.run_dir / runs.STATUS_FILE)),
        )

    def status(self, job_id: str, *, tick: bool = True, detail: bool = True) -> JobStatus:
        """A job's state from its run folder; with detail (or while it runs) its progress, metrics and log."""
        if tick:
            self.tick()
        run = self._run(job_id)
        job = read_job(run)
        st = runs.read_status(run)
        state = st.get("status", "failed")
        out = JobStatus(job_id, run, state, stage=str(job.get("stage", "SFT")), message=str(st.get("message", "")))
        out.commands = list(job.get("commands", []))
        if detail:
            out.log_tail = log_tail(run)
        if state == "queued":
            q = self.queue()
            out.position = q.index(job_id) + 1 if job_id in q else None
            out.message, out.log_tail = self.shown(out.message), self.shown(out.log_tail)
            return out
        out.command = st.get("command")
        if not detail and state != "running":
            out.message = self.shown(out.message)
            return out
        try:
            cfg = runs.read_config(run)
        except Exception:  # noqa: BLE001 - a hand-edited config must not hide the job
            cfg = None
        if cfg is not None and out.command == COMPARE:  # progress: which part, and that part's training steps
            if st.get("parts"):
                out.message = out.message or f"part {st.get('part')} of {st['parts']}: {st.get('current', '')}"
            if st.get("stage_dir"):
                out.metrics = runs.read_metrics(run, st["stage_dir"])
                if out.metrics:
                    last = out.metrics[-1]
                    out.step, out.total = int(last["step"]), int(last.get("total_steps") or 0) or None
        elif cfg is not None and out.command:
            stage_dir = stage_of(out.command, cfg)
            out.metrics = runs.read_metrics(run, stage_dir)
            section = cfg.sft if stage_dir == runs.SFT_STAGE else cfg.pref
            out.total = section.max_steps
            if out.metrics:
                last = out.metrics[-1]
                out.step = int(last["step"])
                out.total = int(last.get("total_steps") or out.total or 0) or None
                out.epoch, out.elapsed_s = last.get("epoch"), last.get("elapsed_s")
        if state == "failed" and not out.message and detail:
            out.message = last_error(run)
        if self.public:  # strangers read these: no path of this machine, no traceback
            out.message, out.log_tail = self.shown(out.message), self.shown(out.log_tail)
        return out

    def shown(self, text: str) -> str:
        """Text as a stranger may read it (public managers): the runs folder as runs/, other absolute paths
        by their last component, tracebacks dropped (hanorec.paths.redact)."""
        from hanorec.paths import redact

        return redact(text, {self.runs_dir: "runs"}) if self.public else text

    def wait(self, job_id: str, timeout: float = 600.0, states=("finished", "stopped", "failed")) -> JobStatus:
        """Block until the job reaches one of `states` (notebooks and tests); JobError on timeout."""
        end = time.time() + timeout
        while True:
            st = self.status(job_id)
            if st.state in states:
                return st
            if time.time() > end:
                raise JobError(f"job {job_id} is still {st.state} after {timeout:.0f} s")
            time.sleep(0.2)

    # ---- control -----------------------------------------------------------------------------
    def owned_by(self, job_id: str, owner: str | None) -> bool:
        """True when `owner` may stop or resume the job: None (a local caller: the notebook, the CLI) always
        may; a token may when it launched the job, or when nobody owns it (a job queued without a token)."""
        if owner is None:
            return True
        recorded = read_job(self._run(job_id)).get("owner")
        return recorded is None or recorded == owner_key(owner)

    def _check_owner(self, job_id: str, owner: str | None, verb: str) -> None:
        if not self.owned_by(job_id, owner):
            raise JobError(f"job {job_id} was launched from another browser; only that browser can {verb} it")

    def stop(self, job_id: str, owner: str | None = None) -> JobStatus:
        """A queued job leaves the queue; a running one gets SIGTERM (checkpoint after this step, then stop).
        owner: the caller's token; a job launched with another token is refused (JobError)."""
        run = self._run(job_id)
        self._check_owner(job_id, owner, "stop")
        with _lock(self.runs_dir):
            st = runs.read_status(run)
            if st["status"] == "queued":
                runs.write_status(run, "stopped", message="removed from the queue before it started")
            elif st["status"] == "running" and st.get("in_process"):
                event = self._stops.get(job_id)
                if event is not None:
                    event.set()  # the running GPU call ends at its next step, with a checkpoint
                    (run / STOP_FLAG).touch()  # seen by a call running in ZeroGPU's worker process
                else:  # started by an app that is gone: nothing runs it any more
                    runs.write_status(run, "stopped", message="the app that ran it stopped", in_process=None)
            elif st["status"] == "running":
                pid = st.get("runner_pid") or st.get("pid")
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except (ProcessLookupError, TypeError):
                    pass
            else:
                raise JobError(f"job {job_id} is {st['status']}, not running or queued")
        return self.status(job_id)

    def resume(self, job_id: str, owner: str | None = None) -> JobStatus:
        """Queue a stopped or failed job again with the same commands; training resumes from its checkpoint."""
        run = self._run(job_id)
        self._check_owner(job_id, owner, "resume")
        with _lock(self.runs_dir):
            self._check_caps(owner_key(owner), owner_key(CLIENT.get()))
            st = runs.read_status(run)
            if st["status"] not in ("stopped", "failed"):
                raise JobError(f"job {job_id} is {st['status']}; only a stopped or failed job can be resumed")
            runs.write_status(run, "queued", queued_at=time.time(), message="", runner_pid=None)
        return self.status(job_id)

    def tick(self) -> str | None:
        """Start the next queued job when none is running; returns the job started, if any."""
        for name, proc in list(self._procs.items()):
            if proc.poll() is not None:  # reap a finished runner (no zombie reads as alive)
                self._procs.pop(name, None)
        with _lock(self.runs_dir):
            if self.running() is not None:
                return None
            for name in self.queue():
                run = self.runs_dir / name
                try:
                    job = read_job(run)
                except JobError as e:  # a damaged job leaves the queue with its sentence; the next one starts
                    runs.write_status(run, "failed", message=str(e))
                    continue
                return self._start(run, job)
            return None

    def _start(self, run: Path, job: dict) -> str:
        """Start a queued job (the caller holds the queue lock)."""
        if self.in_process:
            return self._start_in_process(run)
        cwd = job.get("cwd")
        log = open(run / LOG_FILE, "a")
        env = {**default_env(), **os.environ, **self._device_env, **self.env, "PYTHONUNBUFFERED": "1"}
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [self.python, "-m", "hanorec.jobs", str(run)],
            cwd=cwd if isinstance(cwd, str) and Path(cwd).is_dir() else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in the app's terminal does not reach the run
        )
        log.close()
        self._procs[run.name] = proc
        runs.write_status(run, "running", pid=proc.pid, runner_pid=proc.pid, started=time.time(), command=None)
        return run.name

    def _start_in_process(self, run: Path) -> str:
        """ZeroGPU: the job in a thread of this process (the caller holds the queue lock)."""
        stop = self._stops[run.name] = threading.Event()
        runs.write_status(run, "running", pid=os.getpid(), runner_pid=None, in_process=True,
                          started=time.time(), command=None)  # fmt: skip

        bridge = self.bridge_for(run.name) if self.handler_gpu else None
        (run / STOP_FLAG).unlink(missing_ok=True)

        def target():
            try:
                run_job_chunked(run, stop, **self.chunking, bridge=bridge)
            finally:
                self._stops.pop(run.name, None)

        threading.Thread(target=target, daemon=True, name=f"hanorec-job-{run.name}").start()
        return run.name

    def bridge_for(self, job: str):
        """The GpuBridge that carries job's GPU calls to the event handler serving it (handler_gpu)."""
        from hanorec import spaces

        if job not in self._bridges:
            self._bridges[job] = spaces.GpuBridge(wait_s=self.bridge_wait_s)
        return self._bridges[job]

    def close(self) -> None:
        """Stop checking the queue (running jobs go on; a new JobManager picks the queue up again)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the scheduler must outlive one bad run folder
                import logging

                logging.getLogger("hanorec.jobs").exception("job scheduler")



def _real_dir(path: Path) -> bool:
    """A folder that is not a symbolic link (is_dir alone follows links)."""
    return not path.is_symlink() and path.is_dir()


@contextmanager
def _lock(runs_dir: Path):
    """Queue changes and status writes of jobs are serialised across processes (app, runners)."""
    with open(Path(runs_dir) / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def log_tail(run: Path, n_chars: int = 4000) -> str:
    path = Path(run) / LOG_FILE
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - n_chars))
        text = fh.read().decode("utf-8", "replace")
    return text.replace("\r", "\n")


def last_error(run: Path) -> str:
    """The CLI's own 'error: ...' sentence from the job's log, else its last line."""
    lines = [ln.strip() for ln in log_tail(run, 20000).splitlines() if ln.strip()]
    errors = [ln[len("error: ") :] for ln in lines if ln.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "")


# ------------------------------------------------------------------------------------------------
# the runner: `python -m hanorec.jobs <run folder>`
# ------------------------------------------------------------------------------------------------
def run_job(run_dir: str | Path) -> int:
    """Run a job's CLI commands one after the other; SIGTERM is passed on to the command running now and
    no further command starts. The final status is the CLI's own, or stopped / failed when it could not say."""
    run = Path(run_dir).resolve()
    job = json.loads((run / JOB_FILE).read_text())
    state = {"stop": False, "child": None}

    def on_term(signum, frame):
        state["stop"] = True
        if state["child"] is not None and state["child"].poll() is None:
            state["child"].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    rc = 0
    for command in job["commands"]:
        if state["stop"]:  # SIGTERM between two commands
            _final(run, "stopped", f"stopped before {command}; resume runs it")
            return 0
        argv = [sys.executable, "-m", "hanorec", command, f"--config={run / runs.CONFIG_FILE}", *job.get("args", [])]
        print(f"$ python {' '.join(argv[1:])}", flush=True)
        with _lock(run.parent):
            runs.write_status(run, "running", command=command, pid=os.getpid(), runner_pid=os.getpid())
        state["child"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if state["stop"]:  # SIGTERM arrived while the child was starting
            state["child"].send_signal(signal.SIGTERM)
        rc = state["child"].wait()
        st = runs.read_status(run)
        if rc != 0:
            if state["stop"] and rc < 0:
                _final(run, "stopped", "stopped before training started")
            else:
                _final(run, "failed", st.get("message") or last_error(run) or f"{command} exited with status {rc}")
            return rc
        if st.get("status") == "stopped" or state["stop"]:
            _final(run, "stopped", st.get("message") or "stopped on request")
            return 0
    _final(run, "finished", "")
    return rc


def run_job_chunked(
    run_dir: str | Path,
    stop: threading.Event | None = None,
    *,
    max_steps_per_call: int | None = None,
    max_seconds_per_call: float | None = None,
    gpu_duration_s: int | None = None,
    bridge=None,
) -> str:
    """A job's commands in this process (ZeroGPU): training through hanorec.spaces.train_in_chunks, each
    call resuming from the newest checkpoint, then the command's evaluation in one more GPU call; the same
    run folder, status and log as run_job. Returns the final status (finished, stopped or failed)."""
    from hanorec import pipeline, spaces
    from hanorec.progress import StopRequested

    run = Path(run_dir).resolve()
    job = json.loads((run / JOB_FILE).read_text())
    stop = stop or threading.Event()
    duration = gpu_duration_s or spaces.DEFAULT_DURATION_S

    def log(line: str) -> None:
        with open(run / LOG_FILE, "a") as fh:
            fh.write(line + "\n")

    for command in job["commands"]:
        if stop.is_set():
            _final(run, "stopped", f"stopped before {command}; resume runs it")
            return "stopped"
        log(f"$ python -m hanorec {command} --config={run / runs.CONFIG_FILE}  (in the app, in ZeroGPU calls)")
        with _lock(run.parent):
            runs.write_status(run, "running", command=command, pid=os.getpid(), in_process=True)
        try:
            cfg = runs.read_config(run)
            from hanorec import methods

            cfg.pref.options = methods.activate(cfg.pref)  # this thread trains: the operator's plug-ins, if any
            data = pipeline.prepare_data(cfg, should_stop=stop.is_set)
            if command in ("run", "sft"):
                def train(budget, cfg=cfg, data=data):
                    return pipeline.run_sft(cfg, data, should_stop=_either(budget, stop))[1]
            else:
                def train(budget, cfg=cfg, data=data):
                    return pipeline.run_preference(
                        cfg, data, should_stop=stop.is_set, train_should_stop=_either(budget, stop)
                    )[1]
            if bridge is not None:  # the call crosses into ZeroGPU's worker process: picklable, by name
                train = functools.partial(_train_in_gpu_call, str(run), command)
            chunked = spaces.train_in_chunks(
                train, max_steps_per_call=max_steps_per_call, max_seconds_per_call=max_seconds_per_call,
                gpu_duration_s=duration, should_stop=stop.is_set, bridge=bridge,
                on_chunk=lambda i, r: log(f"GPU call {i} ({duration} s): step {r.global_step}/{r.total_steps}"),
            )  # fmt: skip
            if chunked.last.stopped_early and chunked.last.global_step < chunked.last.total_steps:
                _final(run, "stopped", f"stopped at step {chunked.last.global_step}/{chunked.last.total_steps}; "
                       "resume continues from the last checkpoint")  # fmt: skip
                return "stopped"
            finish = {"run": pipeline.run_pipeline, "pref": pipeline.run_preference_pipeline}.get(command)
            if finish is not None:  # the evaluation (training is complete, so the resume trains nothing)
                if bridge is not None:  # the visitor's handler makes the call (hanorec.spaces.GpuBridge)
                    result = bridge.submit(_evaluate_in_gpu_call, (str(run), command), duration_s=duration,
                                           label="evaluation")  # fmt: skip
                else:
                    result = spaces.gpu_call(finish, duration)(cfg, should_stop=stop.is_set, print_fn=log)
                if result.get("stopped_early"):
                    _final(run, "stopped", "stopped during evaluation; resume evaluates again")
                    return "stopped"
        except StopRequested as e:
            _final(run, "stopped", f"stopped during {e.stage}; resume runs it again")
            return "stopped"
        except TimeoutError as e:  # a GPU call no visitor's page took (GpuBridge): keep the checkpoint
            log(f"stopped: {e}")
            _final(run, "stopped", f"{e}; resume continues from the last checkpoint")
            return "stopped"
        except Exception as e:  # noqa: BLE001 - a thread of the app: say why in the job, never die silently
            log(f"error: {e}")
            _final(run, "failed", str(e))
            return "failed"
    _final(run, "finished", "")
    return "finished"


STOP_FLAG = ".stop-request"  # a stop request a GPU call in another process can see (ZeroGPU's worker)


def _stop_flag(run: Path):
    def should_stop() -> bool:
        return (run / STOP_FLAG).exists()

    return should_stop


def _train_in_gpu_call(run_dir: str, command: str, budget):
    """One training call of a job, from its run folder alone (ZeroGPU pickles a call's arguments to its
    worker process, so no closure, event or model crosses): the configuration and data are read again, the
    stage resumes from its newest checkpoint, stops at the budget or at the run's stop flag, and returns the
    TrainResult."""
    from hanorec import pipeline

    run = Path(run_dir)
    stop = _stop_flag(run)
    cfg = runs.read_config(run)
    data = pipeline.prepare_data(cfg, should_stop=stop)

    def either() -> bool:
        return budget() or stop()

    if command in ("run", "sft"):
        return pipeline.run_sft(cfg, data, should_stop=either)[1]
    return pipeline.run_preference(cfg, data, should_stop=stop, train_should_stop=either)[1]


def _evaluate_in_gpu_call(run_dir: str, command: str) -> dict:
    """The evaluation call of a job (training is complete, so the resume trains nothing), from its run folder
    alone; its lines go to the job's log file. Returns the results dict (plain data)."""
    from hanorec import pipeline

    run = Path(run_dir)

    def log(line: str) -> None:
        with open(run / LOG_FILE, "a") as fh:
            fh.write(line + "\n")

    finish = {"run": pipeline.run_pipeline, "pref": pipeline.run_preference_pipeline}[command]
    return finish(runs.read_config(run), should_stop=_stop_flag(run), print_fn=log)


def _either(budget, stop: threading.Event):
    """One GPU call's should_stop: its budget (always polled, it counts steps) or the app's stop request."""

    def should_stop() -> bool:
        return budget() or stop.is_set()

    return should_stop


def _final(run: Path, status: str, message: str) -> None:
    with _lock(run.parent):
        runs.write_status(run, status, message=message, runner_pid=None, in_process=None, ended=time.time())


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1]))


# ---- what a form may ask for ---------------------------------------------------------------------------
# The free-text "more overrides" field of a form takes only these keys: pref.options.* (a method's own knobs,
# checked by the method), and these numbers, each with its range (minimum, maximum, whole number). Anything
# else (a path, a backbone, the data, plug-ins, threads, checkpoints) is refused with one sentence naming it.
OVERRIDE_NUMBERS: dict[str, tuple[float, float, bool]] = {
    "pref.beta": (1e-6, 1000, False),
    "pref.label_smoothing": (0, 0.5, False),
    "pref.noise_sigma": (0, 100, False),
    "pref.sft_weight": (0, 100, False),
    "pref.lr": (0, 10, False),
    "pref.weight_decay": (0, 10, False),
    "pref.warmup_ratio": (0, 1, False),
    "pref.max_grad_norm": (0, 10_000, False),
    "pref.epochs": (0.01, 100, False),
    "pref.max_steps": (1, 2000, True),
    "pref.batch_size": (1, 64, True),
    "pref.grad_accum": (1, 64, True),
    "pref.k_negatives": (1, 20, True),
    "pref.hardness_k": (1, 100, True),
    "pref.max_pairs": (1, 1_000_000, True),
    "pref.pair_seed": (0, 2**32 - 1, True),
    "eval.batch_size": (1, 64, True),
    "eval.max_new_tokens": (1, 256, True),
    "eval.sample_temperature": (0, 100, False),
    "eval.sample_top_p": (0, 1, False),
    "eval.sample_top_k": (0, 1000, True),
    "eval.paper_max_examples": (1, 100_000, True),
    "eval.catalogue_items": (1, 100_000, True),
    "eval.catalogue_chunk": (1, 1024, True),
}
# and these switches, true or false (the modality meter doubles a comparison's evaluation, not its training)
OVERRIDE_SWITCHES = ("eval.image_ablation",)
MAX_OVERRIDE_TEXT = 2000  # characters of a free-text override field
OPTION_KEY = re.compile(r"pref\.options\.[A-Za-z_][A-Za-z0-9_]{0,63}")


def _number(value, label: str, lo: float, hi: float, integer: bool):
    """A finite number in [lo, hi] (whole when asked) from a form or a word, else JobError naming it."""
    if isinstance(value, bool):
        raise JobError(f"{label} = {value!r} is not a number")
    try:
        x = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise JobError(f"{label} = {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(x):
        raise JobError(f"{label} = {str(value)[:40]} is not a finite number")
    if integer and not x.is_integer():
        raise JobError(f"{label} = {x:g} is not a whole number")
    if not lo <= x <= hi:
        raise JobError(f"{label} = {x:g} is out of range: it must be between {lo:g} and {hi:g}")
    return int(x) if integer else x


def checked_overrides(text: str | list[str] | None, *, max_steps: int | None = None) -> dict:
    """A free-text override field (``--pref.options.epsilon=0.2 --pref.max_steps=40``) as config overrides,
    through the allow-list above: pref.options.NAME (a number or true/false; the method checks the name and
    range) and the numbers of OVERRIDE_NUMBERS within their ranges (``max_steps`` lowers pref.max_steps' cap).
    Anything else is refused with one sentence (JobError) naming the key."""
    from hanorec.config import ConfigError, parse_overrides
    from hanorec.methods import MAX_OPTION

    if not text:
        return {}
    if isinstance(text, str):
        if len(text) > MAX_OVERRIDE_TEXT:
            raise JobError(f"the overrides field holds {len(text)} characters; at most {MAX_OVERRIDE_TEXT}")
        words = text.split()
    else:
        words = [str(w) for w in text]
    checked: list[str] = []
    for word in words:
        key, sep, value = word.removeprefix("--").partition("=")
        if not word.startswith("--") or not sep:
            raise JobError(f"override {word[:60]!r} must look like --pref.options.NAME=VALUE")
        if OPTION_KEY.fullmatch(key):
            if value.strip().lower() not in ("true", "false"):
                _number(value, key, -MAX_OPTION, MAX_OPTION, False)
        elif key in OVERRIDE_NUMBERS:
            lo, hi, integer = OVERRIDE_NUMBERS[key]
            if key == "pref.max_steps" and max_steps is not None:
                hi = min(hi, max_steps)
            value = str(_number(value, key, lo, hi, integer))
        elif key in OVERRIDE_SWITCHES:
            value = value.strip().lower()
            if value not in ("true", "false"):
                raise JobError(f"{key} = {value[:40]!r} must be true or false")
        else:
            raise JobError(
                f"{key[:60]} cannot be set here: this field takes only pref.options.*, the numeric pref.* and "
                "eval.* settings and eval.image_ablation (python app/main.py --help lists them)"
            )
        checked.append(f"--{key}={value}")
    try:
        return parse_overrides(checked)
    except ConfigError as e:
        raise JobError(str(e)) from None


@dataclass(frozen=True)
class CompareLimits:
    """How big a comparison a form may launch (in both modes; demo mode's are smaller): seeds, methods, the
    models trained in all (seeds x (methods + SFT)), steps per model, test prompts and catalogue items."""

    seeds: int = 10
    methods: int = 10
    models: int = 60
    steps: int = 2000
    eval_examples: int = 5000
    catalogue_items: int = 20_000

    def describe(self) -> str:
        return (f"at most {self.seeds} seeds, {self.methods} methods, {self.models} models trained in all, "
                f"{self.steps} steps per model, {self.eval_examples} test prompts and {self.catalogue_items} "
                "catalogue items")  # fmt: skip


COMPARE_LIMITS = {False: CompareLimits(), True: CompareLimits(seeds=2, methods=3, models=8, steps=60,
                                                               eval_examples=100, catalogue_items=500)}  # fmt: skip
MAX_SEED = 2**32 - 1


def parse_seeds(seeds: str | list[int], limit: int) -> list[int]:
    """"0,1,2" or ints -> the seeds, each once, each in [0, 2^32 - 1], at most ``limit``; JobError else."""
    if isinstance(seeds, str):
        if len(seeds) > 20 * limit + 20:
            raise JobError(f"seeds: at most {limit} seeds, comma-separated (e.g. 0,1,2)")
        words = [w for w in seeds.replace(" ", "").split(",") if w]
    else:
        words = list(seeds)
    if len(words) > limit:
        raise JobError(f"seeds: {len(words)} seeds asked for; a comparison here takes at most {limit}")
    out = []
    for w in words:
        try:
            out.append(_number(w, "seed", 0, MAX_SEED, True))
        except JobError:
            raise JobError(f"seeds must be comma-separated whole numbers from 0 to {MAX_SEED} (e.g. 0,1,2); "
                           f"{str(w)[:40]!r} is not one") from None  # fmt: skip
    if not out or len(set(out)) != len(out):
        raise JobError("give at least one seed, each once (e.g. 0,1,2)")
    return out


def comparison_request(
    *,
    dataset: str | Path | None,
    task: str,
    methods: list[str],
    seeds: str | list[int],
    sft_run: str | Path | None = None,
    sft_steps: int | None = None,
    pref_steps: int | None = None,
    beta: float | None = None,
    lr: float | None = None,
    sigma: float | None = None,
    catalogue_items: int | None = None,
    eval_examples: int | None = None,
    extra: str | list[str] | None = None,
    limits: CompareLimits | None = None,
) -> tuple[dict, list[str], Path | None]:
    """What a comparison job is made of: (config overrides, `compare` CLI arguments, base config file).

    methods: names from hanorec.report.preference_methods (the registry's rows); seeds: "0,1,2" or ints;
    sft_run: a finished run whose SFT model every seed starts from (its config.yaml is the base config, so
    the data, task and model are that run's); else SFT is trained per seed (``sft_steps`` steps). The
    comparison evaluates with the catalogue protocol (``catalogue_items`` sampled unseen items, None = all)
    and the ranking protocol. ``extra``: further overrides for every method, through the allow-list of
    checked_overrides (e.g. ``--pref.options.epsilon=0.2``). ``limits``: the sizes allowed (default
    COMPARE_LIMITS[False]). One clear sentence (JobError / ConfigError) for a bad value.
    """
    from hanorec.report import preference_methods

    limits = limits or COMPARE_LIMITS[False]
    offered = preference_methods()
    if not methods:
        raise JobError("pick at least one method to compare")
    unknown = [m for m in methods if m not in offered]
    if unknown:
        raise JobError(f"unknown method {str(unknown[0])[:60]!r}; use some of {list(offered)}")
    if len(set(methods)) > limits.methods:
        raise JobError(f"{len(set(methods))} methods asked for; a comparison here takes at most {limits.methods}")
    seeds = parse_seeds(seeds, limits.seeds)
    models = len(seeds) * (len(set(methods)) + (0 if sft_run else 1))
    if models > limits.models:
        raise JobError(f"{len(seeds)} seeds x {len(set(methods))} methods trains {models} models; a comparison "
                       f"here trains at most {limits.models}: fewer seeds or methods")  # fmt: skip
    sft_steps = _optional(sft_steps, "SFT max steps", 1, limits.steps, True)
    pref_steps = _optional(pref_steps, "preference max steps", 1, limits.steps, True)
    beta = _optional(beta, "beta", 1e-6, 1000, False)
    lr = _optional(lr, "learning rate", 0, 10, False)
    sigma = None if sigma is None else _number(sigma, "NoDO sigma", 0, 100, False)
    catalogue_items = _optional(catalogue_items, "catalogue items", 1, limits.catalogue_items, True)
    eval_examples = _optional(eval_examples, "test prompts", 1, limits.eval_examples, True)
    over: dict = {"eval": {"protocols": ["catalogue", "ranking"], "catalogue_items": catalogue_items}}
    base = None
    if sft_run:
        base = Path(sft_run).resolve() / runs.CONFIG_FILE
        if runs.latest_checkpoint(Path(sft_run) / runs.SFT_STAGE) is None:
            raise JobError(f"run {Path(sft_run).name} has no SFT checkpoint to compare from")
        runs.check_sft_dataset(sft_run, dataset)  # never swap the chosen dataset for the SFT run's
        task = runs.read_config(sft_run).task.name
    else:
        over["data"] = {"path": str(dataset)}
        over["task"] = {"name": task}
        over["sft"] = {"max_steps": int(sft_steps or limits.steps)}
    over["pref"] = {"max_steps": int(pref_steps or limits.steps)}
    over["pref"].update({k: v for k, v in (("beta", beta), ("lr", lr)) if v})
    if sigma is not None:
        over["pref"]["noise_sigma"] = sigma
    over["task"] = {**over.get("task", {}), "max_eval_examples": int(eval_examples or limits.eval_examples)}
    if extra:
        over = _merge(over, checked_overrides(extra, max_steps=limits.steps))
    args = [f"--seeds={','.join(map(str, seeds))}", f"--tasks={task}", f"--variants={','.join(methods)}"]
    if sft_run:
        args.append(f"--from-sft={Path(sft_run).resolve()}")
    return over, args, base


def _optional(value, label: str, lo: float, hi: float, integer: bool):
    """An optional form number: None (or 0: "the preset's") stays None; else _number's checks."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, (bool, str)) and isinstance(value, (int, float)) and value == 0:
        return None
    return _number(value, label, lo, hi, integer)
