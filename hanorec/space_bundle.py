"""`python -m hanorec space --out DIR [--mode zerogpu|cpu] [--org ORG]`: the folder to push to a Hugging Face
Space (docs/space.md). It holds a README.md whose YAML front matter configures the Space, a requirements.txt
for the Space's Python (torch pinned from ZeroGPU's supported list, no `spaces`: the runtime provides it),
the Space's app file (app/space.py) with the rest of the app, the package, its configs and the bundled demo
data and runs.

The Hub's rules for the front matter are kept here as data, each from the page that states it, so the
folder is checked before a push instead of failing on the Hub (`check_front_matter`, tests/test_space_bundle.py).
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

from hanorec import spaces
from hanorec.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# ---- the Hub's rules -------------------------------------------------------------------------------------
# Fields and their types: the Spaces configuration reference (hub-docs docs/hub/spaces-config-reference.md,
# https://huggingface.co/docs/hub/spaces-config-reference), plus the model-card license fields Spaces accept.
HUB_FIELD_TYPES: dict[str, type | tuple] = {
    "title": str, "emoji": str, "colorFrom": str, "colorTo": str, "sdk": str, "python_version": str,
    "sdk_version": str, "suggested_hardware": str, "suggested_storage": str, "app_file": str,
    "app_build_command": str, "app_port": int, "base_path": str, "fullWidth": bool, "header": str,
    "short_description": str, "models": list, "datasets": list, "tags": list, "thumbnail": str, "pinned": bool,
    "hf_oauth": bool, "hf_oauth_scopes": list, "hf_oauth_expiration_minutes": int,
    "hf_oauth_authorized_org": (str, list), "disable_embedding": bool, "startup_duration_timeout": str,
    "custom_headers": dict, "preload_from_hub": list, "license": str, "license_name": str, "license_link": str,
}  # fmt: skip
HUB_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
HUB_SDKS = {"gradio", "docker", "static"}
HUB_HARDWARE = {
    "cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8",
    "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8",
}  # fmt: skip
HUB_HEADERS = {"mini", "default"}
OAUTH_EXPIRATION_MAX_MIN = 43200  # "Maximum duration is 43200 minutes (30 days)"
# The Hub refuses a short_description of 60 characters or more (the push fails with a configuration error);
# the reference page names the field without its limit.
SHORT_DESCRIPTION_MAX = 59
# A repo id: "name" or "owner/name", letters, digits, '-', '_', '.' (the Hub's repo naming rules).
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
ORG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
DURATION = re.compile(r"^\d+(s|m|h|d)$")  # startup_duration_timeout: "any valid duration (like 1h, 30m)"

# ---- this Space --------------------------------------------------------------------------------------------
SPACE_PYTHON = spaces.ZERO_GPU_PYTHON[0]  # 3.12.12
SPACE_TORCH = spaces.ZERO_GPU_TORCH[-1]  # 2.11.0: the newest ZeroGPU lists (scripts/check_torch.sh ran on it)
# the real checkpoint the ZeroGPU mode preloads: the paper preset's backbone (its name lives in the config only)
REAL_CONFIG_GLOB = "paper-*-movielens.yaml"


def real_checkpoint() -> str:
    import yaml

    found = sorted((REPO / "configs").glob(REAL_CONFIG_GLOB))
    if not found:
        raise UserError(f"configs/ holds no {REAL_CONFIG_GLOB} to take the real checkpoint's name from.")
    name = ((yaml.safe_load(found[0].read_text()) or {}).get("model") or {}).get("name")
    if not isinstance(name, str) or not REPO_ID.match(name):
        raise UserError(f"{found[0].name} names no Hub model id under model.name.")
    return name


APP_FILE = "app/space.py"
MODES = ("zerogpu", "cpu")
# what the Space needs of the repository (what the Dockerfile copies)
COPIED = ("hanorec", "app", "configs", "assets", "pyproject.toml")
# requirements the Space leaves out: gradio comes with the SDK (sdk_version), jupyterlab is for notebooks
LEFT_OUT = ("gradio", "jupyterlab", "spaces")
OAUTH_REQUIREMENTS = ("authlib>=1.9,<2", "itsdangerous>=2.2,<3")


def gradio_pin(requirements: str) -> str:
    m = re.search(r"^gradio>=([\d.]+),<([\d.]+)", requirements, flags=re.M)
    if not m:
        raise UserError("requirements.txt has no gradio>=X,<Y line to take the Space's sdk_version from.")
    return m.group(1)


def front_matter(
    mode: str = "zerogpu", org: str | list[str] | None = None, requirements: str | None = None
) -> dict:
    """The Space's front matter for a mode: "zerogpu" (the real checkpoint preloaded for the inference tabs,
    training on tiny presets in GPU calls) or "cpu" (a free CPU Space: tiny presets and the warm score cache).
    org: hf_oauth_authorized_org, only members of that organization (a class) may log in."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}.")
    requirements = requirements if requirements is not None else (REPO / "requirements.txt").read_text()
    meta: dict = {
        "title": "HaNoRec Studio",
        "emoji": "🎞️",
        "colorFrom": "indigo",
        "colorTo": "yellow",
        "sdk": "gradio",
        "sdk_version": gradio_pin(requirements),
        "python_version": SPACE_PYTHON,
        "app_file": APP_FILE,
        "pinned": False,
        "license": "apache-2.0",
        "short_description": "HaNo-DPO for multimodal-LLM recommenders, live",
        "hf_oauth": True,
        "hf_oauth_expiration_minutes": 480,
        # the warm score cache is built at start-up (app/space.py): give it room beyond the default 30 minutes
        "startup_duration_timeout": "1h",
        "tags": ["recommendation", "dpo", "multimodal", "lora", "education"],
    }
    if mode == "zerogpu":
        meta["models"] = [real_checkpoint()]
        meta["preload_from_hub"] = [real_checkpoint()]
        meta["tags"] = [*meta["tags"], "zerogpu"]
    else:
        meta["suggested_hardware"] = "cpu-basic"
    if org:
        meta["hf_oauth_authorized_org"] = org
    problems = check_front_matter(meta)
    if problems:
        raise UserError(problems[0])
    return meta


