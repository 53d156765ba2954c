"""Load on the explorer: N concurrent gradio_client sessions (up to 30, a classroom) click through one app
process for a bounded time with a request mix (by default one request in five a noise draw of 100 draws,
the rest user views); prints throughput, errors, hung sessions and latency p50 / p90 / p99 per endpoint.

    .venv/bin/python scripts/load_app.py --sessions 30 --seconds 60
    .venv/bin/python scripts/load_app.py --sessions 30 --seconds 60 --baseline REV   # REV's app, then this one

The app runs in its own process (the clients' threads do not share its interpreter), on 127.0.0.1 only;
every loop is bounded in time and count. ``--baseline REV`` extracts the git revision REV into a
temporary folder and measures its app with the same clients and mix, alternating REV and the current
tree ``--rounds`` times, so both see the same machine load; then prints both and their ratios.
``--single`` first times one user alone: a user view, 100 LoRA draws and 100 logit draws (each on a user
not asked for before, so nothing comes from a cache). tests/test_load.py runs a short load and requires zero errors.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEMO = ROOT / "assets" / "demo"
MAX_SESSIONS = 30
SERVE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ["PYTHONPATH"] = sys.argv[1]
from app.main import build_app, make_context
ctx = make_context([sys.argv[2]], sys.argv[3], "cpu")
if os.environ.get("HANOREC_LOAD_LIMITS"):  # --limits: the current tree's queue limits and compute slots
    from hanorec.serving import ResultCache
    limits = dict(kv.split("=") for kv in os.environ["HANOREC_LOAD_LIMITS"].split(","))
    ctx.light_limit = int(limits.get("light", ctx.light_limit))
    ctx.noise_limit = int(limits.get("noise", ctx.noise_limit))
    ctx.heavy_limit = int(limits.get("heavy", ctx.heavy_limit))
    if "slots" in limits:
        ctx.results = ResultCache(max_entries=ctx.results.max_entries, heavy_slots=int(limits["slots"]), store=ctx.results.store)
demo = build_app(ctx)
try:  # every session here comes from 127.0.0.1, one visitor to the per-visitor limit on pending requests
    from app.main import guard
    guard(demo, ctx, pending_per_client=100_000)
except ImportError:  # a --baseline tree from before that limit
    pass
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[4]), prevent_thread_lock=True, quiet=True)
if os.environ.get("HANOREC_LOAD_PROFILE"):  # --profile: where the app's CPU goes (CpuSampler)
    sys.path.insert(0, sys.argv[5])
    from load_app import CpuSampler
    sampler = CpuSampler(os.environ["HANOREC_LOAD_PROFILE"]).start()
print("serving", flush=True)
sys.stdin.read()  # until the load script closes stdin
if os.environ.get("HANOREC_LOAD_PROFILE"):
    sampler.stop()
demo.close()
"""


class CpuSampler:
    """Where the app process spends its CPU: every ``interval`` s, each thread's CPU time since the last sample
    (its own clock, time.pthread_getcpuclockid) is charged to the functions on its Python stack; ``stop()``
    writes the top functions by inclusive and by own (innermost frame) CPU seconds to ``path``. Threads that
    wait use no CPU and so cost nothing, whatever their stack; work in C between two samples is charged to
    the stack seen at the second one."""

    def __init__(self, path: str, interval: float = 0.005):
        self.path, self.interval = path, interval
        self.inclusive: dict[str, float] = {}
        self.own: dict[str, float] = {}
        self.total = 0.0
        self._cpu: dict[int, float] = {}
        self._names: dict = {}  # code object -> "folder/file:function"
        self._process0 = time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                try:
                    cpu = time.clock_gettime(time.pthread_getcpuclockid(tid))
                except OSError:  # the thread ended
                    continue
                used, self._cpu[tid] = cpu - self._cpu.get(tid, cpu), cpu
                if used <= 0:
                    continue
                self.total += used
                names, f = [], frame
                while f is not None:
                    name = self._names.get(f.f_code)
                    if name is None:
                        p = Path(f.f_code.co_filename)
                        name = self._names[f.f_code] = f"{p.parent.name}/{p.name}:{f.f_code.co_name}"
                    names.append(name)
                    f = f.f_back
                self.own[names[0]] = self.own.get(names[0], 0.0) + used
                for name in set(names):
                    self.inclusive[name] = self.inclusive.get(name, 0.0) + used

    def stop(self, top: int = 150) -> None:
        self._stop.set()
        self._thread.join(5)
        process = time.process_time() - self._process0
        lines = [f"CPU seconds sampled in the app's threads: {self.total:.2f} (the whole process: {process:.2f})"]
        for title, table in (("inclusive", self.inclusive), ("own (innermost Python frame)", self.own)):
            lines += ["", f"{title}:"]
            for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"{v:9.2f} {v / max(self.total, 1e-9):6.1%}  {k}")
        Path(self.path).write_text("\n".join(lines) + "\n")


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


