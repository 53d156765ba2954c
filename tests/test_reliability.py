"""Reliability under faults and bad input (issue 11, item 3), on top of test_resume.py (kills before the
first checkpoint and between checkpoints), test_cli.py / test_data.py / test_config.py (malformed TSV/CSV,
unknown model names, invalid hyperparameters) and test_fuzz.py (hypothesis).

- SIGKILL at 6 moments of one SFT run, 3 of them inside a checkpoint write: after every kill each complete
  checkpoint loads, and the run, resumed after each kill, ends with the uninterrupted run's weights and
  metrics log (slow).
- Bad inputs through the real command: each ends in one `error:` sentence naming the culprit, exit 2.
- trust_remote_code: a checkpoint's own code never runs unless the user turns it on.

scripts/reliability_report.py reruns this file and quotes its figures.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from hanorec.cli import main
from hanorec.train.checkpoint import (
    PAUSE_ENV,
    STATE_FILE,
    _load_tensors,
    checkpoint_dirs,
    latest_checkpoint,
    read_adapter_weights,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
TINY = [
    "--model.name=tiny-llava", "--model.tiny_hidden_size=64", "--model.tiny_vocab_size=400",
    "--data.max_users=20", "--task.max_train_examples=8", "--task.max_eval_examples=4",
    "--sft.max_steps=1", "--sft.progress_bar=false", "--pref.max_steps=1", "--pref.progress_bar=false",
    "--eval.baselines=[]",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
def demo_copy(tmp: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(DEMO, root)
    return root


def non_image(tmp):
    root = demo_copy(tmp)
    (root / "images" / "7.jpg").write_bytes(b"<html>not a poster</html>")
    return ["run", f"--data.path={root}"], ["7.jpg", "cannot be read"]


def truncated_images(tmp):
    """Every poster cut in half: the header check passes, decoding fails when a prompt needs the image."""
    root = demo_copy(tmp)
    for f in (root / "images").glob("*.jpg"):
        b = f.read_bytes()
        f.write_bytes(b[: len(b) // 2])
    return ["run", f"--data.path={root}"], ["images", ".jpg", "cannot be read"]


def decompression_bomb(tmp):
    """196 M pixels in a 24 kB PNG: refused by the header check, never decoded."""
    root = demo_copy(tmp)
    (root / "images" / "7.jpg").unlink()
    Image.new("1", (14000, 14000)).save(root / "images" / "7.png")
    return ["run", f"--data.path={root}"], ["7.png", "cannot be read"]


def huge_image(tmp):
    """100 M pixels: under PIL's error limit but above its warning one; refused rather than decoded."""
    root = demo_copy(tmp)
    (root / "images" / "7.jpg").unlink()
    Image.new("1", (10000, 10000)).save(root / "images" / "7.png")
    return ["run", f"--data.path={root}"], ["7.png", "cannot be read"]


