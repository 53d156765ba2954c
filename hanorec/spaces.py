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
    """
    if max_steps_per_call is None and max_seconds_per_call is None:
        max_seconds_per_call = gpu_duration_s / 2
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
