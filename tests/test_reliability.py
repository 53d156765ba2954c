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
