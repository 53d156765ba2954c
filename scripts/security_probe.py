"""Replay the hostile-visitor probes of issues 19 and 27 (33 attacks) against a local instance of the app.

    .venv/bin/python scripts/security_probe.py [--modes normal,demo] [--timeout 600]

The probe starts the app itself (app/main.py's make_context, build_app and launch options, loopback only:
127.0.0.1), once per mode, on a runs folder and a copy of the demo data in a temporary folder, and sends each
attack over HTTP as a stranger would. A second visitor speaks from 127.0.0.2 (the same loopback interface).
Jobs are queued for real, but their runner is a sleeping stand-in (nothing trains), so the probe stays short;
every process it starts is ended before it exits. Each attack prints "held" or "FAULT" with one line of
evidence; the exit status is 1 when any attack faults in any mode. Bounded: at most a few hundred requests,
each with a timeout, and the whole run within --timeout seconds.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "assets" / "demo"
DEMO_RUN = ROOT / "assets" / "demo_runs" / "demo-hit3"
SECOND = "127.0.0.2"  # another visitor: the same loopback interface, another source address
REQUEST_TIMEOUT = 120.0

SERVE = """
import os, sys
sys.path.insert(0, sys.argv[1])
from app.main import build_app, launch_options, make_context
ctx = make_context([sys.argv[2]], sys.argv[3], "cpu", demo=sys.argv[5] == "demo")
ctx.jobs.python = sys.argv[6]  # the probe's stand-in runner: a job sleeps instead of training
demo = build_app(ctx)
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[4]), prevent_thread_lock=True, quiet=True,
            **launch_options(ctx))
print("serving", flush=True)
sys.stdin.read()
demo.close()
"""


# ---- the instance ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """The app in a child process on 127.0.0.1 (see SERVE), and what an attack needs to know of it."""

    def __init__(self, work: Path, mode: str, timeout: float = 240.0):
        self.work, self.mode = work, mode
        self.data, self.runs, self.outside = work / "data", work / "runs", work / "outside"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        sleeper = work / "sleeper.sh"
        # called as `sleeper -m hanorec.jobs RUN`: it sleeps, and on SIGTERM (stop) says so in the run's status
        sleeper.write_text('#!/bin/sh\nrun="$3"\nsleep 900 &\nchild=$!\n'
                           'trap \'kill $child; printf "{\\"status\\": \\"stopped\\"}" > "$run/status.json"; exit 0\' TERM\n'
                           'wait $child\n')  # fmt: skip
        sleeper.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("HANOREC_AUTH", "HANOREC_DEMO", "SPACE_ID",
                                                                  "GRADIO_SERVER_NAME", "GRADIO_TEMP_DIR")}  # fmt: skip
        env.update(PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(ROOT), str(self.data), str(self.runs), str(self.port), mode, str(sleeper)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=work,
        )  # fmt: skip
        end, line = time.time() + timeout, ""
        while time.time() < end and "serving" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with status {self.proc.returncode} before serving")
        if "serving" not in line:
            self.close()
            raise RuntimeError(f"the app did not start within {timeout:.0f} s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a stuck app is killed
            self.proc.kill()
            self.proc.wait(timeout=30)
        for status in self.runs.glob("*/status.json"):  # the stand-in runners the app started (own sessions)
            try:
                pid = json.loads(status.read_text()).get("runner_pid")
                if pid:
                    os.kill(int(pid), signal.SIGTERM)
            except (OSError, ValueError, TypeError):
                pass


# ---- talking to it -----------------------------------------------------------------------------------
def http(source: str | None = None):
    import httpx

    transport = httpx.HTTPTransport(local_address=source) if source else None
    return httpx.Client(timeout=REQUEST_TIMEOUT, transport=transport)


def call(inst: Instance, api: str, data: list, *, session: str | None = None, source: str | None = None) -> tuple[bool, str]:
    """One API call as a raw client: (completed, the reply's text: its data, or its error sentence)."""
    with http(source) as c:
        body = {"data": data, **({"session_hash": session} if session else {})}
        r = c.post(f"{inst.url}gradio_api/call/{api}", json=body)
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:300]}"
        stream = c.get(f"{inst.url}gradio_api/call/{api}/{r.json()['event_id']}").text
    done = "event: complete" in stream
    payload = stream.split("data:", 1)[-1].strip() if "data:" in stream else stream
    return done, payload


