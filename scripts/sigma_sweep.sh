#!/usr/bin/env bash
# NoDO noise scale on the tiny model: HaNo-DPO (hit3, demo data, seed 0) from the SFT model of the comparison
# run (runs/compare-tiny/hit3/seed0, made by scripts/compare_all.sh), for several noise_sigma values.
# Prints one row per sigma: the last logged reward accuracy and chosen log-prob under noise, and test HR@3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SFT_RUN=${SFT_RUN:-runs/compare-tiny/hit3/seed0}
for sigma in ${SIGMAS:-0 0.005 0.01 0.02 0.05}; do
  out=runs/sigma-sweep/sigma-$sigma
  OMP_NUM_THREADS=1 "$PY" -m hanorec pref --config configs/compare-tiny.yaml --output_dir="$out" \
    --pref.sft_run="$SFT_RUN" --pref.method=hano_dpo --pref.noise_sigma="$sigma" > "$out.log" 2>&1 || { tail -5 "$out.log"; exit 1; }
  "$PY" - "$sigma" "$out" <<'PYEOF'
import json, re, sys
sigma, out = sys.argv[1], sys.argv[2]
last = [json.loads(l) for l in open(f"{out}/hano_dpo/metrics.jsonl")][-1]
row = [l for l in open(f"{out}.log") if l.startswith("hano_dpo ")][-1].split()
print(f"sigma={sigma:<6} rewards/accuracies={last['rewards/accuracies']:.2f} logps/chosen={last['logps/chosen']:.1f} "
      f"test HR@3={float(row[3]):.4f} NDCG@3={float(row[4]):.4f}")
PYEOF
done
