"""The quickstart (issue 10 item 5): time from ``python app/main.py`` to the page served, and the wall time
of the README's main job on the tiny preset.

Page served: ``python app/main.py --runs <temporary folder>`` is started with GRADIO_SERVER_PORT set to a
free port; the clock stops at the first HTTP 200 for ``/`` whose body is the Gradio page. The app is
stopped (SIGTERM to the process this script started) and the next launch begins. The first launch is
reported apart (cold file caches), the median over the following ``--repeats`` as the warm figure.
If app/main.py does not exist in the checkout, this part says so and is skipped.

Main job: ``python -m hanorec run --config configs/tiny-cpu.yaml`` (data -> SFT -> evaluation), into a
temporary output folder, one run (``--no-job`` skips it); it counts only if it ends with its results
written (a run stopped by a signal, or still going after ``--job-timeout``, is reported as not measured).

    python benchmarks/bench_quickstart.py [--repeats 3] [--no-job] [--root PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import ROOT, header, load_average


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(root: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(root),
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def time_to_page(root: Path, timeout: float) -> float:
    port = free_port()
    env = env_for(root)
    env["GRADIO_SERVER_PORT"] = str(port)
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "app/main.py", "--runs", runs],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while True:
                elapsed = time.perf_counter() - t0
                if proc.poll() is not None:
                    out = proc.stdout.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"app/main.py exited with status {proc.returncode} before serving:\n{out}")
                if elapsed > timeout:
                    raise TimeoutError(f"app/main.py served no page within {timeout:.0f}s")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        body = r.read(200_000).decode(errors="replace")
                        if r.status == 200 and "gradio" in body.lower():
                            return time.perf_counter() - t0
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the app's own process group, started above
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            proc.stdout.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="warm launches after the first (cold) one")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--no-job", action="store_true", help="skip the README's main job (about 2 minutes)")
    ap.add_argument("--job-timeout", type=float, default=900.0, help="give up on the main job after this")
    ap.add_argument("--root", default=str(ROOT), help="the checkout to launch (default: this one)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    header("quickstart: app start to page served; the README's main job", args)
    out: dict = {}
    if not (root / "app" / "main.py").is_file():
        print(f"app start: SKIPPED: {root / 'app' / 'main.py'} does not exist in this checkout yet")
    else:
        times = [time_to_page(root, args.timeout) for _ in range(1 + args.repeats)]
        warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
        out["app_cold_s"], out["app_warm_s"] = times[0], warm
        print(
            f"app start to page served: first launch {times[0]:.1f}s, then median {warm:.1f}s over "
            f"{len(times) - 1} launches ({', '.join(f'{t:.1f}' for t in times[1:])})",
            flush=True,
        )
    if not args.no_job:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "hanorec", "run", "--config", "configs/tiny-cpu.yaml", f"--output_dir={tmp}/run"]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=args.job_timeout
                )
            except subprocess.TimeoutExpired:
                print(
                    f"README main job: NOT MEASURED: it did not finish within {args.job_timeout:.0f}s "
                    f"(load average {load_average()}); about 2 minutes on 2 free cores"
                )
                raise SystemExit(1) from None
            wall = time.perf_counter() - t0
        if proc.returncode != 0 or "results written" not in proc.stdout:
            raise RuntimeError(
                f"the main job did not finish (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}"
            )
        last = [line for line in proc.stdout.splitlines() if line.strip()][-12:]
        out["job_s"] = wall
        print(f"README main job `python -m hanorec run --config configs/tiny-cpu.yaml`: {wall:.1f}s wall")
        print("  its output ends:\n    " + "\n    ".join(last))
    return out


if __name__ == "__main__":
    main()