def train_values(inst: Instance, owner: str = "", **changes) -> list:
    from app.tabs.train import FORM_FIELDS
    from hanorec import methods

    form = dict(dataset=str(inst.data), backbone="tiny-llava", stage="SFT", task="hit3",
                sft_from="train SFT first, in this run", beta0=0.1, sigma=0.05, noise_target="lora", k_negatives=3,
                sampling="random", epochs=1, lr=0, max_steps=10, eval_examples=20,
                log_with="none (metrics.jsonl only)", seed=0, name="", addons=[], hars_k=10,
                hars_temperature=1.0)  # fmt: skip
    form.update(changes)
    options = [k.default for m in methods.all_methods() for k in methods.option_knobs(m)]
    return [form[f] for f in FORM_FIELDS] + options + [owner]


def compare_values(inst: Instance, owner: str = "", **changes) -> list:
    form = dict(dataset=str(inst.data), task="hit3", sft_from="train SFT for each seed", methods=["DPO"], seeds="0",
                sft_steps=2, pref_steps=2, beta=0, lr=0, sigma=0.05, catalogue_items=10, eval_examples=5, extra="")
    form.update(changes)
    return [*form.values(), owner]


def token() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


def stop_all(inst: Instance, owners: list[str], session: str, source: str | None = None) -> None:
    """Stop the jobs these owners launched (the probe cleans up between attacks)."""
    call(inst, "train_runs", [], session=session, source=source)
    for run in inst.runs.iterdir():
        job = run / "job.json"
        if job.is_file() and not run.is_symlink():
            for owner in owners:
                call(inst, "train_stop", [run.name, owner], session=session, source=source)


def marker_absent(path: Path) -> bool:
    return not path.exists()


def planted_plugin(folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{name}.RAN"
    plugin = folder / f"{name}.py"
    plugin.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return plugin, marker


def no_server_path(inst: Instance, text: str) -> bool:
    return all(s not in text for s in (str(inst.work), str(ROOT) + "/", "Traceback"))


# ---- the attacks ----------------------------------------------------------------------------------------
ATTACKS: list[tuple[str, str, object]] = []


def attack(key: str, title: str):
    def register(fn):
        ATTACKS.append((key, title, fn))
        return fn

    return register


@attack("19.1", "NaN and huge numbers in the Train form")
def bad_numbers(inst):
    for field, value in (("beta0", "NaN"), ("seed", 2**64), ("k_negatives", 10**6), ("lr", "Infinity")):
        done, text = call(inst, "train_launch", train_values(inst, **{field: value}))
        if done or "\n" in text.strip('"'):
            return False, f"{field}={value} was {'queued' if done else 'refused without one sentence'}"
    return True, "NaN, Infinity, 2^64 and 10^6 refused with one sentence each"


@attack("19.2", "text, lists and objects in number fields")
def malformed(inst):
    for field, value in (("seed", "12abc"), ("max_steps", [1, 2]), ("sigma", {"a": 1})):
        done, text = call(inst, "train_launch", train_values(inst, **{field: value}))
        if done or text.strip() in ("", "null", '"Error"'):
            return False, f"{field}={value!r}: {text[:120]}"
    return True, "one sentence each"


@attack("19.3", "a truncated job.json in the runs folder")
def damaged_run(inst):
    done, text = call(inst, "train_runs", [])
    return done and "damaged-job" in text, "the run list still answers and lists it" if done else text[:160]


@attack("19.4", "a symbolic link in the runs folder to an outside queued job")
def linked_run(inst):
    outside = inst.outside / "queued-job"
    state = json.loads((outside / "status.json").read_text()).get("status")
    done, text = call(inst, "train_runs", [])
    held = state == "queued" and not (outside / "job.log").exists() and "linked-job" not in text
    return held, f"outside job still {state}, not listed" if held else f"outside job {state}; listed: {'linked-job' in text}"


@attack("19.5", "two launches with one name at the same instant")
def name_race(inst):
    name, owners = f"race-{uuid.uuid4().hex[:6]}", [token(), token()]
    sources = ["127.0.0.1", SECOND]
    with futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: call(inst, "train_launch", train_values(inst, owners[i], name=name),
                                               source=sources[i]), range(2)))  # fmt: skip
    for i in range(2):
        stop_all(inst, [owners[i]], "race", sources[i])
    oks = [r for r in results if r[0]]
    errs = [r[1] for r in results if not r[0]]
    held = len(oks) <= 1 and all("already exists" in e or "already has" in e or "queue is full" in e for e in errs)
    return held, f"{len(oks)} queued; the other: {errs[0][:100] if errs else '-'}"