@contextmanager
def serve(root: Path, runs_dir: str, timeout: float = 240.0, profile: str | None = None, limits: str | None = None):
    """The app of the source tree ``root`` in a child process on a free local port; yields its URL. profile: a
    file where the app writes where its CPU went (CpuSampler) when it stops; limits: "light=4,noise=16,heavy=1,
    slots=1" (any of them) replaces the app's queue limits and compute slots (AppContext, ResultCache)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("HANOREC_LOAD_PROFILE", None)
    env.pop("HANOREC_LOAD_LIMITS", None)
    if profile:
        env["HANOREC_LOAD_PROFILE"] = str(Path(profile).resolve())
    if limits:
        env["HANOREC_LOAD_LIMITS"] = limits
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(root), str(DEMO), runs_dir, str(port), str(Path(__file__).parent)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=root,
    )  # fmt: skip
    try:
        line = ""
        end = time.time() + timeout
        while time.time() < end and "serving" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"the app of {root} exited with status {proc.returncode} before serving")
        if "serving" not in line:
            raise RuntimeError(f"the app of {root} did not start within {timeout:.0f} s")
        yield f"http://127.0.0.1:{port}/"
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a stuck child is killed below
            proc.kill()
            proc.wait(timeout=30)


class HttpSession:
    """A light client for one session: Gradio's REST API over plain HTTP (POST /gradio_api/call/NAME with the
    inputs, then read that event's server-sent stream until it completes), one keep-alive connection per
    session. It does what gradio_client's predict does for this load (no file downloads) at a fraction of
    its CPU, so that clients on the same cores as the app take less of them. ``predict`` raises on an error
    event or an HTTP error, like gradio_client."""

    def __init__(self, url: str, timeout: float = 300.0):
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.session_hash = os.urandom(8).hex()  # one page: Gradio keeps one session state for all its calls
        self._conn = None

    def _request(self, method: str, path: str, body: bytes | None = None):
        import http.client

        for attempt in range(2):  # a keep-alive connection the server closed is reopened once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:200]!r}")
            return data
        raise AssertionError("unreachable")

    def predict(self, *args, api_name: str):
        import json

        name = api_name.strip("/")
        event = json.loads(self._request("POST", f"/gradio_api/call/{name}", json.dumps({"data": list(args), "session_hash": self.session_hash}).encode()))
        stream = self._request("GET", f"/gradio_api/call/{name}/{event['event_id']}").decode()
        kind = None
        for line in stream.splitlines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                data = json.loads(line[5:])
                if kind == "error":
                    raise RuntimeError(f"{name}: the app answered an error: {str(data)[:200]}")
                return data
        raise RuntimeError(f"{name}: the event stream ended without a result ({stream[-200:]!r})")


def connect(url: str, attempts: int = 3):
    """A gradio_client session on the app (a student opening the page); returned files are not downloaded, so
    the clients' own work stays small beside the app's. Retried: on a loaded machine the first call may time out."""
    from gradio_client import Client

    for k in range(attempts):
        try:
            return Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": 120})
        except Exception:  # noqa: BLE001 - retried, then raised
            if k == attempts - 1:
                raise
            time.sleep(2.0)


CLIENTS = {"http": HttpSession, "gradio": connect}


def timed_call(client, name: str, args: tuple, out: dict, lock) -> bool:
    """One request to endpoint /name: its latency into out["latency"][name], or its error (any type counts) into
    out["errors"]; True when it answered."""
    t0 = time.perf_counter()
    try:
        client.predict(*args, api_name=f"/{name}")
    except Exception as e:  # every error counts, whatever its type
        with lock:
            out["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        return False
    with lock:
        out["latency"].setdefault(name, []).append(time.perf_counter() - t0)
    return True


def session(client, users, seconds, max_requests, seed, out, lock, mix) -> None:
    """One student: a user view, then another, and now and then a noise draw with the lab's settings."""
    rng = random.Random(seed)
    end, n = time.time() + seconds, 0
    while time.time() < end and n < max_requests:
        user = rng.choice(users)
        if rng.random() < mix["noise_share"]:
            target = rng.choice(mix["targets"])
            noise_seed = rng.randrange(mix["seeds"])
            name = "noise_draw"
            args = (str(DEMO), "hit3", user, "base", target, mix["sigma"], mix["draws"], noise_seed)
            setting = (user, target, noise_seed)
        else:
            name, args, setting = "data_user", (str(DEMO), "hit3", user, "base"), (user,)
        timed_call(client, name, args, out, lock)
        with lock:
            out["settings"].setdefault(name, set()).add(setting)
        n += 1
        if mix["think"]:
            time.sleep(rng.uniform(0, 2 * mix["think"]))


