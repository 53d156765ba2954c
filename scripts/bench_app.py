"""Speed of the explorer app against the targets of issue 6 (2 CPU cores, tiny preset, bundled demo data).

    python scripts/bench_app.py                 # prints a table and the JSON; --out FILE also writes it

1. page served: start `python app/main.py` as a fresh process, time until GET / answers 200 (target < 10 s);
2. switching users: the Data tab's user handler over HTTP (history, the test prompt's 7 candidates scored by
   the untrained tiny-qwen2.5-vl, what the model sees) for several users after one warm-up call that builds
   the model (target < 1 s each);
3. noise: the Noise lab's handler with 100 draws over the 7 candidates of a hit3 prompt, LoRA and logits
   targets (target < 5 s).
Each timing is the wall time of the HTTP call as a browser would make it (gradio_client).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_served(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with status {proc.returncode} before serving the page")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the page was not served within {timeout:.0f} s")


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10, help="users to switch between (default 10)")
    ap.add_argument("--starts", type=int, default=3, help="app starts timed for 'page served' (default 3; median)")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)

    from gradio_client import Client

    runs = tempfile.mkdtemp(prefix="bench-app-runs-")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()

    def start_app():
        port = free_port()
        env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1")
        env.pop("PYTHONPATH", None)  # as a user's clone: the app finds the package itself
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app" / "main.py"), "--runs", runs],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return proc, f"http://127.0.0.1:{port}/"

    served_all = []
    for _ in range(max(1, args.starts) - 1):
        proc, url = start_app()
        try:
            served_all.append(wait_served(url, proc))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    proc, url = start_app()
    try:
        served_all.append(wait_served(url, proc))
        served = statistics.median(served_all)
        client = Client(url, verbose=False, download_files=False)  # a browser fetches images lazily
        users_update, *_ = client.predict(str(DEMO), "hit3", api_name="/data_open")
        users = users_update["choices"]
        users = [u[0] if isinstance(u, (list, tuple)) else u for u in users][: args.users + 1]
        first = timed(client.predict, str(DEMO), "hit3", users[0], "base", api_name="/data_user")
        switch = [timed(client.predict, str(DEMO), "hit3", u, "base", api_name="/data_user") for u in users[1:]]
        noise = {}
        for target, sigma in (("lora", 0.02), ("logits", 0.5)):
            client.predict(str(DEMO), "hit3", users[0], "base", target, sigma, 5, 0, api_name="/noise_draw")  # warm
            noise[target] = timed(
                client.predict, str(DEMO), "hit3", users[0], "base", target, sigma, 100, 0, api_name="/noise_draw"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    total = time.perf_counter() - start

    import platform

    import torch

    result = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}",
        "load_average_1min_at_start": round(load_before, 2),
        "page_served_s": round(served, 2),
        "page_served_s_each": [round(x, 2) for x in served_all],
        "first_user_s_builds_model": round(first, 2),
        "switch_user_s_median": round(statistics.median(switch), 3),
        "switch_user_s_max": round(max(switch), 3),
        "n_user_switches": len(switch),
        "noise_100_draws_7_candidates_s": {k: round(v, 2) for k, v in noise.items()},
        "wall_s": round(total, 1),
    }
    rows = [
        (f"page served after start (median of {len(served_all)})", f"{result['page_served_s']:.2f} s", "< 10 s"),
        ("first user (builds the tiny model)", f"{result['first_user_s_builds_model']:.2f} s", "-"),
        (f"switch user + score 7 candidates (median of {len(switch)})", f"{result['switch_user_s_median']:.3f} s", "< 1 s"),
        ("switch user + score 7 candidates (max)", f"{result['switch_user_s_max']:.3f} s", "< 1 s"),
        ("100 noise draws, 7 candidates, LoRA", f"{noise['lora']:.2f} s", "< 5 s"),
        ("100 noise draws, 7 candidates, logits", f"{noise['logits']:.2f} s", "< 5 s"),
    ]
    print(f"Machine: {result['machine']}; 1-minute load average at start {load_before:.2f}")
    print("| measurement | time | target |\n|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