@attack("19.6", "backbone ids that are not ids (NUL, %2e%2e, 300 characters, not cached)")
def backbones(inst):
    for value in ("org/\x00x", "%2e%2e/%2e%2e/etc", "org/" + "m" * 300, "no-such-org/model-x"):
        done, text = call(inst, "train_launch", train_values(inst, backbone=value))
        if done:
            return False, f"{value[:30]!r} was queued"
    return True, "refused before anything is queued"


@attack("19.7", "Gradio's file route for the machine-wide temp folder and outside files")
def file_route(inst):
    foreign = Path(tempfile.gettempdir()) / "gradio" / "probe-foreign.txt"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_text("another app's file")
    try:
        with http() as c:
            codes = [c.get(f"{inst.url}gradio_api/file={p}").status_code for p in (foreign, "/etc/passwd", inst.runs / "damaged-job" / "job.json")]
    finally:
        foreign.unlink(missing_ok=True)
    return all(code >= 400 for code in codes), f"HTTP {codes}"


@attack("19.8", "stopping and resuming another visitor's job")
def ownership(inst):
    mine = token()
    done, text = call(inst, "train_launch", train_values(inst, mine), session="own-a")
    if not done:
        return False, f"the owner's launch was refused: {text[:120]}"
    job = json.loads(text)[0]["value"]
    verdicts = []
    for owner, source in ((token(), SECOND), ("", SECOND), ("x" * 24, "127.0.0.1")):
        call(inst, "train_runs", [], session="stranger", source=source)
        for api in ("train_stop", "train_resume"):
            ok, reply = call(inst, api, [job, owner], session="stranger", source=source)
            verdicts.append(not ok and ("another browser" in reply or "only a stopped" in reply))
    ok, _ = call(inst, "train_stop", [job, mine], session="own-a")
    return all(verdicts) and ok, f"{sum(verdicts)}/{len(verdicts)} strangers refused; the owner stopped it: {ok}"


@attack("19.9", "uploads beyond the size limit")
def big_upload(inst):
    with http() as c:
        r = c.post(f"{inst.url}gradio_api/upload", files={"files": ("big.bin", b"0" * (3 << 20))})
    return r.status_code in (403, 413), f"HTTP {r.status_code}"


@attack("27.1", "uploading a .py file (critical chain, step 1)")
def upload_py(inst):
    with http() as c:
        r = c.post(f"{inst.url}gradio_api/upload", files={"files": ("evil.py", b"print('ran')\n")})
    return r.status_code == 403 and no_server_path(inst, r.text), f"HTTP {r.status_code}: {r.text[:80]}"


@attack("27.2", "a plug-in file in Compare's more overrides (steps 2-3)")
def plugin_file(inst):
    plugin, marker = planted_plugin(inst.outside / "plugins", "compare_evil")
    done, text = call(inst, "compare_launch", compare_values(inst, extra=f"--pref.plugins=[{plugin}]"))
    held = not done and marker_absent(marker) and no_server_path(inst, text)
    return held, f"{'queued' if done else 'refused'}; imported: {marker.exists()}; reply: {text[:100]}"


