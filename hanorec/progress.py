"""Progress events and stop requests shared by every long phase (data, hardness, training, evaluation).

Every event passed to an `on_log` callback is a dict with at least

    stage        "data", "hardness", "sft", a preference stage name, or "eval"
    step         units done so far in this stage (optimizer steps, examples, item batches)
    total_steps  units this stage will take, so a progress bar has something to divide by
    epoch        fractional epoch (0 outside training)
    elapsed_s    seconds since the stage started

plus the stage's own metrics (loss, lr, ...). `should_stop()` is polled between units; when it returns
True the phase raises `StopRequested` (training instead writes a checkpoint and returns).
"""

from __future__ import annotations

import time
from collections.abc import Callable

EVENT_KEYS = ("stage", "step", "total_steps", "epoch", "elapsed_s")


def make_event(stage: str, step: int, total_steps: int, *, start: float, epoch: float = 0.0, **values) -> dict:
    """The one shape of a progress event (EVENT_KEYS, then the values): training steps and validations
    (hanorec.train.loop), data preparation, hardness and evaluation (Progress) all build theirs here.
    start: the phase's time.time() at its start."""
    return {
        "stage": stage,
        "step": step,
        "total_steps": total_steps,
        "epoch": epoch,
        "elapsed_s": time.time() - start,
        **values,
    }


class StopRequested(Exception):
    """should_stop() asked a phase to end; nothing is lost (training checkpoints, the rest is recomputed)."""

    def __init__(self, stage: str, step: int = 0, total_steps: int = 0):
        self.stage, self.step, self.total_steps = stage, step, total_steps
        super().__init__(f"stopped during {stage} at {step}/{total_steps}")


class Progress:
    """One stage's progress: `tick()` after each unit emits an event and honours should_stop."""

    def __init__(
        self,
        stage: str,
        total_steps: int,
        *,
        on_log: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        step: int = 0,
    ):
        self.stage, self.total_steps, self.step = stage, int(total_steps), int(step)
        self.on_log, self.should_stop = on_log, should_stop
        self.start = time.time()

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.start

    def event(self, step: int | None = None, epoch: float = 0.0, **metrics) -> dict:
        step = self.step if step is None else step
        return make_event(self.stage, step, self.total_steps, start=self.start, epoch=epoch, **metrics)

    def emit(self, record: dict) -> None:
        if self.on_log is not None:
            self.on_log(record)

    def stop_requested(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def check(self) -> None:
        """Raise StopRequested when should_stop() says so."""
        if self.stop_requested():
            raise StopRequested(self.stage, self.step, self.total_steps)

    def tick(self, n: int = 1, **metrics) -> None:
        """n more units done: emit an event, then honour a stop request."""
        self.step += n
        self.emit(self.event(**metrics))
        self.check()
