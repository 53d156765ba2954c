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