@attack("27.3", "a run config naming a plug-in, read at every start and listing (step 4)")
def planted_config(inst):
    marker = inst.outside / "plugins" / "planted_config.RAN"
    call(inst, "train_runs", [])
    call(inst, "compare_refresh", [])
    return marker_absent(marker), f"imported at start or listing: {marker.exists()}"


@attack("27.4", "an installed module name as a plug-in (step 5)")
def plugin_module(inst):
    done, text = call(inst, "compare_launch", compare_values(inst, extra="--pref.plugins=[this]"))
    return not done, f"{'queued' if done else 'refused'}: {text[:100]}"


@attack("27.B1", "Compare overrides that name paths, backbones and remote code")
def escape_overrides(inst):
    for word in ("--data.path=/etc", "--data.image_dir=/etc", f"--pref.sft_run={inst.outside}",
                 "--model.name=/usr", "--model.trust_remote_code=true"):  # fmt: skip
        done, text = call(inst, "compare_launch", compare_values(inst, extra=word))
        if done:
            return False, f"{word} was queued"
    return True, "each refused, naming its key"


@attack("27.B2", "Compare's dataset and SFT source outside the allowed folders")
def escape_fields(inst):
    for changes in (dict(dataset="/etc"), dict(dataset=str(inst.outside)), dict(sft_from="../outside")):
        done, text = call(inst, "compare_launch", compare_values(inst, **changes))
        if done:
            return False, f"{changes} was queued"
    return True, "refused"


@attack("27.C", "a fresh owner token per launch to fill the queue")
def fresh_tokens(inst):
    owners, accepted = [token() for _ in range(6)], 0
    for owner in owners:
        done, _ = call(inst, "train_launch", train_values(inst, owner), session="c-first")
        accepted += done
    other = token()
    done_other, text = call(inst, "train_launch", train_values(inst, other), session="c-second", source=SECOND)
    stop_all(inst, owners, "c-first")
    stop_all(inst, [other], "c-second", SECOND)
    cap = 1 if inst.mode == "demo" else 4
    return accepted <= cap and done_other, f"one address queued {accepted} (cap {cap}); another visitor: {'queued' if done_other else text[:80]}"


@attack("27.D", "80 concurrent calls from one client against Gradio's queue")
def flood(inst):
    data = [str(inst.data), "hit3", "base", "lora", 0.02, 10, 0]
    user = first_user(inst)

    def one(i):
        return call(inst, "noise_draw", [data[0], data[1], user, *data[2:]])

    with futures.ThreadPoolExecutor(80) as pool:
        started = [pool.submit(one, i) for i in range(80)]
        time.sleep(1.0)
        other = call(inst, "data_open", [str(inst.data), "hit3"], source=SECOND)
        results = [f.result() for f in started]
    refused = [t for ok, t in results if not ok and "per visitor" in t]
    accepted = sum(ok for ok, _ in results)
    held = other[0] and refused and accepted < 80
    return bool(held), f"{accepted} answered, {len(refused)} refused per visitor; another visitor answered: {other[0]}"


@attack("27.E", "huge comparisons: 1,000 seeds x 10 methods, 10^8 steps, 1,024 threads")
def huge_compare(inst):
    methods = ["DPO", "S-DPO", "HaNo-DPO", "HaNo-DPO w/o HaRS", "HaNo-DPO w/o NoDO", "beta-DPO", "cDPO", "rDPO", "IPO", "SimPO"]
    for changes in (dict(seeds=",".join(map(str, range(1000))), methods=methods), dict(extra="--sft.max_steps=100000000"),
                    dict(extra="--threads=1024"), dict(seeds=",".join(map(str, range(100_000))))):  # fmt: skip
        done, text = call(inst, "compare_launch", compare_values(inst, **changes))
        if done or "Traceback" in text:
            return False, f"{str(changes)[:60]}: {'queued' if done else text[:80]}"
    return True, "refused with one sentence each"


