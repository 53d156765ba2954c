"""Load on the explorer: N concurrent gradio_client sessions browse users and score candidates (clean and
under noise) for a bounded time against one app process; prints the request count, the errors and the
latency percentiles per endpoint.

    .venv/bin/python scripts/load_jobs.py --sessions 20 --seconds 60
    .venv/bin/python scripts/load_jobs.py --sessions 10 --job-sessions 10 --seconds 60   # + ownership and caps

With --job-sessions, that many more sessions act like strangers sharing a public demo (the app in demo mode:
one job per browser, JOB_CAP in total): each launches a job, tries a second (refused: its cap or the full
queue), tries to stop another session's job with its own token (refused: not its job), then stops its own.
Any outcome other than these is a violation; the number of queued jobs is read after every launch and must
never exceed JOB_CAP. The jobs are queued, never started: the load is on the server, not on training.

Requests go only to the app this script starts on 127.0.0.1; every loop is bounded in time and count.
tests/test_load.py runs it (slow; scripts/load_app.py is the classroom load test with a request mix) and requires zero errors.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEMO = ROOT / "assets" / "demo"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_app import _free_port, percentile, timed_call  # noqa: E402  (the browsing load script beside this one)


def serve(demo, options: dict | None = None, tries: int = 3) -> str:
    """Launch the app on a free loopback port; its URL. Gradio gives up on its own start-up check (one 3 s
    request to the new server) on a machine loaded enough to miss it, so the launch is tried again."""
    for attempt in range(tries):
        port = _free_port()
        try:
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **(options or {}))
            return f"http://127.0.0.1:{port}/"
        except ValueError as e:
            if "localhost is not accessible" not in str(e) or attempt == tries - 1:
                raise
            demo.close()
    raise AssertionError("unreachable")


CONNECT_TIMEOUT_S = 60.0  # how long a session waits for the page's configuration (a browser waits too)


def connect(url: str, name: str, out: dict, lock):
    """A gradio_client session, or None with the failure counted as an error (the server did not answer)."""
    from gradio_client import Client

    try:
        return Client(url, verbose=False, httpx_kwargs={"timeout": CONNECT_TIMEOUT_S})
    except Exception as e:  # noqa: BLE001 - a session that cannot even connect is an error like any other
        with lock:
            out["errors"].append(f"{name} connect: {type(e).__name__}: {str(e)[:200]}")
        return None


def session(url: str, users: list[str], seconds: float, max_requests: int, seed: int, out: dict, lock) -> None:
    """One browser-like session: switch to a random user, score its candidates, draw a little noise."""

    rng = random.Random(seed)
    client = connect(url, f"session {seed}", out, lock)
    if client is None:
        return
    end, n = time.time() + seconds, 0
    while time.time() < end and n < max_requests:
        user = rng.choice(users)
        for name, args in (
            ("data_user", (str(DEMO), "hit3", user, "base")),
            ("noise_draw", (str(DEMO), "hit3", user, "base", rng.choice(["lora", "logits"]), 0.02, 10, n)),
        ):
            timed_call(client, name, args, out, lock)
            n += 1


JOB_CAP = 4  # jobs waiting in total in the job sessions' app (demo mode's cap)
FORM = dict(dataset=str(DEMO), backbone="tiny-llava", stage="SFT", task="hit3", sft_from="train SFT first, in this run",
            beta0=0.1, sigma=0.05, noise_target="lora", k_negatives=3, sampling="random", epochs=1, lr=0, max_steps=10,
            eval_examples=20, log_with="none (metrics.jsonl only)", seed=0, addons=[], hars_k=10,
            hars_temperature=1.0)  # fmt: skip


def form_values(name: str, token: str) -> list:
    """The Train tab's launch inputs in the form's order (app.tabs.train.FORM_FIELDS), each method's options
    (defaults), the owner token."""
    from app.tabs.train import FORM_FIELDS
    from hanorec import methods

    values = {**FORM, "name": name}
    options = [k.default for m in methods.all_methods() for k in methods.option_knobs(m)]
    return [values[f] for f in FORM_FIELDS] + options + [token]


def job_session(url: str, i: int, seconds: float, max_requests: int, ctx, jobs: dict, out: dict, lock) -> None:
    """A stranger on a shared demo: launch, be refused a second job, be refused another's stop, stop its own."""
    import secrets


    rng = random.Random(1000 + i)
    client = connect(url, f"job session {i}", out, lock)
    if client is None:
        return
    # the browser's owner token (the page gets one when it loads; an API client chooses its own)
    end, n, token = time.time() + seconds, 0, secrets.token_urlsafe(24)

    def call(name, *args):
        t0 = time.perf_counter()
        try:
            result, err = client.predict(*args, api_name=f"/{name}"), None
        except Exception as e:  # noqa: BLE001 - a refusal is an expected answer here; sorted out below
            result, err = None, str(e)
        with lock:
            out["latency"].setdefault(name, []).append(time.perf_counter() - t0)
        return result, err

    def expect(ok: bool, what: str) -> None:
        with lock:
            out["checks"] += 1
            if not ok:
                out["violations"].append(f"session {i}: {what}")

    while time.time() < end and n < max_requests:
        name, own = f"s{i}-{n}", None
        result, err = call("train_launch", *form_values(name, token))
        with lock:
            out["max_queued"] = max(out.get("max_queued", 0), len(ctx.jobs.queue()))
        if err is None:
            expect(result[2] == token, "the launch came back with another owner token")
            own = name
        else:  # the queue was full, or this address already holds its job (every session here is 127.0.0.1,
            # one visitor for the per-visitor cap): the only refusals a session with no job of its own may get
            expect("the queue is full" in err or "already has" in err, f"launch refused with {err[:120]!r}")
        _, err2 = call("train_launch", *form_values(f"{name}-b", token))
        with lock:
            out["max_queued"] = max(out.get("max_queued", 0), len(ctx.jobs.queue()))
        if own is not None:  # a second job of the same browser: refused (its cap, or the queue is full)
            expect(err2 is not None and ("already has" in err2 or "the queue is full" in err2),
                   f"a second job was {'queued' if err2 is None else 'refused with ' + repr(err2[:120])}")  # fmt: skip
        elif err2 is None:  # a place opened since: this is the session's one job
            own = f"{name}-b"
        else:
            expect("the queue is full" in err2 or "already has" in err2, f"launch refused with {err2[:120]!r}")
        if own is not None:
            with lock:
                jobs[i] = (own, token)
        with lock:
            others = [v for k, v in jobs.items() if k != i]
        if others:
            other_job, _ = rng.choice(others)
            call("train_runs")  # the page's refresh: the job picker learns the other sessions' jobs
            _, err3 = call("train_stop", other_job, token)
            # refused: not its job (the ownership check), or not yet among its page's choices (a job launched
            # after the refresh); both leave the other session's job alone
            expect(err3 is not None and ("launched from another browser" in err3 or "list of choices" in err3),
                   f"stopping {other_job} of another session: {'allowed' if err3 is None else err3[:120]}")  # fmt: skip
            with lock:
                out["ownership_refusals"] += err3 is not None and "launched from another browser" in err3
        if own is not None:
            _, err4 = call("train_stop", own, token)
            expect(err4 is None, f"stopping its own job {own} refused: {(err4 or '')[:120]}")
            with lock:
                jobs.pop(i, None)
        n += 1


