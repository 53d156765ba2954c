"""The command line: help lists every key, user errors exit 2 with one line on stderr, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hanorec.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, library_noise: bool = False) -> str:
    """The single `error: ...` line; with library_noise, warnings printed before it by libraries are allowed."""
    lines = err.strip().splitlines()
    if not library_noise:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def test_no_arguments_prints_usage(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0
    for command in ("run", "sft", "evaluate", "config", "make-demo"):
        assert command in out


def test_config_help_lists_keys(capsys):
    code, out, err = run_cli(capsys, "config", "--help")
    assert code == 0 and err == ""
    for key in (
        "--seed=",
        "--data.path=",
        "--task.name=",
        "--model.name=",
        "--lora.r=",
        "--sft.lr=",
        "--eval.protocols=",
    ):
        assert key in out
    assert "Peak learning rate" in out  # help text, not just names


def test_python_m_hanorec_config_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hanorec", "config", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--sft.max_steps=" in proc.stdout and "--data.max_users=" in proc.stdout


def test_config_prints_the_resolved_yaml(capsys):
    code, out, _ = run_cli(
        capsys, "config", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--sft.lr=0.01"
    )
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["sft"]["lr"] == 0.01  # the override
    assert resolved["model"]["name"] == "tiny-qwen2.5-vl"  # the preset
    assert resolved["lora"]["target_modules"][0] == "q_proj"  # a default


@pytest.mark.parametrize(
    "override, names",
    [
        ("--sft.lr=abc", ["sft.lr", "'abc'"]),
        ("--task.name=hit7", ["task.name", "'hit7'"]),
        ("--sft.batch_size=-3", ["sft.batch_size", "-3"]),
        ("--sft.nope=1", ["sft.nope"]),
        ("sft.lr=1", ["sft.lr=1"]),
    ],
)
def test_bad_override_exits_2_with_one_line(capsys, override, names):
    code, out, err = run_cli(capsys, "config", override)
    assert code == 2 and out == ""
    line = one_line_error(err)
    for n in names:
        assert n in line


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", f"--config={tmp_path / 'missing.yaml'}")
    assert code == 2
    assert "missing.yaml" in one_line_error(err)


@pytest.mark.parametrize("command", ["run", "sft", "evaluate"])
def test_missing_dataset_exits_2_naming_the_path(capsys, tmp_path, command):
    missing = tmp_path / "no-such-dataset"
    code, _, err = run_cli(capsys, command, f"--data.path={missing}", f"--output_dir={tmp_path / 'run'}")
    assert code == 2
    assert str(missing) in one_line_error(err)
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


def test_evaluate_without_a_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "evaluate",
        f"--data.path={REPO / 'assets' / 'demo'}",
        f"--output_dir={tmp_path}",
        "--model.name=tiny-llava",
        "--model.tiny_hidden_size=64",
    )
    assert code == 2
    line = one_line_error(err, library_noise=True)
    assert "no checkpoint" in line and str(tmp_path) in line


def test_unknown_command_and_bad_make_demo_argument(capsys, tmp_path):
    code, _, err = run_cli(capsys, "trian")
    assert code == 2 and "'trian'" in one_line_error(err)
    code, _, err = run_cli(capsys, "make-demo", f"--out={tmp_path}", "--users=5")
    assert code == 2 and "--users=5" in one_line_error(err)


def _text_only_dataset(root: Path, n_users: int, length: int, n_items: int = 60, noun: str = "Artist") -> Path:
    """A LastFM-like dataset in the HaNoRec layout with no images: users' item sequences and item names."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "titles.csv").write_text(
        "item,title\n" + "".join(f"{i},{noun} {i}\n" for i in range(1, n_items + 1))
    )
    (root / "pairs.tsv").write_text(
        "".join(
            f"u{u}\t" + " ".join(str(1 + (u * 7 + k * 3) % n_items) for k in range(length)) + "\n"
            for u in range(n_users)
        )
    )
    return root


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], list[str]]]:
    """(argv, words the one-sentence error must contain) for mistakes a new user makes."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pairs.tsv").write_text("")
    (empty / "titles.csv").write_text("item,title\n1,A\n")
    short = _text_only_dataset(tmp_path / "short", n_users=30, length=11)
    broken_ckpt = tmp_path / "broken-ckpt"
    (broken_ckpt / "adapter").mkdir(parents=True)
    (broken_ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    out = f"--output_dir={tmp_path / 'run'}"
    demo = f"--data.path={REPO / 'assets' / 'demo'}"
    return [
        (["compare", "--seeds=a"], ["--seeds=a", "integers"]),
        (["compare", "--tasks=hit9"], ["hit9", "hit3"]),
        (["make-demo", f"--out={tmp_path / 'd'}", "--seed=x"], ["--seed=x", "integer"]),
        (["run", "--model.name=foo", out], ["'foo'", "tiny-qwen2.5-vl", "tiny-llava"]),
        (["run", "--model.name=tiny-qwen", out], ["did you mean", "'tiny-qwen2.5-vl'", "'tiny-qwen3-vl'"]),
        (["run", "--model.name=tiny-lava", out], ["did you mean 'tiny-llava'?"]),
        (["run", f"--data.path={empty}", out], ["pairs.tsv", "is empty"]),
        (["run", f"--data.path={short}", "--task.name=next1", out], ["train split", "empty", "shorter history"]),
        (["run", f"--data.path={short}", "--eval.split=val", "--data.split_policy=by_user", "--data.max_users=3", out],
         ["split", "empty"]),  # fmt: skip
        (["run", demo, "--data.image_size=30", out], ["image_size = 30", "multiple of 16"]),
        (["run", demo, "--task.item_verb=ate", out], ["'ate'", "item_verb_present"]),
        (["run", demo, "--task.n_negatives=100000", "--sft.max_steps=1", out], ["unseen", "n_negatives"]),
        (["evaluate", demo, "--model.name=tiny-llava", "--model.tiny_hidden_size=64",
          f"--checkpoint={broken_ckpt}", out], ["broken-ckpt", "damaged"]),  # fmt: skip
        (["config", "--sft.save_every_minutes=-1"], ["save_every_minutes"]),
        (["run", "--config", str(tmp_path / "nope.yaml")], ["nope.yaml"]),
    ]


def test_bad_inputs_end_in_one_sentence_and_exit_2(capsys, tmp_path):
    """Every mistake in the list gives exit status 2, one `error:` line naming the culprit, no traceback."""
    for argv, words in _bad_inputs(tmp_path):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, f"{argv}: exit {code}\n{err}"
        line = one_line_error(err, library_noise=True)
        for w in words:
            assert w in line, f"{argv}: {w!r} not in {line!r}"


def test_bad_inputs_through_the_real_command_have_no_traceback(tmp_path):
    """The same through `python -m hanorec` (a subprocess, as a user types it), for one that used to end in
    a traceback."""
    for argv in (["compare", "--seeds=a"],):
        proc = subprocess.run(
            [sys.executable, "-m", "hanorec", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_config_help_shows_the_presets_values(capsys):
    code, out, _ = run_cli(capsys, "config", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--help")
    assert code == 0
    assert "--sft.lr=0.002" in out and "--output_dir='runs/tiny-cpu'" in out
    assert "configs/tiny-cpu.yaml" in out.splitlines()[0]
    code, out, _ = run_cli(capsys, "config", "--help")
    assert "--sft.lr=0.0001" in out  # library default without a preset
    code, out, _ = run_cli(capsys, "--help")
    assert "config --config preset.yaml" in out  # how to print a resolved configuration