def open_session(url: str, kind: str = "http"):
    """One student's session: ``http`` (HttpSession, the default: light) or ``gradio`` (gradio_client)."""
    if kind not in CLIENTS:
        raise ValueError(f"--client must be one of {', '.join(CLIENTS)}, got {kind!r}")
    return CLIENTS[kind](url)


def _users(url, warm: bool = True, kind: str = "http") -> list[str]:
    """The users with a hit3 test prompt; ``warm``: first one view and one noise draw per target (a seed the
    mix never uses), so the model is built before the clock starts."""
    client = open_session(url, kind)
    users_update, *_ = client.predict(str(DEMO), "hit3", api_name="/data_open")
    users = [c[1] if isinstance(c, (list, tuple)) else c for c in users_update["choices"]]
    if warm:
        client.predict(str(DEMO), "hit3", users[0], "base", api_name="/data_user")
        for target in ("lora", "logits"):
            client.predict(str(DEMO), "hit3", users[0], "base", target, 0.02, 10, 99_999, api_name="/noise_draw")
    return users


def default_mix(**over) -> dict:
    """One request in five a noise draw (100 draws, sigma 0.02, LoRA or logits, the lab's default seed 0),
    the rest user views, over the first 50 users, back to back (no think time), light HTTP clients, no
    precomputed scores (``warm``: app/main.py --warm with that many users before the app starts)."""
    mix = {"noise_share": 0.2, "draws": 100, "sigma": 0.02, "targets": ("lora", "logits"), "seeds": 1,
           "users": 50, "think": 0.0, "client": "http", "warm": 0}  # fmt: skip
    mix.update({k: v for k, v in over.items() if v is not None})
    return mix


def run(
    sessions: int = 20,
    seconds: float = 60.0,
    max_requests: int = 200,
    runs_dir: str | None = None,
    *,
    root: Path = ROOT,
    mix: dict | None = None,
    profile: str | None = None,
    limits: str | None = None,
) -> dict:
    """Drive ``sessions`` clients against the app of ``root`` for ``seconds``; latencies, errors, hung sessions."""
    if not 1 <= sessions <= MAX_SESSIONS:
        raise ValueError(f"--sessions must be between 1 and {MAX_SESSIONS}, got {sessions}")
    mix = mix or default_mix()
    with tempfile.TemporaryDirectory(prefix="hanorec-load-") as tmp:
        runs = runs_dir or tmp
        warm_s = warm_scores(Path(root), runs, mix["warm"]) if mix.get("warm") else None
        with serve(Path(root), runs, profile=profile, limits=limits) as url:
            out = _drive(url, sessions, seconds, max_requests, mix)
    out["warm_s"] = warm_s
    out["sessions"] = sessions
    out["requests"] = sum(len(v) for v in out["latency"].values()) + len(out["errors"])
    out["throughput"] = (out["requests"] - len(out["errors"])) / max(out["wall_s"], 1e-9)
    return out


