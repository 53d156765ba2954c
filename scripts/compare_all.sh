#!/usr/bin/env bash
# The whole method comparison (SFT, DPO, S-DPO, HaNo-DPO, HaNo-DPO w/o HaRS, HaNo-DPO w/o NoDO) on the bundled
# demo data and on the shared MovieLens copy, 3 seeds, tasks hit3 and hit1, tiny preset on CPU. The two
# datasets run side by side, one core each; each writes its table (with command, machine and wall time) into
# README.md. About an hour on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0,1,2}
OMP_NUM_THREADS=1 "$PY" -m hanorec compare --config configs/compare-tiny.yaml --seeds="$SEEDS" --tasks=hit3,hit1 \
  --readme=README.md > runs-compare-tiny.log 2>&1 &
OMP_NUM_THREADS=1 "$PY" -m hanorec compare --config configs/compare-tiny-movielens.yaml --seeds="$SEEDS" --tasks=hit3,hit1 \
  --readme=README.md > runs-compare-tiny-movielens.log 2>&1 &
wait
tail -n 16 runs-compare-tiny.log runs-compare-tiny-movielens.log
