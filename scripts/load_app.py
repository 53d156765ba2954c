"""Load on the explorer: N concurrent gradio_client sessions browse users and score candidates (clean and
under noise) for a bounded time against one app process; prints the request count, the errors and the
latency percentiles per endpoint.

    .venv/bin/python scripts/load_app.py --sessions 20 --seconds 60

Requests go only to the app this script starts on 127.0.0.1; every loop is bounded in time and count.
tests/test_load.py runs it (slow) and requires zero errors.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEMO = ROOT / "assets" / "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def session(url: str, users: list[str], seconds: float, max_requests: int, seed: int, out: dict, lock) -> None:
    """One browser-like session: switch to a random user, score its candidates, draw a little noise."""
    from gradio_client import Client

    rng = random.Random(seed)
    client = Client(url, verbose=False)
    end, n = time.time() + seconds, 0
    while time.time() < end and n < max_requests:
        user = rng.choice(users)
        for name, args in (
            ("data_user", (str(DEMO), "hit3", user, "base")),
            ("noise_draw", (str(DEMO), "hit3", user, "base", rng.choice(["lora", "logits"]), 0.02, 10, n)),
        ):
            t0 = time.perf_counter()
            try:
                client.predict(*args, api_name=f"/{name}")
                ok = True
            except Exception as e:  # every error counts, whatever its type
                ok = False
                with lock:
                    out["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            with lock:
                if ok:
                    out["latency"].setdefault(name, []).append(time.perf_counter() - t0)
            n += 1


def run(sessions: int = 20, seconds: float = 60.0, max_requests: int = 200, runs_dir: str | None = None) -> dict:
    import tempfile

    from gradio_client import Client

    from app.main import build_app, make_context

    ctx = make_context([str(DEMO)], runs_dir or tempfile.mkdtemp(prefix="hanorec-load-"), "cpu")
    demo = build_app(ctx)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        users_update, *_ = Client(url, verbose=False).predict(str(DEMO), "hit3", api_name="/data_open")
        users = [c[1] if isinstance(c, (list, tuple)) else c for c in users_update["choices"]][:50]
        out: dict = {"latency": {}, "errors": []}
        lock = threading.Lock()
        threads = [
            threading.Thread(target=session, args=(url, users, seconds, max_requests, i, out, lock))
            for i in range(sessions)
        ]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 300)
        out["wall_s"] = time.time() - t0
        out["hung_sessions"] = sum(t.is_alive() for t in threads)
    finally:
        demo.close()
        if ctx.jobs is not None:
            ctx.jobs.close()
    out["sessions"] = sessions
    out["requests"] = sum(len(v) for v in out["latency"].values()) + len(out["errors"])
    return out


def report(out: dict) -> str:
    lines = [
        f"{out['sessions']} sessions, {out['requests']} requests in {out['wall_s']:.0f} s, "
        f"{len(out['errors'])} errors, {out['hung_sessions']} sessions still running at the end"
    ]
    for name, lat in sorted(out["latency"].items()):
        lines.append(
            f"  {name}: {len(lat)} ok; latency p50 {percentile(lat, 50):.2f} s, p90 {percentile(lat, 90):.2f} s, "
            f"p99 {percentile(lat, 99):.2f} s, max {max(lat):.2f} s"
        )
    lines += [f"  error: {e}" for e in out["errors"][:10]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=200, help="per session")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    out = run(args.sessions, args.seconds, args.max_requests)
    print(report(out))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    sys.exit(1 if out["errors"] or out["hung_sessions"] else 0)


if __name__ == "__main__":
    main()