@attack("27.F", "twenty uploads in a row")
def many_uploads(inst):
    with http() as c:
        codes = [c.post(f"{inst.url}gradio_api/upload", files={"files": (f"f{i}.bin", b"0" * 1000)}).status_code
                 for i in range(20)]  # fmt: skip
    return all(code == 403 for code in codes), f"HTTP {sorted(set(codes))} for 20 uploads"


@attack("27.G", "exporting the same stage again and again")
def repeated_export(inst):
    session = "exporter"
    sizes = []
    for _ in range(3):
        call(inst, "train_runs", [], session=session)
        ok, text = export(inst, session)
        if not ok:
            return False, f"the export failed: {text[:120]}"
        roots = [r for r in (inst.runs / ".exports", inst.runs / "exports") if r.is_dir()]  # (and where it once went)
        sizes.append(sum(1 for r in roots for p in r.iterdir() if p.is_dir() and p.name.startswith("export-me")))
    return sizes[-1] == 1, f"export folders after 3 asks: {sizes}"


def export(inst, session):
    """The export button, as the page sends it: its stage picker is filled by the page's focus event (a private
    event, which the page calls through the queue by its index), then the button's event on that picker."""

    with http() as c:
        config = c.get(f"{inst.url}config").json()
        deps = config["dependencies"]
        fn = next(d["id"] for d in deps if d.get("api_name") == "train_export")
        picker = next(x["id"] for x in config["components"] if x.get("props", {}).get("elem_id") == "train-export-stage")
        focus = next(d["id"] for d in deps if [picker, "focus"] in [list(t) for t in d.get("targets", [])])
        replies = []
        for fn_index, data in ((focus, []), (fn, ["export-me::sft", False])):
            body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None}
            r = c.post(f"{inst.url}gradio_api/queue/join", json=body)
            if r.status_code != 200:
                return False, f"HTTP {r.status_code}: {r.text[:200]}"
            with c.stream("GET", f"{inst.url}gradio_api/queue/data", params={"session_hash": session}) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:") and '"process_completed"' in line:
                        msg = json.loads(line[5:])
                        replies.append(msg)
                        break
                else:
                    return False, "no reply"
        last = replies[-1]
        if not last.get("success"):
            return False, json.dumps(last.get("output", last))[:300]
        return True, json.dumps(last["output"])[:300]


@attack("27.H", "NaN, text and out-of-range numbers and seeds in Compare")
def compare_numbers(inst):
    for changes in (dict(sft_steps="NaN"), dict(pref_steps="many"), dict(seeds="-1"), dict(seeds=str(2**64)),
                    dict(catalogue_items=10**12)):  # fmt: skip
        done, text = call(inst, "compare_launch", compare_values(inst, **changes))
        if done or text.strip() in ("null", '"Error"', "") or "Traceback" in text:
            return False, f"{changes}: {'queued' if done else text[:80]}"
    return True, "one sentence each"


@attack("27.I", "a method option of 1e308 (SimPO gamma)")
def huge_option(inst):
    done, text = call(inst, "compare_launch", compare_values(inst, methods=["SimPO"], extra="--pref.options.gamma=1e308"))
    return not done, f"{'queued' if done else 'refused'}: {text[:100]}"


@attack("27.J", "a run named exports, and two exports in the same second")
def export_collisions(inst):
    owner = token()
    call(inst, "train_launch", train_values(inst, owner, name="exports"), session="j")
    stop_all(inst, [owner], "j")
    shutil.rmtree(inst.runs / ".exports", ignore_errors=True)
    with futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: export(inst, f"j{i}"), range(2)))
    captured = (inst.runs / "exports").is_dir() and any(p.name.startswith("export-me") for p in (inst.runs / "exports").iterdir())
    return all(ok for ok, _ in results) and not captured, f"both answered: {[ok for ok, _ in results]}; captured: {captured}"


