"""Training on a Hugging Face ZeroGPU Space: a GPU exists only inside short calls decorated with
`spaces.GPU(duration=...)` (60 s by default), so a run longer than that is trained as a sequence of such
calls, each resuming from the newest checkpoint of the run folder and ending itself (with a checkpoint)
before the call's time is up.

This works because the training loop resumes bit-exactly (optimizer, scheduler, RNG state and the
position in the seeded data order are checkpointed) and polls `should_stop` after every optimizer step,
ending the run with a checkpoint when it returns True: N short calls reach the same weights as one long
run (tests/test_spaces.py).

Guarded: the `spaces` package is imported only when it is installed AND the process runs on ZeroGPU
(SPACES_ZERO_GPU set by the Space runtime). Everywhere else `train_in_chunks` calls the training
function directly, in this process, on whatever device it has.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
DEFAULT_DURATION_S = 60


def on_zero_gpu() -> bool:
    """True only on a ZeroGPU Space: the runtime's SPACES_ZERO_GPU is set and `spaces` is importable."""
    flag = os.environ.get(ZERO_GPU_ENV, "").strip().lower()
    if flag in ("", "0", "false", "no"):
        return False
    return importlib.util.find_spec("spaces") is not None


class Budget:
    """A `should_stop` for one call: True once `max_steps` optimizer steps or `max_seconds` have passed.

    The loop polls it once after every optimizer step (after any checkpoint that step was due), so with
    max_steps=k the call trains exactly k steps; the run then ends with a checkpoint."""

    def __init__(self, max_steps: int | None = None, max_seconds: float | None = None):
        if max_steps is None and max_seconds is None:
            raise ValueError("a call's budget needs max_steps or max_seconds")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps per call must be at least 1, got {max_steps}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds per call must be positive, got {max_seconds}")
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self.steps, self.start = 0, time.monotonic()

    def __call__(self) -> bool:
        self.steps += 1
        if self.max_steps is not None and self.steps >= self.max_steps:
            return True
        return self.max_seconds is not None and time.monotonic() - self.start >= self.max_seconds


def gpu_call(fn: Callable, duration_s: int = DEFAULT_DURATION_S) -> Callable:
    """`fn` run inside `spaces.GPU(duration=duration_s)` on ZeroGPU, `fn` itself everywhere else."""
    if not on_zero_gpu():
        return fn
    import spaces

    return spaces.GPU(duration=duration_s)(fn)


def _one_call(train_call: Callable, max_steps: int | None, max_seconds: float | None):
    return train_call(Budget(max_steps, max_seconds))


@dataclass
class ChunkedResult:
    calls: int
    results: list = field(default_factory=list)  # each call's TrainResult

    @property
    def last(self):
        return self.results[-1]