def run(sessions: int = 20, seconds: float = 60.0, max_requests: int = 200, runs_dir: str | None = None,
        job_sessions: int = 0) -> dict:  # fmt: skip
    import tempfile

    from gradio_client import Client

    from app.main import build_app, guard, launch_options, make_context
    from hanorec.jobs import JobManager

    runs_dir = runs_dir or tempfile.mkdtemp(prefix="hanorec-load-")
    ctx = make_context([str(DEMO)], runs_dir, "cpu", demo=bool(job_sessions))
    if job_sessions:  # a queue that never starts training, with demo mode's caps
        ctx.jobs.close()
        ctx.jobs = JobManager(runs_dir, autostart=False, max_queued=JOB_CAP, max_per_owner=1)
        ctx.jobs.tick = lambda: None
    demo = build_app(ctx)
    guard(demo, ctx, pending_per_client=100_000)  # every session is 127.0.0.1: one visitor to that limit
    url = serve(demo, launch_options(ctx))
    try:
        users_update, *_ = Client(url, verbose=False).predict(str(DEMO), "hit3", api_name="/data_open")
        users = [c[1] if isinstance(c, (list, tuple)) else c for c in users_update["choices"]][:50]
        out: dict = {"latency": {}, "errors": [], "violations": [], "checks": 0, "max_queued": 0,
                     "ownership_refusals": 0}  # fmt: skip
        lock = threading.Lock()
        threads = [
            threading.Thread(target=session, args=(url, users, seconds, max_requests, i, out, lock))
            for i in range(sessions)
        ]
        jobs: dict = {}
        threads += [
            threading.Thread(target=job_session, args=(url, i, seconds, max_requests, ctx, jobs, out, lock))
            for i in range(job_sessions)
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
    out["sessions"], out["job_sessions"], out["job_cap"] = sessions, job_sessions, JOB_CAP
    out["requests"] = sum(len(v) for v in out["latency"].values()) + len(out["errors"])
    return out


def report(out: dict) -> str:
    lines = [
        f"{out['sessions']} sessions, {out['requests']} requests in {out['wall_s']:.0f} s, "
        f"{len(out['errors'])} errors, {out['hung_sessions']} sessions still running at the end"
    ]
    if out.get("job_sessions"):
        lines.append(
            f"  + {out['job_sessions']} job sessions: {out['checks']} ownership and cap checks, "
            f"{len(out['violations'])} violations ({out['ownership_refusals']} stops of another's job refused as not "
            f"theirs); at most {out['max_queued']} jobs queued at once (cap {out['job_cap']})"
        )
    for name, lat in sorted(out["latency"].items()):
        lines.append(
            f"  {name}: {len(lat)} ok; latency p50 {percentile(lat, 50):.2f} s, p90 {percentile(lat, 90):.2f} s, "
            f"p99 {percentile(lat, 99):.2f} s, max {max(lat):.2f} s"
        )
    lines += [f"  error: {e}" for e in out["errors"][:10]]
    lines += [f"  violation: {v}" for v in out.get("violations", [])[:10]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=200, help="per session")
    p.add_argument("--job-sessions", type=int, default=0, help="sessions that launch and stop jobs (ownership, caps)")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    out = run(args.sessions, args.seconds, args.max_requests, job_sessions=args.job_sessions)
    print(report(out))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    bad = out["errors"] or out["hung_sessions"] or out["violations"] or out["max_queued"] > JOB_CAP
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