@attack("27.K", "a planted score-cache file that unpacks to gigabytes")
def planted_cache(inst):
    user = first_user(inst)
    done, text = call(inst, "data_user", [str(inst.data), "hit3", user, "base"])
    files = list((inst.runs / ".cache" / "scores").glob("*.npz"))
    planted = (inst.work / "planted").is_file()
    peak = inst.peak_rss_mb()
    if not planted:  # the first start: its scores are stored now, and bombs replace them before the next start
        return done and bool(files), f"setup: {len(files)} score files stored for the next start to read"
    return done and peak < 1500, f"the view answered: {done}; the app's peak memory {peak:.0f} MB"


@attack("27.L", "a symbolic link loop, and a folder swapped for a link within the path memory")
def link_tricks(inst):
    done, text = call(inst, "compare_open", ["loop"])
    loop_ok = not done and "loop" in text
    target = inst.runs / "swap-me"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(inst.work / "comparison", target)
    _, text1 = call(inst, "compare_open", ["swap-me"])  # accepted as a path (its content is another matter)
    shutil.rmtree(target)
    target.symlink_to(inst.outside / "comparison")
    second, text2 = call(inst, "compare_open", ["swap-me"])
    target.unlink()
    first = "outside" not in text1 and "loop" not in text1
    held = loop_ok and first and not second and "outside" in text2
    return held, f"loop: {text[:70]}; swapped within 10 s: {'followed' if second else text2[:70]}"


@attack("27.M", "the owner-token secret in /config")
def config_secret(inst):
    with http() as c:
        config = c.get(f"{inst.url}config").text
    secret = inst.runs / ".app-secret"
    leaked = secret.is_file() and secret.read_text().strip() in config
    states = [x["props"].get("secret") for x in json.loads(config)["components"] if x.get("type") == "browserstate"]
    public = all(s == "hanorec-owner-token-v1" for s in states)  # app.common.OWNER_STORAGE_CODE, a public name
    return not leaked and public, f"the secret file's value in /config: {leaked}; the page's storage code: {states}"


@attack("27.N", "server paths and tracebacks in replies and job logs")
def leaks(inst):
    call(inst, "train_runs", [], session="n")
    ok, poll = call(inst, "train_poll", ["failed-job", "step", 0.6], session="n")  # job, x-axis, smoothing
    _, err = call(inst, "compare_launch", compare_values(inst, sft_from="no-such-run"))
    _, err2 = call(inst, "data_open_typed", ["no/such/folder", "hit3"])
    texts = [poll, err, err2]
    return ok and all(no_server_path(inst, t) for t in texts), f"poll answered: {ok}; clean: {[no_server_path(inst, t) for t in texts]}"


def without_files(text: str) -> str:
    """A reply's JSON without Gradio's file payloads (FileData: its path and /gradio_api/file= URL name the
    served file, which Gradio needs to serve it; the route itself is attacked in 19.7 and 27.x1)."""

    def strip(value):
        if isinstance(value, dict):
            if "url" in value and "path" in value or (value.get("meta") or {}).get("_type") == "gradio.FileData":
                return None
            return {k: strip(v) for k, v in value.items()}
        return [strip(v) for v in value] if isinstance(value, list) else value

    try:
        return json.dumps(strip(json.loads(text)))
    except ValueError:
        return text