def train_in_chunks(
    train_call: Callable[[Callable[[], bool]], object],
    *,
    max_steps_per_call: int | None = None,
    max_seconds_per_call: float | None = None,
    gpu_duration_s: int = DEFAULT_DURATION_S,
    max_calls: int = 10_000,
    on_chunk: Callable[[int, object], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    bridge: GpuBridge | None = None,
) -> ChunkedResult:
    """Run `train_call(should_stop) -> TrainResult` again and again until training is complete.

    Each call must resume from the newest checkpoint of its run folder (pipeline.run_sft and
    pipeline.run_preference do, with resume=True) and honour should_stop (the budget counts every poll
    as a step, so give it to pipeline.run_preference as train_should_stop: its pair and hardness
    preparation polls should_stop too); a call that returns with
    `stopped_early` False has finished the run. Without an explicit budget a call stops after half of
    `gpu_duration_s`, leaving the other half for building the model, loading the checkpoint and writing
    the next one. On ZeroGPU each call runs inside `spaces.GPU(duration=gpu_duration_s)`; there, what
    train_call returns crosses a process boundary, so return the TrainResult, never the model.
    should_stop: a stop request from outside (the app's Stop button); no further call starts once it
    returns True (train_call should poll it too, so the running call ends at its next step).
    bridge: hand every call to this GpuBridge (the visitor's event handler makes it) instead of calling
    spaces.GPU from this thread.
    """
    if max_steps_per_call is None and max_seconds_per_call is None:
        max_seconds_per_call = gpu_duration_s / 2
    if bridge is not None:

        def call(*args):
            return bridge.submit(
                _one_call, args, duration_s=gpu_duration_s, label=f"training, call {out.calls + 1}"
            )
    else:
        call = gpu_call(_one_call, gpu_duration_s)
    out = ChunkedResult(calls=0)
    while out.calls < max_calls:
        result = call(train_call, max_steps_per_call, max_seconds_per_call)
        out.calls += 1
        out.results.append(result)
        if on_chunk is not None:
            on_chunk(out.calls, result)
        if not result.stopped_early or result.global_step >= result.total_steps:
            return out
        if should_stop is not None and should_stop():
            return out
    raise RuntimeError(
        f"training did not finish in {max_calls} calls (step {out.last.global_step}/{out.last.total_steps}); "
        "call train_in_chunks again to continue from the last checkpoint"
    )


# ---- the ZeroGPU runtime's rules, as data ----------------------------------------------------------------
# From the Hub's ZeroGPU page (hub-docs docs/hub/spaces-zerogpu.md, version of 2026-08: "Supported Versions",
# "Usage Tiers", "Duration Management") and the `spaces` package's own client (spaces/zero/client.py: the
# visitor is charged through the request's X-IP-Token header, read from the Gradio request of the event that
# calls the decorated function; without it the call falls back to IP-based quota).
ZERO_GPU_DOC = "https://huggingface.co/docs/hub/spaces-zerogpu"
ZERO_GPU_PYTHON = ("3.12.12", "3.10.13")
ZERO_GPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")
# included GPU seconds a day per account type (the doc's "Usage Tiers" table)
TIER_DAILY_S = {"unauthenticated": 120, "free": 300, "pro": 2400, "team": 2400, "enterprise": 3600}
IP_TOKEN_HEADER = "x-ip-token"


def tier_of(username: str | None, plan: str | None = None) -> str:
    """The quota tier the app plans for: "unauthenticated" without a login; with one, the account's plan when
    the app knows it (pro, team, enterprise), else "free" (the smallest tier a logged-in visitor can have)."""
    if not username:
        return "unauthenticated"
    plan = (plan or "").strip().lower()
    return plan if plan in TIER_DAILY_S else "free"


@dataclass(frozen=True)
class GpuPlan:
    """The GPU calls one job needs: `len(calls) - 1` training calls of `steps_per_call` steps each (the last
    one fewer) and one evaluation call, every one asking spaces.GPU for `call_s` seconds (what the visitor's
    remaining quota must cover for the call to be admitted)."""

    steps: int
    steps_per_call: int
    call_s: int
    calls: tuple[int, ...]

    @property
    def seconds(self) -> int:
        return sum(self.calls)


def plan_job(
    steps: int,
    *,
    seconds_per_step: float,
    setup_s: float = 20.0,
    eval_s: float = 20.0,
    call_cap_s: int = DEFAULT_DURATION_S,
    trainings: int = 1,
) -> GpuPlan:
    """The GPU calls for `steps` training steps (in each of `trainings` stages: 2 for SFT then a preference
    method in the same job): every call pays `setup_s` (building the model, loading the
    checkpoint, writing the next one) and trains as many steps as fit in the rest of `call_cap_s`; the call's
    duration is sized to the job (a short job asks for less than the cap), whole seconds rounded up; one more
    call of the same duration evaluates (it must also cover setup_s + eval_s)."""
    import math

    if not isinstance(steps, int) or not 1 <= steps <= 1_000_000:
        raise ValueError(f"a job's training steps must be from 1 to 1000000, got {steps}")
    if not (
        isinstance(seconds_per_step, (int, float))
        and math.isfinite(seconds_per_step)
        and seconds_per_step > 0
    ):
        raise ValueError(f"seconds per step must be a positive number, got {seconds_per_step}")
    per_call = int((call_cap_s - setup_s) // seconds_per_step)
    if per_call < 1 or setup_s + eval_s > call_cap_s:
        raise ValueError(
            f"one training step ({seconds_per_step:g} s), the call's setup ({setup_s:g} s) and the evaluation "
            f"({eval_s:g} s) do not fit in a GPU call of {call_cap_s} s"
        )
    per_call = min(per_call, steps)
    call_s = min(call_cap_s, math.ceil(max(setup_s + per_call * seconds_per_step, setup_s + eval_s)))
    n_train = math.ceil(steps / per_call)
    return GpuPlan(
        steps=steps, steps_per_call=per_call, call_s=call_s, calls=(call_s,) * (n_train * trainings + 1)
    )


def largest_fitting_steps(budget_s: float, **plan_kw) -> int:
    """The most training steps whose plan_job fits in `budget_s` GPU seconds (0 when not even one does)."""
    lo, hi = 0, 1
    while hi < 1_000_000 and plan_job(hi, **plan_kw).seconds <= budget_s:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_job(mid, **plan_kw).seconds <= budget_s else (lo, mid)
    return lo


def quota_refusal(plan: GpuPlan, tier: str, used_s: float = 0.0, **plan_kw) -> str | None:
    """None when the job's GPU seconds fit in what the visitor's tier has left today (the daily quota less
    `used_s`, what this app has already run for them); else one sentence with the figures and a size that fits."""
    if tier not in TIER_DAILY_S:
        raise ValueError(f"unknown quota tier {tier!r}; known: {', '.join(TIER_DAILY_S)}")
    left = max(0.0, TIER_DAILY_S[tier] - used_s)
    if plan.seconds <= left:
        return None
    fits = largest_fitting_steps(left, **plan_kw) if plan_kw else 0
    offer = f"; {fits} steps would fit" if fits else "; nothing fits before the quota resets"
    login = " (log in with Hugging Face for more)" if tier == "unauthenticated" else ""
    return (
        f"This job needs about {plan.seconds} GPU seconds ({len(plan.calls)} calls) but your {tier} ZeroGPU "
        f"quota has {left:.0f} s left today{login}{offer}."
    )


# ---- GPU calls made by the visitor's own event handler -----------------------------------------------------
class GpuBridge:
    """Runs a job's GPU calls in the Gradio event handler of the visitor who asked for them.

    ZeroGPU charges a call to the visitor whose request made it: `spaces.GPU` reads the Gradio request of the
    calling thread (a context variable Gradio sets for event handlers), and a call from any other thread has
    no request, so it is charged to the Space's IP-based quota or refused. The app's job threads therefore do
    not call the GPU themselves: `submit` hands the call to this bridge and waits, and the visitor's handler
    (`serve`, a generator) runs it through the decorated function and yields progress between calls.
    """

    def __init__(self, decorated: Callable | None = None, wait_s: float = 600.0):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.decorated = decorated or gpu_generator()
        self.wait_s = wait_s
        self.call_s: int | None = None  # the job's own call duration (GpuPlan.call_s), set before it starts
        self.on_call: Callable[[int], None] | None = None  # told each call's duration once it ends

    def submit(
        self, fn: Callable, args: tuple = (), kwargs: dict | None = None, *, duration_s: int, label: str = ""
    ):
        """From a job thread: run fn(*args, **kwargs) in a GPU call of duration_s seconds made by the handler
        serving this bridge, and return its result (or raise its exception). Raises TimeoutError when no
        handler takes the call within wait_s seconds (the visitor's page closed)."""
        import threading

        duration_s = int(self.call_s or duration_s)
        ticket = {"fn": fn, "args": args, "kwargs": kwargs or {}, "duration_s": duration_s, "label": label,
                  "done": threading.Event(), "result": None, "error": None}  # fmt: skip
        self._queue.put(ticket)
        if not ticket["done"].wait(self.wait_s):
            ticket["abandoned"] = True
            raise TimeoutError(f"no page took the GPU call {label!r} within {self.wait_s:.0f} s")
        if ticket["error"] is not None:
            raise ticket["error"]
        return ticket["result"]

    def serve(self, finished: Callable[[], bool], poll_s: float = 0.2):
        """In the event handler (a generator): run every GPU call the job submits, each through the decorated
        generator function, until finished() is True; yields one progress line per call."""
        import queue

        n = 0
        while True:
            try:
                ticket = self._queue.get(timeout=poll_s)
            except queue.Empty:
                if finished():
                    return
                continue
            if ticket.get("abandoned"):
                continue
            n += 1
            yield f"GPU call {n} ({ticket['duration_s']} s): {ticket['label']}".rstrip(": ")
            try:
                for kind, value in self.decorated(
                    ticket["fn"], ticket["args"], ticket["kwargs"], ticket["duration_s"]
                ):
                    if kind == "result":
                        ticket["result"] = value
            except BaseException as e:  # noqa: BLE001 - handed to the job thread, which reports it
                ticket["error"] = e
            finally:
                ticket["done"].set()
                if self.on_call is not None:
                    self.on_call(ticket["duration_s"])


def _call_duration(fn, args, kwargs, duration_s):
    """spaces.GPU's duration callable: it gets the decorated function's arguments (spaces/zero/wrappers.py,
    static_duration) and returns the seconds this call asked for, computed from the job's size."""
    return duration_s


def _gpu_task(fn, args, kwargs, duration_s):
    """The one function run inside spaces.GPU: a generator (so the handler keeps streaming while it runs)."""
    yield "started", None
    yield "result", fn(*args, **kwargs)


_DECORATED: dict = {}


def gpu_generator() -> Callable:
    """`_gpu_task` decorated with spaces.GPU(duration=_call_duration) on ZeroGPU (once, then reused: the
    package caches decorated functions), `_gpu_task` itself everywhere else. Import this module at the Space
    app's module scope and call this there, so the decoration happens at start-up as ZeroGPU expects."""
    if not on_zero_gpu():
        return _gpu_task
    if "task" not in _DECORATED:
        import spaces

        _DECORATED["task"] = spaces.GPU(duration=_call_duration)(_gpu_task)
    return _DECORATED["task"]


class GpuLedger:
    """GPU seconds this app has asked for on each visitor's behalf (keyed by the login name, or by whatever
    identity the app gives a visitor who is not logged in), over a rolling day, kept in a JSON file under the
    state root so a restart keeps it. It is the app's own upper bound (each call's requested duration): the
    Hub charges what a call actually uses, and the visitor may also have used other Spaces."""

    DAY_S = 24 * 3600

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.time):
        import threading

        self.path, self.clock = Path(path), clock
        self._lock = threading.Lock()

    def _read(self) -> dict:
        import json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def used(self, visitor: str) -> float:
        """Seconds asked for in the day that started with this visitor's first call (the Hub's quota resets
        24 hours after the first GPU use)."""
        entry = self._read().get(visitor)
        if not isinstance(entry, dict):
            return 0.0
        start, used = entry.get("start"), entry.get("used")
        if not isinstance(start, (int, float)) or not isinstance(used, (int, float)) or not used >= 0:
            return 0.0
        return float(used) if self.clock() - start < self.DAY_S else 0.0

    def add(self, visitor: str, seconds: float) -> None:
        import json

        with self._lock:
            data = self._read()
            used = self.used(visitor)
            entry = data.get(visitor) if used else None
            start = entry["start"] if isinstance(entry, dict) else self.clock()
            data[visitor] = {"start": start, "used": used + float(seconds)}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)