def warm_scores(root: Path, runs_dir: str, users: int) -> float:
    """``python app/main.py --warm USERS`` of the tree ``root`` on the runs folder (as the Dockerfile does);
    returns its wall seconds."""
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "app" / "main.py"), "--data", str(DEMO), "--runs", runs_dir,
                    "--warm", str(users)], check=True, cwd=root, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return time.time() - t0


def _drive(url: str, sessions: int, seconds: float, max_requests: int, mix: dict) -> dict:
    """The sessions against a serving app: latencies, errors, hung sessions, wall and client CPU seconds."""
    users = _users(url, kind=mix["client"])[: mix["users"]]
    with ThreadPoolExecutor(max_workers=6) as pool:  # every page open before the clock starts
        clients = list(pool.map(lambda _: open_session(url, mix["client"]), range(sessions)))
    out: dict = {"latency": {}, "errors": [], "settings": {}}
    lock = threading.Lock()
    threads = [
        threading.Thread(target=session, args=(c, users, seconds, max_requests, i, out, lock, mix), daemon=True)
        for i, c in enumerate(clients)
    ]
    t0, cpu0 = time.time(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, t0 + seconds + 300 - time.time()))
    out["wall_s"] = time.time() - t0
    out["client_cpu_s"] = time.process_time() - cpu0  # the sessions' own work, on the same cores
    out["hung_sessions"] = sum(t.is_alive() for t in threads)
    return out


def single_user(root: Path = ROOT, repeats: int = 3) -> dict:
    """One user alone: median seconds of a user view, 100 LoRA draws and 100 logit draws (each on a new user)."""
    with tempfile.TemporaryDirectory(prefix="hanorec-single-") as tmp, serve(Path(root), tmp) as url:
        users = _users(url)
        client = open_session(url)
        times: dict[str, list[float]] = {"user view": [], "100 LoRA draws": [], "100 logit draws": []}
        for k in range(repeats):
            for name, api, args in (
                ("user view", "/data_user", (str(DEMO), "hit3", users[1 + k], "base")),
                ("100 LoRA draws", "/noise_draw", (str(DEMO), "hit3", users[4 + k], "base", "lora", 0.02, 100, 1)),
                ("100 logit draws", "/noise_draw", (str(DEMO), "hit3", users[8 + k], "base", "logits", 0.02, 100, 1)),
            ):
                t0 = time.perf_counter()
                client.predict(*args, api_name=api)
                times[name].append(time.perf_counter() - t0)
    return {name: percentile(v, 50) for name, v in times.items()}


def report(out: dict) -> str:
    lines = [
        f"{out['sessions']} sessions, {out['requests']} requests in {out['wall_s']:.0f} s "
        f"({out.get('throughput', 0.0):.2f} served per s), {len(out['errors'])} errors, "
        f"{out['hung_sessions']} sessions still running at the end; the clients used {out.get('client_cpu_s', 0):.0f} CPU s"
    ]
    for name, lat in sorted(out["latency"].items()):
        distinct = len(out.get("settings", {}).get(name, ()))
        lines.append(
            f"  {name}: {len(lat)} ok ({distinct} distinct); latency p50 {percentile(lat, 50):.2f} s, "
            f"p90 {percentile(lat, 90):.2f} s, p99 {percentile(lat, 99):.2f} s, max {max(lat):.2f} s"
        )
    lines += [f"  error: {e}" for e in out["errors"][:10]]
    return "\n".join(lines)


