"""`python -m hanorec space --out DIR`: the folder to push to a Space, checked against the Hub's documented
front matter rules (hanorec/space_bundle.py keeps them as data, each with its page) and ZeroGPU's versions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hanorec import space_bundle as B
from hanorec import spaces
from hanorec.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def read_front_matter(path: Path) -> dict:
    text = path.read_text()
    m = re.match(r"^---\n(.*?)^---$", text, flags=re.S | re.M)
    assert m, f"{path} does not open with a front matter block"
    return yaml.safe_load(m.group(1))


@pytest.fixture(scope="module")
def space_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "push"
    r = subprocess.run([sys.executable, "-m", "hanorec", "space", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def test_the_folder_holds_what_a_space_needs(space_dir):
    for path in ("README.md", "requirements.txt", B.APP_FILE, "app/main.py", "hanorec/__init__.py",
                 "assets/demo", "assets/demo_runs", "configs/tiny-cpu.yaml"):  # fmt: skip
        assert (space_dir / path).exists(), path
    assert not list(space_dir.rglob("__pycache__")) and not (space_dir / "runs").exists()
    assert not (space_dir / "tests").exists() and not (space_dir / ".git").exists()


def test_front_matter_is_valid_for_the_hub_and_zerogpu(space_dir):
    meta = read_front_matter(space_dir / "README.md")
    assert B.check_front_matter(meta, zero_gpu=True) == []
    assert meta["python_version"] in spaces.ZERO_GPU_PYTHON  # a string, not a YAML float
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == B.gradio_pin(
        (REPO / "requirements.txt").read_text()
    )
    assert meta["hf_oauth"] is True and meta["app_file"] == B.APP_FILE
    assert len(meta["short_description"]) < 60
    assert (
        meta["models"] == meta["preload_from_hub"] == ["Qwen/Qwen2.5-VL-3B-Instruct"] == [B.real_checkpoint()]
    )
    assert meta["tags"] and all(isinstance(t, str) for t in meta["tags"])


def test_requirements_pin_a_zerogpu_torch_without_spaces(space_dir):
    text = (space_dir / "requirements.txt").read_text()
    pins = re.findall(r"^torch==([\d.]+)$", text, flags=re.M)
    assert pins == [B.SPACE_TORCH] and B.SPACE_TORCH in spaces.ZERO_GPU_TORCH
    names = {
        re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower()
        for line in text.splitlines()
        if line[:1].isalpha()
    }
    assert "spaces" not in names and "gradio" not in names  # the runtime and the SDK bring them
    assert {"transformers", "peft", "authlib", "itsdangerous"} <= names


def test_the_projects_own_torch_range_takes_the_space_torch_and_the_local_one():
    from packaging.requirements import Requirement

    line = next(x for x in (REPO / "requirements.txt").read_text().splitlines() if x.startswith("torch"))
    spec = Requirement(line.split("#")[0]).specifier
    assert spec.contains(B.SPACE_TORCH) and spec.contains("2.13.0"), line
    assert "torch==2.13.0" in (REPO / "scripts" / "setup.sh").read_text()  # still what a local setup installs


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"short_description": "x" * 60}, "short_description has 60 characters"),
        ({"python_version": "3.11"}, "not one ZeroGPU supports"),
        ({"colour": "red"}, "'colour' is not one"),
        ({"colorTo": "orange"}, "colorTo 'orange'"),
        ({"hf_oauth_authorized_org": "two words"}, "not an organization name"),
        ({"hf_oauth_expiration_minutes": 50000}, "outside 1..43200"),
        ({"preload_from_hub": ["Qwen/Qwen2.5-VL-3B-Instruct a.json nothex"]}, "not 40 hex digits"),
        ({"models": ["not a repo"]}, "not a Hub repo id"),
        ({"sdk": "docker"}, "Gradio-SDK Spaces only"),
        ({"hf_oauth": "yes"}, "must be of type"),
        ({"startup_duration_timeout": "soon"}, "not a duration"),
        ({"suggested_hardware": "zero-h200"}, "not a hardware flavor"),
    ],
)
def test_each_documented_rule_catches_its_mistake(change, problem):
    meta = {**B.front_matter("zerogpu"), **change}
    found = B.check_front_matter(meta)
    assert any(problem in p for p in found), found


def test_cpu_mode_and_a_class_org():
    meta = B.front_matter("cpu", org="my-class")
    assert meta["suggested_hardware"] == "cpu-basic" and "preload_from_hub" not in meta
    assert meta["hf_oauth_authorized_org"] == "my-class" and B.check_front_matter(meta) == []
    with pytest.raises(UserError, match="--mode must be one of"):
        B.front_matter("tpu")


def test_space_requirements_refuse_a_torch_zerogpu_does_not_list():
    with pytest.raises(UserError, match="not one ZeroGPU supports"):
        B.space_requirements("torch==2.13.0\n", "2.13.0")


def test_docs_front_matter_is_what_the_command_writes():
    assert read_front_matter_block(REPO / "docs" / "space.md") == B.front_matter("zerogpu")


def read_front_matter_block(path: Path) -> dict:
    m = re.search(r"^---\n(.*?)^---$", path.read_text(), flags=re.S | re.M)
    assert m, f"{path} holds no front matter block"
    return yaml.safe_load(m.group(1))


def test_the_command_refuses_a_used_folder_and_bad_options(tmp_path):
    (tmp_path / "x").write_text("")
    r = subprocess.run([sys.executable, "-m", "hanorec", "space", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "is not an empty folder" in r.stderr
    r = subprocess.run([sys.executable, "-m", "hanorec", "space", f"--out={tmp_path / 'n'}", "--zone=eu"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "space takes --out=DIR" in r.stderr
    with pytest.raises(UserError, match="inside the repository"):
        B.write_space(REPO / "build" / "space-out")