@attack("27.N2", "server paths in the page's menus (/config) and the pickers' replies")
def menu_leaks(inst):
    with http() as c:
        config = c.get(f"{inst.url}config").text
    menus = {x["props"].get("label"): x["props"].get("value") for x in json.loads(config)["components"]
             if x.get("type") == "dropdown"}  # fmt: skip
    dataset, model = menus.get("Dataset"), menus.get("Score candidates with")
    texts = {"/config": config}
    for name, api, data in (("dataset open", "data_open_typed", [dataset, "hit3"]), ("model list", "data_models", []),
                            ("run list", "train_runs", []), ("compare list", "compare_refresh", [])):  # fmt: skip
        done, texts[name] = call(inst, api, data, session="n2")
        if not done:
            return False, f"{name} did not answer: {texts[name][:100]}"
    done, view = call(inst, "data_user", [dataset, "hit3", first_user(inst), model], session="n2")
    if not done:
        return False, f"the user view did not answer: {view[:100]}"
    texts["user view"] = without_files(view)
    temp = ("hanorec-gradio-", "hanorec-images-", "hanorec-downloads-")  # the app's temporary folders
    dirty = [k for k, t in texts.items() if not no_server_path(inst, t) or any(n in t for n in temp)]
    listed = "runs/comparison-n2" in texts["compare list"] and model.startswith("demo_runs/")
    return not dirty and listed, f"menus: dataset {dataset!r}, model {model!r}; replies naming a server folder: {dirty}"


@attack("27.x1", "Gradio's file route for /etc/passwd and the runs folder's secret")
def file_route_outside(inst):
    with http() as c:
        codes = [c.get(f"{inst.url}gradio_api/file={p}").status_code for p in ("/etc/passwd", inst.runs / "failed-job" / "job.log")]
    return all(code >= 400 for code in codes), f"HTTP {codes}"


@attack("27.x2", "NUL bytes, %2e%2e and .. in typed folders")
def path_text(inst):
    for value in ("runs/\x00x", "%2e%2e/%2e%2e/etc", "../../etc", "~/"):
        done, text = call(inst, "data_open_typed", [value, "hit3"])
        if done or not no_server_path(inst, text):
            return False, f"{value!r}: {text[:80]}"
    return True, "one sentence each, no server path"


@attack("27.x3", "run names that climb out of the runs folder")
def run_names(inst):
    for name in ("../evil", "/tmp/evil", ".exports", "a" * 200):
        done, _ = call(inst, "train_launch", train_values(inst, name=name))
        if done:
            return False, f"{name[:30]!r} was queued"
    return True, "refused"


@attack("27.x4", "Compare in demo mode, and Compare's own path in normal mode")
def compare_mode(inst):
    owner = token()
    done, text = call(inst, "compare_launch", compare_values(inst, owner), session="x4")
    if inst.mode == "demo":
        return not done and "demo mode" in text, text[:100]
    if done:
        inst.compare_job = (json.loads(text)[0]["value"], owner)
    return done, "a plain comparison is still queued" if done else text[:100]


@attack("27.x5", "a forged owner token against another visitor's Compare job")
def compare_stop(inst):
    job = getattr(inst, "compare_job", None)
    if job is None:
        return inst.mode == "demo", "no comparison job here (demo mode launches none)"
    call(inst, "compare_refresh", [], session="x5", source=SECOND)
    done, text = call(inst, "compare_stop", [job[0], "y" * 24], session="x5", source=SECOND)
    call(inst, "compare_stop", list(job), session="x4")
    return not done and "another browser" in text, text[:100]


def first_user(inst) -> str:
    done, text = call(inst, "data_open", [str(inst.data), "hit3"])
    return json.loads(text)[0]["value"] if done else "u1"