def check_front_matter(meta: dict, zero_gpu: bool | None = None) -> list[str]:
    """Every way `meta` breaks the Hub's documented rules (and ZeroGPU's, when its `models`/`preload_from_hub`
    say it is the ZeroGPU mode or zero_gpu is True), one sentence each; [] when it is valid."""
    out = []
    for key, value in meta.items():
        want = HUB_FIELD_TYPES.get(key)
        if want is None:
            out.append(
                f"front matter field {key!r} is not one the Hub's Spaces configuration reference accepts."
            )
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            out.append(f"front matter field {key!r} must be of type {want}, got {value!r}.")
    if out:
        return out
    for key in ("title", "sdk", "app_file", "short_description"):
        if not str(meta.get(key, "")).strip():
            out.append(f"front matter needs a {key}.")
    desc = meta.get("short_description", "")
    if len(desc) > SHORT_DESCRIPTION_MAX:
        out.append(f"short_description has {len(desc)} characters; the Hub takes fewer than 60.")
    for key in ("colorFrom", "colorTo"):
        if key in meta and meta[key] not in HUB_COLORS:
            out.append(f"{key} {meta[key]!r} is not one of {sorted(HUB_COLORS)}.")
    if meta.get("sdk") not in HUB_SDKS:
        out.append(f"sdk {meta.get('sdk')!r} is not one of {sorted(HUB_SDKS)}.")
    if "suggested_hardware" in meta and meta["suggested_hardware"] not in HUB_HARDWARE:
        out.append(
            f"suggested_hardware {meta['suggested_hardware']!r} is not a hardware flavor the Hub lists."
        )
    if "header" in meta and meta["header"] not in HUB_HEADERS:
        out.append(f"header {meta['header']!r} is not one of {sorted(HUB_HEADERS)}.")
    if "python_version" in meta and not re.fullmatch(r"3\.\d+(\.\d+)?", meta["python_version"]):
        out.append(f"python_version {meta['python_version']!r} is not a 3.x or 3.x.x version.")
    if meta.get("sdk") == "gradio" and not re.fullmatch(r"\d+\.\d+\.\d+", str(meta.get("sdk_version", ""))):
        out.append("a gradio Space needs sdk_version, a gradio version such as 6.31.0.")
    if "emoji" in meta:
        chars = [c for c in meta["emoji"] if c not in "\ufe0f\u200d"]  # variation selector, zero-width joiner
        if len(chars) != 1 or unicodedata.category(chars[0]) != "So":
            out.append(f"emoji {meta['emoji']!r} must be a single emoji.")
    exp = meta.get("hf_oauth_expiration_minutes")
    if exp is not None and not 1 <= exp <= OAUTH_EXPIRATION_MAX_MIN:
        out.append(f"hf_oauth_expiration_minutes {exp} is outside 1..{OAUTH_EXPIRATION_MAX_MIN}.")
    orgs = meta.get("hf_oauth_authorized_org")
    if orgs is not None:
        if not meta.get("hf_oauth"):
            out.append("hf_oauth_authorized_org needs hf_oauth: true.")
        for org in [orgs] if isinstance(orgs, str) else orgs:
            if not isinstance(org, str) or not ORG_NAME.match(org):
                out.append(f"hf_oauth_authorized_org {org!r} is not an organization name.")
    for key in ("models", "datasets"):
        for rid in meta.get(key, []):
            if not isinstance(rid, str) or not REPO_ID.match(rid):
                out.append(f"{key} entry {rid!r} is not a Hub repo id.")
    for item in meta.get("preload_from_hub", []):
        parts = str(item).split(" ")
        if not 1 <= len(parts) <= 3 or not REPO_ID.match(parts[0]):
            out.append(f"preload_from_hub entry {item!r} is not 'repo [file1,file2 [commit]]'.")
        elif len(parts) == 3 and not re.fullmatch(r"[0-9a-f]{40}", parts[2]):
            out.append(f"preload_from_hub entry {item!r} names a commit that is not 40 hex digits.")
    if any(not isinstance(t, str) or not t.strip() for t in meta.get("tags", [])):
        out.append("every tag must be a non-empty string.")
    if "startup_duration_timeout" in meta and not DURATION.match(meta["startup_duration_timeout"]):
        out.append(
            f"startup_duration_timeout {meta['startup_duration_timeout']!r} is not a duration like 30m."
        )
    if zero_gpu is None:
        zero_gpu = "zerogpu" in meta.get("tags", [])
    if zero_gpu:  # ZeroGPU's own rules (https://huggingface.co/docs/hub/spaces-zerogpu, "Compatibility")
        if meta.get("sdk") != "gradio":
            out.append("ZeroGPU runs Gradio-SDK Spaces only: sdk must be gradio.")
        if meta.get("python_version") not in spaces.ZERO_GPU_PYTHON:
            out.append(
                f"python_version {meta.get('python_version')!r} is not one ZeroGPU supports "
                f"({', '.join(spaces.ZERO_GPU_PYTHON)})."
            )
        if int(str(meta.get("sdk_version", "0")).split(".")[0]) < 4:
            out.append("ZeroGPU needs Gradio 4 or later.")
    return out