@contextmanager
def checkout(rev: str):
    """The files of git revision ``rev`` (``git archive``) in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="hanorec-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def _merge(runs: list[dict]) -> dict:
    """Several rounds of one app as one run: latencies pooled, requests and wall time summed."""
    out = {"latency": {}, "errors": [], "settings": {}, "wall_s": 0.0, "hung_sessions": 0, "requests": 0, "client_cpu_s": 0.0}
    for r in runs:
        for k, v in r["latency"].items():
            out["latency"].setdefault(k, []).extend(v)
        for k, v in r["settings"].items():
            out["settings"].setdefault(k, set()).update(v)
        out["errors"] += r["errors"]
        for k in ("wall_s", "hung_sessions", "requests", "client_cpu_s"):
            out[k] += r[k]
    out["sessions"] = runs[0]["sessions"]
    out["throughput"] = (out["requests"] - len(out["errors"])) / max(out["wall_s"], 1e-9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=30, help=f"concurrent sessions, 1 to {MAX_SESSIONS} (default 30)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=200, help="per session")
    p.add_argument("--noise-share", type=float, default=None, help="share of requests that are noise draws (0.2)")
    p.add_argument("--draws", type=int, default=None, help="draws per noise request (100)")
    p.add_argument("--seeds", type=int, default=None, help="noise seeds the sessions pick from (1: the default 0)")
    p.add_argument("--users", type=int, default=None, help="users the sessions pick from (50)")
    p.add_argument("--think", type=float, default=None, help="mean pause between a session's requests, s (0)")
    p.add_argument("--client", choices=("http", "gradio"), default=None,
                   help="http: light clients over Gradio's REST API (default); gradio: gradio_client sessions")
    p.add_argument("--warm", type=int, default=None, metavar="N",
                   help="the current app only: app/main.py --warm N on its runs folder before it starts (the "
                   "Dockerfile's step: the first N users' default scores precomputed); its time is printed")
    p.add_argument("--baseline", metavar="REV", help="also measure the app of this git revision, alternating")
    p.add_argument("--rounds", type=int, default=1, help="with --baseline: alternations (each --seconds long)")
    p.add_argument("--single", action="store_true", help="first time one user alone (view, 100 draws)")
    p.add_argument("--limits", help='the current app\'s queue limits and compute slots, e.g. "slots=2,light=4"')
    p.add_argument("--profile", metavar="FILE", help="write where the current app's CPU went (last round) to FILE")
    args = p.parse_args()
    mix = default_mix(noise_share=args.noise_share, draws=args.draws, seeds=args.seeds, users=args.users,
                      think=args.think, client=args.client)  # fmt: skip
    print(f"machine: {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}; mix {mix}")
    with checkout(args.baseline) if args.baseline else _nothing() as base_root:
        apps = [("current", ROOT)] + ([(f"baseline {args.baseline}", base_root)] if base_root else [])
        if args.single:
            for name, root in apps[::-1]:
                t = single_user(root)
                print(f"single user, {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
        results: dict[str, list[dict]] = {name: [] for name, _ in apps}
        for _ in range(max(1, args.rounds)):
            for name, root in apps[::-1]:
                before = os.getloadavg()[0]
                mine = {"profile": args.profile, "limits": args.limits} if name == "current" else {}
                app_mix = {**mix, "warm": args.warm or 0} if name == "current" else mix
                results[name].append(run(args.sessions, args.seconds, args.max_requests, root=root, mix=app_mix, **mine))
                if results[name][-1].get("warm_s") is not None:
                    print(f"[{name}: app/main.py --warm {args.warm} took {results[name][-1]['warm_s']:.0f} s before the app started]")
                print(f"[{name}: load average {before:.2f} -> {os.getloadavg()[0]:.2f}]", flush=True)
    merged = {name: _merge(rs) for name, rs in results.items()}
    for name, out in merged.items():
        print(f"{name}: {report(out)}")
    if args.baseline:
        new, old = merged["current"], merged[f"baseline {args.baseline}"]
        print(f"throughput ratio current / baseline: {new['throughput'] / max(old['throughput'], 1e-9):.2f}x")
        for name in sorted(set(new["latency"]) & set(old["latency"])):
            ratios = [percentile(old["latency"][name], q) / max(percentile(new["latency"][name], q), 1e-9)
                      for q in (50, 90, 99)]  # fmt: skip
            print(f"  {name}: baseline / current latency p50 {ratios[0]:.1f}x, p90 {ratios[1]:.1f}x, p99 {ratios[2]:.1f}x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    bad = any(o["errors"] or o["hung_sessions"] for o in merged.values())
    sys.exit(1 if bad else 0)


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    main()
