#!/usr/bin/env bash
# The whole method comparison: SFT and every method of the registry (DPO, S-DPO, HaNo-DPO and its two
# ablations, beta-DPO, cDPO, rDPO, IPO, SimPO, DMPO, DynamicPO, mDPO: --variants=all, so whatever
# `python -m hanorec methods` lists) on the bundled demo data and on the shared MovieLens copy,
# 3 seeds, tiny preset on CPU, evaluated with the catalogue protocol (100 sampled unseen items per test user,
# random HR@3 = 0.03) beside the ranking protocol; every paired difference carries the difference it could
# detect with 80% power.
#
# Eleven models per (task, seed) no longer fit 90 minutes on 2 cores in one go (six took 67-77 min; with
# DMPO, DynamicPO and mDPO it is fourteen, not measured: the README reports them under a reduced protocol), so the
# script runs one task per call, the two datasets side by side, one core each:
#   scripts/compare_all.sh hit3   # -> runs/compare-tiny, runs/compare-tiny-movielens
#   scripts/compare_all.sh hit1   # -> runs/compare-tiny-hit1, runs/compare-tiny-movielens-hit1
# Each writes its tables (with command, machine and wall time) into README.md. Measured 2026-12-02 for hit3:
# the demo half took 92.8 min of wall time on a 2-core machine shared with other work (load average 4-11,
# about 20 min of it paused), so about 73 min of running; the MovieLens half (more tokens per prompt) did not
# finish its three seeds in that time (README, "Stage 2"). Whether a call fits 90 minutes on a quiet machine
# is not measured; if not, run one process per seed (--seeds=S --output_dir=...-seedS, as the README's
# scenarios do) and merge them with scripts/merge_comparisons.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0,1,2}
TASK=${1:-}
if [ "$TASK" = reduced ]; then
  # the README's reduced protocol for the three newest methods: SFT, DPO, DMPO, DynamicPO, mDPO on the demo data,
  # seeds 0 and 1, 120 pairs (about 20 min of wall time on the shared 2-core machine, 2026-12-08)
  OMP_NUM_THREADS=1 nice -n 5 "$PY" -m hanorec compare --config configs/compare-tiny.yaml --output_dir=runs/compare-reduced \
    --seeds=0,1 --tasks=hit3 --variants=DPO,DMPO,DynamicPO,mDPO --pref.max_pairs=120 --readme=README.md
  exit 0
fi
case "$TASK" in
  hit3) SUFFIX="" ;;
  hit1) SUFFIX="-hit1" ;;
  *) echo "usage: scripts/compare_all.sh hit3|hit1|reduced (one task per call: each call fits 90 minutes on 2 cores)" >&2; exit 2 ;;
esac
for CFG in compare-tiny compare-tiny-movielens; do
  OMP_NUM_THREADS=1 "$PY" -m hanorec compare --config "configs/$CFG.yaml" --output_dir="runs/$CFG$SUFFIX" \
    --seeds="$SEEDS" --tasks="$TASK" --variants=all --readme=README.md > "runs-$CFG$SUFFIX.log" 2>&1 &
done
wait
tail -n 16 "runs-compare-tiny$SUFFIX.log" "runs-compare-tiny-movielens$SUFFIX.log"