# the Space's tiny-preset training on a ZeroGPU slice, for the estimate before a job is queued. Assumed, not
# measured on a Space (none here): a tiny preset's optimizer step, and each call's fixed cost (attaching the
# GPU, building the model, loading and writing checkpoints). docs/space.md says how to correct them.
SPACE_PLAN = {"seconds_per_step": 0.5, "setup_s": 20.0, "eval_s": 20.0, "call_cap_s": DEFAULT_DURATION_S}


def train_on_gpu(
    manager,
    overrides: dict,
    *,
    stage: str,
    steps: int,
    visitor: str,
    tier: str,
    ledger: GpuLedger,
    sft_run: str | None = None,
    plan_kw: dict | None = None,
):
    """The Space's training action, as the event handler's generator: estimate the job's GPU seconds, refuse
    in one sentence when they exceed what the visitor's tier has left, else queue the job (owned by
    `visitor`) and run every GPU call it makes from this handler (GpuBridge.serve), yielding one line per
    call and a last line with the job's end. `manager` is a JobManager with handler_gpu=True."""
    import secrets

    plan_kw = dict(SPACE_PLAN if plan_kw is None else plan_kw)
    trainings = 1 if stage == "SFT" or sft_run else 2
    plan = plan_job(steps, trainings=trainings, **plan_kw)
    refusal = quota_refusal(plan, tier, ledger.used(visitor), trainings=trainings, **plan_kw)
    if refusal:
        yield refusal
        return
    name = f"gpu-{secrets.token_hex(4)}"
    bridge = manager.bridge_for(name)
    bridge.call_s = plan.call_s
    bridge.on_call = lambda s: ledger.add(visitor, s)
    job = manager.submit(overrides, stage=stage, name=name, sft_run=sft_run, owner=visitor)
    yield f"{job}: queued; about {plan.seconds} GPU seconds in {len(plan.calls)} calls of {plan.call_s} s"
    done = ("finished", "stopped", "failed")
    yield from bridge.serve(finished=lambda: manager.status(job).state in done)
    st = manager.status(job)
    yield f"{job}: {st.state}" + (f" ({st.message})" if st.message else "")


