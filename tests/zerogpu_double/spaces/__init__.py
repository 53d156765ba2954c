"""A test double of the ZeroGPU runtime's `spaces` package, written from its source (spaces 0.51.3:
spaces/zero/decorator.py, spaces/zero/wrappers.py, spaces/zero/client.py, spaces/config.py).

What it keeps of the real package:
- `GPU(task=None, *, duration=None, size=None)`, usable bare or with keywords; outside ZeroGPU (SPACES_ZERO_GPU
  not "1"/"t"/"true") it returns the function unchanged, as `_GPU` does when `Config.zero_gpu` is False;
- generator functions get a generator wrapper, others a regular one; a decorated function is cached;
- at each call, the wrapper reads the Gradio request of the calling context (`LocalContext.request`, a context
  variable Gradio sets for event handlers: spaces/utils.py gradio_request_var), resolves a callable duration
  with the call's own arguments (wrappers.static_duration), default 60 s (client.DEFAULT_SCHEDULE_DURATION),
  and takes the visitor's token from the request's X-IP-Token header (client._get_token_and_payload).

- the arguments of a call, and every value it returns or yields, cross a process boundary (the real
  wrappers put them on multiprocessing queues to and from a forked worker): here they are pickled and
  unpickled, so a closure, a lock or an event among them fails as it would there.

What it makes strict where the real one degrades: a call with no request (from a thread that is not an event
handler) is refused here, where the real client falls back to the Space's IP-based quota; a duration over
MAX_DURATION_S is refused, as the real scheduler refuses an "illegal duration". Every call is recorded in CALLS.
"""

import inspect
import os
import pickle
import threading
from datetime import timedelta
from functools import partial, wraps

CALLS = []  # one dict per call: name, duration, thread, token, generator
DECORATED = []  # names of the functions decorated (the real package decorates at import time)
MAX_DURATION_S = 120  # the test sets the tier cap it checks against
DEFAULT_DURATION_S = 60


class ZeroGPUError(RuntimeError):
    pass


def _zero_gpu() -> bool:
    value = os.environ.get("SPACES_ZERO_GPU")
    return value is not None and value.lower() in ("1", "t", "true")


def _schedule(name, duration, args, kwargs, generator):
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    seconds = duration(*args, **kwargs) if callable(duration) else duration
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    seconds = DEFAULT_DURATION_S if seconds is None else seconds
    headers = getattr(request, "headers", None) or {}
    token = headers.get("x-ip-token") if hasattr(headers, "get") else None
    CALLS.append({"name": name, "duration": seconds, "thread": threading.current_thread().name,
                  "request": request is not None, "token": token, "generator": generator})  # fmt: skip
    if request is None:
        raise ZeroGPUError(f"{name}: called outside a Gradio event handler (no request: no X-IP-Token)")
    if seconds > MAX_DURATION_S:
        raise ZeroGPUError(
            f"{name}: the requested GPU duration ({seconds}s) is larger than the maximum allowed"
        )


def GPU(task=None, *, duration=None, size=None, **kwargs):
    if not callable(task):
        if task is not None and not isinstance(task, str):
            duration = task
        return partial(_GPU, duration=duration, size=size)
    return _GPU(task, duration, size)


def _GPU(task, duration, size):
    if not _zero_gpu():
        return task
    DECORATED.append(task.__name__)
    if inspect.isgeneratorfunction(task):

        @wraps(task)
        def gen_wrapper(*args, **kwargs):
            _schedule(task.__name__, duration, args, kwargs, True)
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # to the worker
            for value in task(*args, **kwargs):
                yield pickle.loads(pickle.dumps(value))  # back from the worker

        return gen_wrapper

    @wraps(task)
    def wrapper(*args, **kwargs):
        _schedule(task.__name__, duration, args, kwargs, False)
        args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
        return pickle.loads(pickle.dumps(task(*args, **kwargs)))

    return wrapper