def id_missing_from_titles(tmp):
    root = demo_copy(tmp)
    pairs = (root / "pairs.tsv").read_text().splitlines()
    pairs[1] = pairs[1] + " 99999"
    (root / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    return ["run", f"--data.path={root}"], ["pairs.tsv", "Line 2", "'99999'"]


def empty_history(tmp):
    root = demo_copy(tmp)
    pairs = (root / "pairs.tsv").read_text().splitlines()
    pairs[2] = pairs[2].split("\t")[0] + "\t "
    (root / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    return ["run", f"--data.path={root}"], ["pairs.tsv", "Line 3", "empty item list"]


def hardness_k_above_items(tmp):
    return ["pref", f"--data.path={DEMO}", "--pref.hardness_k=300"], ["pref.hardness_k = 300", "300"]


def k_negatives_above_candidates(tmp):
    return (["pref", f"--data.path={DEMO}", "--pref.method=sdpo", "--pref.k_negatives=50"],
            ["pref.k_negatives = 50", "4 negatives"])  # fmt: skip


def config_unknown_keys(tmp):
    cfg = tmp / "preset.yaml"
    cfg.write_text("seed: 0\nsft:\n  lr: 1.0e-4\n  learning_rate: 3.0e-4\n")
    return ["run", "--config", str(cfg)], ["learning_rate"]


def config_unknown_section(tmp):
    cfg = tmp / "preset.yaml"
    cfg.write_text("seed: 0\ntrainer:\n  lr: 1.0e-4\n")
    return ["run", "--config", str(cfg)], ["trainer"]


def negative_sigma(tmp):
    return ["run", "--pref.noise_sigma=-0.1"], ["noise_sigma", "-0.1"]


def beta0_zero(tmp):
    return ["run", "--pref.beta=0"], ["pref.beta", "0"]


def beta0_nan(tmp):
    return ["run", "--pref.beta=nan"], ["pref.beta = nan", "not a finite number"]


def sigma_infinite(tmp):
    return ["run", "--pref.noise_sigma=inf"], ["pref.noise_sigma = inf", "not a finite number"]


def lr_overflows_to_infinity(tmp):
    return ["run", "--sft.lr=1e400"], ["sft.lr = inf", "not a finite number"]


def epochs_huge(tmp):
    return ["run", "--sft.epochs=1e9"], ["sft.epochs", "out of range"]


def seed_negative(tmp):
    return ["run", "--seed=-1"], ["seed = -1", "[0, 4294967295]"]


def seed_two_to_the_64(tmp):
    return ["run", f"--seed={2**64}"], ["seed = 18446744073709551616", "out of range"]


def hardness_k_a_million(tmp):
    return ["run", "--pref.hardness_k=1000000"], ["pref.hardness_k = 1000000", "out of range"]


def max_steps_nan(tmp):
    return ["run", "--sft.max_steps=nan"], ["sft.max_steps = 'nan'", "not a valid int"]


def trust_remote_code_model(tmp):
    return ["run", f"--data.path={DEMO}", f"--model.name={remote_code_model(tmp)}"], ["its own Python code",
                                                                                      "trust_remote_code"]  # fmt: skip


BAD_INPUTS = [
    non_image, truncated_images, decompression_bomb, huge_image, id_missing_from_titles,
    empty_history, hardness_k_above_items, k_negatives_above_candidates, config_unknown_keys,
    config_unknown_section, negative_sigma, beta0_zero, trust_remote_code_model, beta0_nan, sigma_infinite,
    lr_overflows_to_infinity, epochs_huge, seed_negative, seed_two_to_the_64, hardness_k_a_million, max_steps_nan,
]  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 1-step SFT run that the `pref` cases start from."""
    out = tmp_path_factory.mktemp("sft")
    assert main(["sft", f"--data.path={DEMO}", f"--output_dir={out}", *TINY]) == 0
    return out


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_is_one_sentence_and_exit_2(case, tmp_path, capsys, request):
    argv, words = case(tmp_path)
    out = request.getfixturevalue("sft_run") if argv[0] == "pref" else tmp_path / "run"
    capsys.readouterr()
    code = main([argv[0], *TINY, *argv[1:], f"--output_dir={out}"])  # the case's own options win
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    for w in words:
        assert w in lines[0], (w, lines[0])
    if argv[0] == "pref":  # nothing lost: the SFT checkpoint the command started from is untouched
        assert latest_checkpoint(out / "sft") is not None


@pytest.mark.parametrize("kind", ["truncated", "bomb", "huge"])
def test_bad_image_refused_when_used_without_the_header_check(kind, tmp_path):
    """load_dataset(check_images=False) skips the header check (the app's quick open); the image is then
    refused when a prompt needs it, in one sentence naming the file, and never decoded whole."""
    from hanorec.data import DataError, load_dataset

    root = demo_copy(tmp_path)
    poster = root / "images" / "7.jpg"
    if kind == "truncated":
        Image.effect_noise((256, 256), 60).convert("RGB").save(poster, quality=95)
        poster.write_bytes(poster.read_bytes()[:-2000])
        words = ["7.jpg", "truncated"]
    else:
        poster.unlink()
        poster = poster.with_suffix(".png")
        Image.new("1", (14000, 14000) if kind == "bomb" else (10000, 10000)).save(poster)
        words = ["7.png", "exceeds limit"]
    ds = load_dataset(root, check_images=False)
    with pytest.raises(DataError) as info:
        ds.load_image("7", size=64)
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# ------------------------------------------------------------------------------------------------
# trust_remote_code
# ------------------------------------------------------------------------------------------------
def remote_code_model(tmp: Path) -> Path:
    """A local checkpoint whose config class is its own code; importing it writes tmp/CODE_RAN."""
    m = tmp / "remote-code-model"
    m.mkdir(exist_ok=True)
    (m / "config.json").write_text(json.dumps({"model_type": "own-vlm", "auto_map": {"AutoConfig": "configuration_own.OwnConfig"}}))
    (m / "configuration_own.py").write_text(
        "from pathlib import Path\n"
        "from transformers import PretrainedConfig\n"
        f"Path({str(tmp / 'CODE_RAN')!r}).write_text('ran')\n"
        "class OwnConfig(PretrainedConfig):\n"
        "    model_type = 'own-vlm'\n"
    )
    return m


def test_trust_remote_code_is_off_unless_turned_on(tmp_path):
    """The default configuration never runs a checkpoint's code; --model.trust_remote_code=true does (in a
    subprocess with its own module cache, so nothing lands in the user's)."""
    from hanorec.config import load_config

    assert load_config().model.trust_remote_code is False
    model = remote_code_model(tmp_path)
    marker = tmp_path / "CODE_RAN"
    script = (  # one interpreter: the default first (the code must not run), then turned on
        "import pathlib\n"
        "from hanorec.models import ModelError, load_model\n"
        "for trust in (False, True):\n"
        "    try:\n"
        f"        load_model({str(model)!r}, trust_remote_code=trust)\n"
        "    except ModelError as e:\n"
        f"        print(trust, pathlib.Path({str(marker)!r}).exists(), e, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    off, on = (proc.stdout.strip().splitlines() + ["", ""])[:2]
    assert off.startswith("False False ") and "ships its own Python code" in off, proc.stdout + proc.stderr
    assert on.startswith("True True ") and "not supported" in on, proc.stdout + proc.stderr  # on: it ran


# ------------------------------------------------------------------------------------------------
# SIGKILL at random moments, including inside checkpoint writes
# ------------------------------------------------------------------------------------------------
STEPS, SAVE_EVERY = 12, 4


def sft_cmd(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "hanorec", "sft", f"--data.path={DEMO}", f"--output_dir={out}", "--seed=0",
        "--data.max_users=40", "--task.max_train_examples=64", "--model.name=tiny-llava",
        "--model.tiny_hidden_size=64", "--model.tiny_vocab_size=400", "--lora.r=4", "--lora.alpha=8",
        "--lora.dropout=0.05", f"--sft.max_steps={STEPS}", "--sft.batch_size=2", "--sft.grad_accum=2",
        "--sft.lr=1e-3", "--sft.log_every=1", f"--sft.save_every={SAVE_EVERY}", "--sft.save_every_minutes=0",
        "--sft.keep_checkpoints=2", "--sft.progress_bar=false",
    ]  # fmt: skip


def env(pause: float = 0.0) -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    e.pop(PAUSE_ENV, None)
    if pause:
        e[PAUSE_ENV] = str(pause)
    return e


def kill_points(seed: int = 11) -> list[tuple[str, int]]:
    """("step", n): SIGKILL once n steps are logged (the process is somewhere in the steps after);
    ("write", n): SIGKILL while checkpoint step-n is being written (its .tmp- folder exists)."""
    rng = random.Random(seed)
    return [("step", rng.randint(1, 3)), ("write", 4), ("step", rng.randint(5, 7)), ("write", 8),
            ("step", rng.randint(9, 11)), ("write", 12)]  # fmt: skip


def wait_and_kill(proc: subprocess.Popen, out: Path, kind: str, n: int) -> None:
    log, tmp = out / "sft" / "metrics.jsonl", out / "sft" / "checkpoints" / f".tmp-step-{n:06d}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        hit = tmp.is_dir() if kind == "write" else log.is_file() and len(log.read_text().splitlines()) >= n
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended before the {kind} {n} kill point: {proc.communicate()[0][-3000:]}")


def assert_every_checkpoint_loads(out: Path) -> list[str]:
    """Each folder that looks complete is complete: adapter, optimizer, scheduler and RNG state all load."""
    names = []
    for ckpt in checkpoint_dirs(out / "sft"):
        state = json.loads((ckpt / STATE_FILE).read_text())
        assert ckpt.name == f"step-{state['global_step']:06d}"
        assert read_adapter_weights(ckpt / "adapter")
        for part in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            _load_tensors(ckpt / part)
        names.append(ckpt.name)
    return names


def metrics(out: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


@pytest.mark.slow
def test_sigkill_at_six_moments_including_checkpoint_writes(tmp_path, record_property):
    ref = tmp_path / "ref"
    done = subprocess.run(sft_cmd(ref), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "killed"
    survived = []
    for kind, n in kill_points():
        proc = subprocess.Popen(sft_cmd(out), cwd=REPO, env=env(pause=1.0), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        wait_and_kill(proc, out, kind, n)
        complete = assert_every_checkpoint_loads(out)
        if kind == "write":
            assert (out / "sft" / "checkpoints" / f".tmp-step-{n:06d}").is_dir()
            assert f"step-{n:06d}" not in complete, "a half-written checkpoint must not look complete"
        survived.append(f"{kind}@{n}: complete checkpoints {complete}")
    again = subprocess.run(sft_cmd(out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_every_checkpoint_loads(out)
    record_property("faults_survived", len(survived))
    print("\n".join(survived))
    assert metrics(out) == metrics(ref)  # every step once; every resumed segment's losses and lrs, bit for bit
    a = read_adapter_weights(latest_checkpoint(ref / "sft") / "adapter")
    b = read_adapter_weights(latest_checkpoint(out / "sft") / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# A public demo (issue 19): hostile numbers, damaged and linked run folders, name races, backbone ids,
# ownership and caps, through the job manager and through gradio_client against a running app
# ------------------------------------------------------------------------------------------------
def quick(steps: int = 2) -> dict:
    return {"data": {"path": str(DEMO), "max_users": 20}, "model": {"name": "tiny-llava"},
            "sft": {"max_steps": steps, "progress_bar": False}}  # fmt: skip


def idle_manager(runs_dir: Path, **kw):
    """A JobManager whose queue never starts anything (the tests look at the queue and the folders alone)."""
    from hanorec.jobs import JobManager

    m = JobManager(runs_dir, autostart=False, **kw)
    m.started = []
    m._start = lambda run, job: m.started.append(run.name) or run.name
    return m


def run_folders(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in runs_dir.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(
    "over, words",
    [
        ({"pref": {"beta": float("nan")}}, "pref.beta = nan is not a finite number"),
        ({"pref": {"noise_sigma": float("inf")}}, "pref.noise_sigma = inf is not a finite number"),
        ({"sft": {"lr": "1e400"}}, "sft.lr = inf is not a finite number"),
        ({"sft": {"epochs": 1e12}}, "sft.epochs = 1000000000000.0 is out of range"),
        ({"seed": -1}, "seed = -1 must be in [0, 4294967295]"),
        ({"seed": 2**64}, "seed = 18446744073709551616 is out of range"),
        ({"pref": {"hardness_k": 10**6}}, "pref.hardness_k = 1000000 is out of range"),
    ],
)
def test_job_manager_refuses_bad_numbers_before_queueing(tmp_path, over, words):
    from hanorec.config import ConfigError
    from hanorec.jobs import _merge

    m = idle_manager(tmp_path)
    with pytest.raises(ConfigError) as info:
        m.submit(_merge(quick(), over), stage="HaNo-DPO", name="bad")
    assert words in str(info.value) and "\n" not in str(info.value)
    assert run_folders(tmp_path) == [] and m.started == []


def test_a_damaged_run_folder_is_listed_as_unreadable_and_the_rest_work(tmp_path):
    from hanorec import runs
    from hanorec.jobs import JOB_FILE, UNREADABLE

    m = idle_manager(tmp_path)
    m.tick = lambda: None  # queue two jobs, then damage the first
    for name in ("broken", "fine"):
        m.submit(quick(), name=name)
    (tmp_path / "broken" / JOB_FILE).write_text('{"stage": "SFT", "comm')  # truncated mid-write
    (tmp_path / "garbage").mkdir()  # a run folder whose status.json is not even text
    (tmp_path / "garbage" / runs.STATUS_FILE).write_bytes(b"\xff\xfe\x00binary")
    listed = {j.job_id: j for j in m.jobs()}
    assert listed["broken"].state == UNREADABLE
    assert "job.json is unreadable" in listed["broken"].message and "\n" not in listed["broken"].message
    assert listed["fine"].state == "queued" and listed["fine"].position == 2
    assert {i.name for i in runs.list_runs(tmp_path)} >= {"broken", "fine", "garbage"}
    del m.tick  # the scheduler: the damaged job leaves the queue with its sentence, the next one starts
    assert m.tick() == "fine" and m.started == ["fine"]
    assert runs.read_status(tmp_path / "broken")["status"] == "failed"
    assert "job.json is unreadable" in runs.read_status(tmp_path / "broken")["message"]
    m.submit(quick(), name="after")  # launching still works beside the damaged folder
    assert "after" in m.queue()


def test_a_failed_write_never_leaves_half_a_job(tmp_path, monkeypatch):
    from hanorec import jobs, runs

    m = idle_manager(tmp_path)
    real = runs._write_json

    def failing(path, value):
        if path.name == jobs.JOB_FILE:
            raise OSError(28, "No space left on device")
        return real(path, value)

    monkeypatch.setattr(runs, "_write_json", failing)
    with pytest.raises(OSError):
        m.submit(quick(), name="half")
    assert run_folders(tmp_path) == [] and m.queue() == []


def test_symlinks_in_the_runs_folder_are_never_followed(tmp_path):
    from hanorec import runs
    from hanorec.jobs import JobError

    runs_dir, outside = tmp_path / "runs", tmp_path / "outside"
    runs_dir.mkdir()
    planted = idle_manager(outside)
    planted.tick = lambda: None
    planted.submit(quick(), name="planted")  # a queued job, outside the runs folder
    (outside / "planted" / "sft").mkdir()
    (outside / "planted" / "sft" / runs.METRICS_FILE).write_text('{"step": 1, "loss": 0.5}\n')
    (runs_dir / "link").symlink_to(outside / "planted", target_is_directory=True)
    (runs_dir / "linked-parent").symlink_to(outside, target_is_directory=True)  # a "comparison" folder link
    m = idle_manager(runs_dir)
    assert m.queue() == [] and m.jobs() == [] and m.tick() is None and m.started == []
    with pytest.raises(JobError, match="symbolic link"):
        m.status("link")
    with pytest.raises(JobError, match="symbolic link"):
        m.stop("link")
    assert runs.list_runs(runs_dir) == []  # neither the run nor its metrics are shown
    assert runs.read_status(outside / "planted")["status"] == "queued"  # nothing was written there


def test_two_launches_with_one_name_at_once_give_the_usual_sentence(tmp_path, monkeypatch):
    """Both launches pass the early name check (forced: it is patched to see no folder), then race for the
    folder under the queue lock: the loser gets 'already exists', never a bare error."""
    import threading

    from hanorec import jobs

    m = idle_manager(tmp_path)
    m.tick = lambda: None
    monkeypatch.setattr(jobs.os.path, "lexists", lambda p: False)
    barrier, results = threading.Barrier(2), []

    def go():
        barrier.wait()
        try:
            results.append(m.submit(quick(), name="same"))
        except Exception as e:  # noqa: BLE001 - what the loser gets is the point
            results.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if isinstance(r, Exception)]
    assert results.count("same") == 1 and len(errors) == 1, results
    assert isinstance(errors[0], jobs.JobError) and "a run named 'same' already exists" in str(errors[0])
    assert m.queue() == ["same"]


@pytest.mark.parametrize(
    "name, words",
    [
        ("org/mo\x00del", "NUL byte"),
        ("%2e%2e/%2e%2e/etc", "looks URL-encoded"),
        ("o/" + "m" * 298, "300 characters long"),
        ("org/" + "m" * 97, "owner/name"),
        ("a/b/c", "owner/name"),
        ("org--x/name", "owner/name"),
        ("no-such-org/no-such-model", "not in the local Hugging Face cache"),
    ],
)
def test_backbone_ids_are_checked_before_queueing(tmp_path, name, words):
    from hanorec.jobs import _merge
    from hanorec.models import ModelError

    m = idle_manager(tmp_path)
    with pytest.raises(ModelError) as info:
        m.submit(_merge(quick(), {"model": {"name": name}}), name="bb")
    assert words in str(info.value) and "\n" not in str(info.value)
    assert run_folders(tmp_path) == []


def test_ownership_and_queue_caps_in_the_job_manager(tmp_path):
    from hanorec.jobs import JOB_FILE, JobError

    m = idle_manager(tmp_path, max_queued=3, max_per_owner=2)
    m.tick = lambda: None
    alice, bob = "a" * 24, "b" * 24
    m.submit(quick(), name="a1", owner=alice)
    m.submit(quick(), name="a2", owner=alice)
    with pytest.raises(JobError, match="this browser already has 2 jobs waiting or running"):
        m.submit(quick(), name="a3", owner=alice)
    m.submit(quick(), name="b1", owner=bob)
    with pytest.raises(JobError, match=r"the queue is full \(3 jobs waiting, at most 3\)"):
        m.submit(quick(), name="b2", owner=bob)
    assert alice not in (tmp_path / "a1" / JOB_FILE).read_text()  # only a hash of the token is kept
    with pytest.raises(JobError, match="launched from another browser; only that browser can stop it"):
        m.stop("a1", owner=bob)
    assert m.status("a1").state == "queued"
    assert m.stop("a1", owner=alice).state == "stopped"
    with pytest.raises(JobError, match="only that browser can resume it"):
        m.resume("a1", owner=bob)
    assert m.stop("b1").state == "stopped"  # a local caller (no token: the CLI, a notebook) may
    assert run_folders(tmp_path) == ["a1", "a2", "b1"]


# ---- the same through the app, over HTTP --------------------------------------------------------
def serve(demo, options: dict) -> str:
    """The app on a free loopback port (scripts/load_jobs.serve: retried when a loaded machine makes Gradio's
    start-up check time out)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from load_jobs import serve as serve_

    return serve_(demo, options)


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    """The app in demo mode on a free port, with a job queue that never starts training (requests only)."""
    from app.main import build_app, launch_options, make_context

    runs_dir = tmp_path_factory.mktemp("app-runs")
    ctx = make_context([str(DEMO)], str(runs_dir), "cpu", demo=True)
    ctx.jobs.close()
    ctx.jobs = idle_manager(runs_dir, max_queued=4, max_per_owner=1)
    ctx.jobs.tick = lambda: None
    demo = build_app(ctx)
    url = serve(demo, launch_options(ctx))
    try:
        yield ctx, url, demo
    finally:
        demo.close()


LAUNCH = dict(dataset=str(DEMO), backbone="tiny-llava", stage="SFT", task="hit3", sft_from="train SFT first, in this run",
              beta0=0.1, sigma=0.05, noise_target="lora", k_negatives=3, sampling="random", epochs=1, lr=0,
              max_steps=10, eval_examples=20, log_with="none (metrics.jsonl only)", seed=0, name="", hars_k=10,
              hars_temperature=1.0)  # fmt: skip


def _launch_values(owner="", **changes) -> list:
    """The Train tab's launch inputs in order: the form (FORM_FIELDS), each method's options, the owner token."""
    from app.tabs.train import FORM_FIELDS
    from hanorec import methods

    values = {**LAUNCH, "addons": [], **changes}
    options = [k.default for m in methods.all_methods() for k in methods.option_knobs(m)]
    return [values[f] for f in FORM_FIELDS] + options + [owner]


def _launch(client, owner="", **changes):
    return client.predict(*_launch_values(owner, **changes), api_name="/train_launch")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("seed", "NaN", "Seed: nan is not a finite number"),
        ("seed", "-Infinity", "Seed: -inf is not a finite number"),
        ("seed", "12abc", "Seed: '12abc' is not a number"),
        ("seed", 1.5, "Seed: 1.5 is not a whole number"),
        ("max_steps", [1, 2], "max steps (empty: epochs): a number is needed, not list"),
        ("max_steps", 10_000, "max steps (empty: epochs): 10000 is above the maximum, 60"),  # demo mode's cap
        ("eval_examples", 5_000, "evaluation prompts: 5000 is above the maximum, 100"),
        ("beta0", "NaN", "beta (HaNo-DPO: beta0): nan is not a finite number"),
        ("sigma", {"a": 1}, "noise sigma (NoDO): a number is needed, not dict"),
        ("epochs", -1, "epochs: -1 is below the minimum, 0.01"),
        ("backbone", "org/" + "m" * 300, "characters long"),
        ("backbone", "no-such-org/model-x", "not in the local Hugging Face cache"),
    ],
)
def test_hostile_fields_get_one_sentence_through_the_api(demo_app, field, value, words):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    ctx, url, _ = demo_app
    before = run_folders(ctx.runs_dir)
    with pytest.raises(AppError) as info:
        _launch(Client(url, verbose=False), **{field: value})
    message = str(info.value)
    assert words in message and "\n" not in message.strip(), message
    assert run_folders(ctx.runs_dir) == before  # nothing queued


def test_raw_json_nan_and_infinity_get_one_sentence(demo_app):
    """JSON clients can send the bare tokens NaN and Infinity (Python's json reads them): the same sentence."""
    import json as json_

    import httpx

    _, url, _ = demo_app
    for token, words in (("NaN", "Seed: nan is not a finite number"), ("Infinity", "Seed: inf is not a finite number")):
        body = json_.dumps({"data": _launch_values(seed="seed-here")}).replace('"seed-here"', token)
        assert token in body
        event = httpx.post(f"{url}gradio_api/call/train_launch", content=body,
                           headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
        stream = httpx.get(f"{url}gradio_api/call/train_launch/{event}", timeout=60).text
        assert "event: error" in stream and words in stream, stream[:500]


def test_noise_draws_and_sliders_refuse_nonsense_through_the_api(demo_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    _, url, _ = demo_app
    client = Client(url, verbose=False)
    user = client.predict(str(DEMO), "hit3", api_name="/data_open")[0]["value"]
    for draws, words in ((500, "draws: 500 is above the maximum, 50"), ("nan", "draws: nan is not a finite")):
        with pytest.raises(AppError, match=words):
            client.predict(str(DEMO), "hit3", user, "base", "lora", 0.02, draws, 0, api_name="/noise_draw")
    with pytest.raises(AppError, match=re.escape("K neighbours (paper: 10): 'many' is not a number")):
        client.predict(str(DEMO), "hit3", "base", "many", 1.0, "random", 0, api_name="/hardness_compute")


def test_two_browsers_cannot_stop_each_others_jobs_and_caps_hold(demo_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    ctx, url, _ = demo_app
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    picker, status, token_a = _launch(a, name="own-a")
    assert picker["value"] == "own-a" and len(token_a) >= 16
    with pytest.raises(AppError, match=r"this visitor \(address or login\) already has 1 jobs waiting or running"):
        _launch(a, owner=token_a, name="own-a2")  # demo mode: one job per visitor
    with pytest.raises(AppError, match="already has 1 jobs waiting or running"):
        _launch(b, name="own-b")  # a fresh browser (a new token) from the same address shares that cap
    token_b = "b" * 24
    b.predict(api_name="/train_runs")  # b's page refreshes its job picker (it launched nothing)
    for _who, owner in (("b", token_b), ("a stranger with no token", ""), ("a forged token", "x" * 24)):
        with pytest.raises(AppError, match="launched from another browser"):
            b.predict("own-a", owner, api_name="/train_stop")
    assert ctx.jobs.status("own-a").state == "queued"
    assert "stopped" in a.predict("own-a", token_a, api_name="/train_stop")
    assert "queued" in a.predict("own-a", token_a, api_name="/train_resume")
    ctx.jobs.max_per_owner = 10  # every client here is 127.0.0.1: lift the per-visitor cap to reach the total
    try:
        for i in range(3):  # fill the total cap (4 in this app) from fresh browsers
            _launch(Client(url, verbose=False), name=f"other-{i}")
        with pytest.raises(AppError, match="the queue is full"):
            _launch(Client(url, verbose=False), name="one-too-many")
    finally:
        ctx.jobs.max_per_owner = 1
    assert "one-too-many" not in ctx.jobs.queue()


def test_the_app_uses_its_own_temp_folder_a_small_upload_limit_and_a_bounded_queue(demo_app):
    import tempfile

    import httpx

    from app.main import MAX_FILE_SIZE, QUEUE_SIZE

    ctx, url, demo = demo_app
    own = os.environ["GRADIO_TEMP_DIR"]
    assert Path(own).name.startswith("hanorec-gradio-") and Path(own).parent == Path(tempfile.gettempdir())
    assert oct(Path(own).stat().st_mode & 0o777) == "0o700"
    assert MAX_FILE_SIZE == "2mb" and demo.max_file_size == 2 * 1024**2
    big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.bin", b"0" * (3 * 1024**2))}, timeout=60)
    assert big.status_code == 403, big.text[:200]  # the app takes no file at all (issue 27): the route is refused
    small = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.txt", b"hello")}, timeout=60)
    assert small.status_code == 403 and "no uploads" in small.text and own not in small.text
    assert demo._queue.max_size == QUEUE_SIZE


def test_optional_login_from_the_environment(monkeypatch):
    from gradio_client import Client

    from app.main import auth_from_env, build_app, launch_options, make_context

    monkeypatch.setenv("HANOREC_AUTH", "visitor:s3cret")
    assert auth_from_env() == [("visitor", "s3cret")]
    monkeypatch.setenv("HANOREC_AUTH", "nocolon")
    with pytest.raises(ValueError, match="user:password pairs"):
        auth_from_env()
    monkeypatch.setenv("HANOREC_AUTH", "visitor:s3cret")
    ctx = make_context([str(DEMO)], str(Path(tempfile_dir()) / "runs"), "cpu")
    ctx.jobs.close()
    demo = build_app(ctx)
    url = serve(demo, launch_options(ctx))
    try:
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's error for a login page varies by version
            Client(url, verbose=False)
        ok = Client(url, auth=("visitor", "s3cret"), verbose=False)
        assert ok.predict(str(DEMO), "hit3", api_name="/data_open")[0]["value"]
    finally:
        demo.close()


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="hanorec-login-")


def test_demo_mode_switches():
    from app.main import demo_mode

    env = {k: os.environ.pop(k, None) for k in ("HANOREC_DEMO", "SPACE_ID")}
    try:
        assert demo_mode() is False and demo_mode(True) is True
        os.environ["SPACE_ID"] = "someone/hanorec-studio"
        assert demo_mode() is True
        os.environ["HANOREC_DEMO"] = "0"
        assert demo_mode() is False and demo_mode(True) is True
    finally:
        for k, v in env.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def test_damaged_and_linked_run_folders_through_the_app(demo_app, tmp_path):
    from gradio_client import Client

    from hanorec.jobs import JOB_FILE

    ctx, url, _ = demo_app
    for job in ctx.jobs.queue():  # room in the queue (the caps test filled it)
        ctx.jobs.stop(job)
    client = Client(url, verbose=False)
    _, _, token = _launch(client, name="to-damage")
    (ctx.runs_dir / "to-damage" / JOB_FILE).write_text("{")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (ctx.runs_dir / "link-out").symlink_to(outside, target_is_directory=True)
    table, *_ = client.predict(api_name="/train_runs")
    status, bar, curves, log, jobs = client.predict("to-damage", api_name="/train_poll")
    assert "job.json is unreadable" in status
    rows = {r[0]: r for r in jobs["data"]}
    assert rows["to-damage"][2] == "unreadable" and "link-out" not in rows
    with pytest.raises(Exception, match="job.json is unreadable"):
        client.predict("to-damage", token, api_name="/train_stop")
    # the page still lists, launches and stops the other jobs
    fresh = Client(url, verbose=False)
    _, _, other = _launch(fresh, name="after-damage")
    assert "stopped" in fresh.predict("after-damage", other, api_name="/train_stop")