# ---- state that survives a restart -------------------------------------------------------------------------
STATE_ENV = "HANOREC_STATE_DIR"  # the persistent root: a mounted storage bucket on a Space


def state_root(default: str | os.PathLike = "runs") -> tuple[Path, bool, str]:
    """(runs folder, persistent?, one sentence saying so). With HANOREC_STATE_DIR set, the runs, the score
    cache (<runs>/.cache) and the owner secret (<runs>/.app-secret) live under <root>/runs; the root counts as
    persistent when it is a mount point or on another filesystem than the app's own folder (a Space's disk is
    wiped on restart; an attached storage bucket is a mounted volume)."""
    raw = os.environ.get(STATE_ENV, "").strip()
    if not raw:
        runs = Path(default).expanduser().resolve()
        return (
            runs,
            False,
            (
                f"State is kept in {runs} ({STATE_ENV} is not set): on a Space it is lost when the Space restarts."
            ),
        )
    root = Path(raw).expanduser()
    if not root.is_absolute():
        raise ValueError(f"{STATE_ENV} must be an absolute path, got {raw!r}.")
    if not root.is_dir():
        raise ValueError(f"{STATE_ENV} names {root}, which is not a folder (attach the storage there first).")
    root = root.resolve()
    app_dev = os.stat(Path(__file__).resolve().parent).st_dev
    persistent = os.path.ismount(root) or os.stat(root).st_dev != app_dev
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    how = (
        "a mounted volume: it survives a restart"
        if persistent
        else "on the app's own disk: it is lost when the Space restarts"
    )
    return runs, persistent, f"State is kept in {runs} ({STATE_ENV}), {how}."