def space_requirements(requirements: str, torch_version: str = SPACE_TORCH) -> str:
    """The repository's requirements.txt for the Space: torch pinned to torch_version (one ZeroGPU supports),
    without gradio (the SDK installs sdk_version), jupyterlab and spaces."""
    if torch_version not in spaces.ZERO_GPU_TORCH:
        raise UserError(
            f"torch {torch_version} is not one ZeroGPU supports ({', '.join(spaces.ZERO_GPU_TORCH)})."
        )
    lines = [
        f"# the Space's requirements (python -m hanorec space); torch {torch_version} is on ZeroGPU's list"
    ]
    for line in requirements.splitlines():
        name = re.split(r"[<>=!~\[ ;#]", line.strip(), maxsplit=1)[0].lower()
        if not name or line.lstrip().startswith("#") or name in LEFT_OUT:
            continue
        lines.append(f"torch=={torch_version}" if name == "torch" else line)
    lines += ["# the login (hf_oauth): what gradio[oauth] adds, for gr.LoginButton", *OAUTH_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def to_yaml(meta: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


README_BODY = """
# HaNoRec Studio

Multimodal-LLM sequential recommendation with SFT and HaNo-DPO (DPO with hardness-aware beta and Gaussian
noise on the policy; arXiv 2511.18740), to explore in the browser: the data, small training runs, the
negatives' hardness, the noise lab and paired comparisons of preference methods.

Log in with Hugging Face to launch training: jobs belong to your account, and on ZeroGPU the GPU seconds they
use count against your own daily quota (the app says how many a job needs before it starts).
"""


def write_space(out: str | Path, mode: str = "zerogpu", org: str | list[str] | None = None) -> Path:
    """Write the folder to push to a Space into `out` (created; an existing non-empty folder is refused)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; give --out a new folder.")
    if out == REPO or REPO in out.parents:
        raise UserError(f"--out {out} lies inside the repository; give a folder outside it.")
    requirements = (REPO / "requirements.txt").read_text()
    meta = front_matter(mode, org, requirements)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(to_yaml(meta) + README_BODY)
    (out / "requirements.txt").write_text(space_requirements(requirements))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "runs", ".cache")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=ignore, symlinks=False)
        else:
            shutil.copy2(src, out / name)
    return out
