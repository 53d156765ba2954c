#!/usr/bin/env bash
# Run the fast test suite on another torch build, in a separate virtual environment (the project's .venv
# and what scripts/setup.sh installs are not touched).
#
# Usage: bash scripts/check_torch.sh TORCH_VERSION [PYTHON]
#   e.g. bash scripts/check_torch.sh 2.11.0 python3.12   (the ZeroGPU Space's torch and Python)
# The venv goes to $CHECK_TORCH_VENV (default /tmp/hanorec-torch-VERSION-pyX.Y) and is reused on a rerun.
# TORCH_INDEX=URL takes torch from that index instead of the default one (e.g. a CPU-only build); the
# default index serves the CUDA build on Linux, several GB with its CUDA libraries: check free disk first.
# The log of the run is written to $CHECK_TORCH_LOG (default <venv>/check.log) as well as to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash scripts/check_torch.sh TORCH_VERSION [PYTHON]}
PY=${2:-${PYTHON:-python3}}
if ! [[ $VERSION =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
  echo "check_torch.sh: '$VERSION' is not a torch version (expected e.g. 2.11.0)" >&2
  exit 2
fi
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV=${CHECK_TORCH_VENV:-/tmp/hanorec-torch-$VERSION-py$PYVER}
LOG=${CHECK_TORCH_LOG:-$VENV/check.log}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
echo "== check_torch: torch==$VERSION on $("$VENV/bin/python" -VV | head -1), venv $VENV ($(date -u +%FT%TZ))"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
# torch first, pinned (from TORCH_INDEX when given), then the dev requirements with torch held at it
"${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$VERSION"
REQ="$VENV/requirements-check.txt"
{ grep -v -E "^(-r |torch([<>=!~ ]|$))" requirements.txt requirements-dev.txt -h; echo "torch==$VERSION"; } > "$REQ"
"${PIP[@]}" -r "$REQ"
"$VENV/bin/python" -c 'import torch, transformers, peft, gradio; print("== torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| gradio", gradio.__version__)'
echo "== fast suite"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:3}"
echo "== check_torch: the fast suite passed on torch $VERSION"