# ---- the probe ---------------------------------------------------------------------------------------------
def prepare(work: Path) -> None:
    """The probe's folders: a copy of the demo data, a runs folder with the planted files, an outside folder."""
    shutil.copytree(DEMO, work / "data")
    runs, outside = work / "runs", work / "outside"
    runs.mkdir()
    (runs / "damaged-job").mkdir()
    (runs / "damaged-job" / "job.json").write_text('{"stage": "SFT", "comm')
    (runs / "damaged-job" / "status.json").write_text('{"status": "queued", "queued_at": 0}')
    (outside / "queued-job").mkdir(parents=True)
    (outside / "queued-job" / "job.json").write_text(json.dumps({"stage": "SFT", "commands": ["run"]}))
    (outside / "queued-job" / "status.json").write_text(json.dumps({"status": "queued", "queued_at": 1}))
    (runs / "linked-job").symlink_to(outside / "queued-job")
    (runs / "loop").symlink_to(runs / "loop")
    plugin, _ = planted_plugin(outside / "plugins", "planted_config")
    planted = runs / "planted-config"
    shutil.copytree(DEMO_RUN, planted, ignore=shutil.ignore_patterns("dpo", "hano_dpo"))
    config = (planted / "config.yaml").read_text()
    (planted / "config.yaml").write_text(config.replace("plugins: []", f"plugins:\n  - {plugin}"))
    shutil.copytree(DEMO_RUN, runs / "export-me", ignore=shutil.ignore_patterns("dpo", "hano_dpo"))
    for run in (planted, runs / "export-me"):  # a shipped run names its data relative to the repository
        text = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text.replace("path: assets/demo", f"path: {work / 'data'}"))
    failed = runs / "failed-job"
    failed.mkdir()
    (failed / "job.json").write_text(json.dumps({"stage": "SFT", "commands": ["run"], "owner": None}))
    (failed / "status.json").write_text(json.dumps({"status": "failed", "message": f"cannot read {failed}/config.yaml"}))
    (failed / "job.log").write_text(f"Traceback (most recent call last):\n  File \"{ROOT}/hanorec/cli.py\", line 1\n"
                                    f"RuntimeError: boom in {failed}/x.bin\n")  # fmt: skip
    comparison = {"seeds": [0], "summary": [], "methods": [], "protocol": "ranking"}
    for where in (work / "comparison", outside / "comparison", runs / "comparison-n2"):
        where.mkdir(parents=True, exist_ok=True)
        (where / "comparison.json").write_text(json.dumps(comparison))


def plant_bombs(work: Path) -> int:
    """Replace every stored score file with one that unpacks to about a gigabyte (27.K, read at the next start)."""
    import numpy as np

    files = list((work / "runs" / ".cache" / "scores").glob("*.npz"))
    for f in files:
        np.savez_compressed(f, scores=np.zeros((16_000, 16_000), np.float32))
    (work / "planted").write_text(str(len(files)))
    return len(files)


def run_mode(work: Path, mode: str, deadline: float, log=print) -> list[tuple[str, str, bool, str]]:
    inst = Instance(work, mode)
    out = []
    try:
        for key, title, fn in ATTACKS:
            if time.time() > deadline:
                out.append((key, title, False, "not run: the probe's time ran out"))
                continue
            try:
                held, evidence = fn(inst)
            except Exception as e:  # noqa: BLE001 - a probe that cannot finish an attack reports it as a fault
                held, evidence = False, f"the probe failed: {type(e).__name__}: {str(e)[:160]}"
            evidence = " ".join(str(evidence).split())[:220]
            out.append((key, title, bool(held), evidence))
            log(f"{mode:6s} {key:6s} {'held ' if held else 'FAULT'}  {title}: {evidence}")
    finally:
        inst.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="normal,demo", help="comma-separated: normal, demo (default both, in order)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole probe (default 900)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("normal", "demo") for m in modes):
        p.error("--modes takes normal and/or demo")
    deadline = time.time() + args.timeout
    start = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="hanorec-probe-") as tmp:
        work = Path(tmp)
        prepare(work)
        print(f"security probe: {len(ATTACKS)} attacks x {len(modes)} modes against 127.0.0.1 (work folder {work})")
        for i, mode in enumerate(modes):
            if i:
                print(f"planted {plant_bombs(work)} oversized score files for the next start")
            results += [(mode, *r) for r in run_mode(work, mode, deadline)]
    faults = [r for r in results if not r[3]]
    print(f"{len(results) - len(faults)} held, {len(faults)} faults, {len(results)} attack runs "
          f"in {time.time() - start:.0f} s")  # fmt: skip
    return 1 if faults else 0


if __name__ == "__main__":
    threading.current_thread().name = "probe"
    sys.exit(main())
