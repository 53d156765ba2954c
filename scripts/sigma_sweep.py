"""NoDO's noise scale over seeds: HaNo-DPO from each seed's SFT model of a comparison run, at several sigma,
each against HaNo-DPO without noise (paired over test users, seeds pooled), with the training diagnostics
that say what the noise did (reward accuracy and chosen log-prob of the noisy policy at the last step).

    .venv/bin/python scripts/sigma_sweep.py                      # demo hit3, SFT models of compare_all.sh
    .venv/bin/python scripts/sigma_sweep.py --readme=README.md   # and write the README section

`--relative` adds settings with sigma relative to each LoRA factor's scale (an extension beyond the paper,
`pref.noise_scale=relative`). The SFT models come from `--sft-root` (default runs/compare-tiny, made by
`bash scripts/compare_all.sh`); nothing is trained for stage 1 here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/compare-tiny.yaml")
    ap.add_argument("--sft-root", default="runs/compare-tiny", help="a comparison's output folder")
    ap.add_argument("--out", default="runs/sigma-sweep", help="where the sweep's runs go (its README key)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--task", default="hit3")
    ap.add_argument("--sigmas", default="0.005,0.01,0.02,0.05", help="absolute sigma (the paper's)")
    ap.add_argument("--relative", default="", help="sigma relative to each LoRA factor's RMS, e.g. 0.1,0.5")
    ap.add_argument("--readme", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from hanorec.config import load_config
    from hanorec.pipeline import run_sweep

    cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config,
                      {"output_dir": args.out})
    settings: dict[str, dict] = {"no noise": {"noise_target": "none"}}
    for s in filter(None, args.sigmas.split(",")):
        settings[f"sigma={s}"] = {"noise_target": "lora", "noise_sigma": float(s)}
    for s in filter(None, args.relative.split(",")):
        settings[f"relative sigma={s}"] = {"noise_target": "lora", "noise_sigma": float(s), "noise_scale": "relative"}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    missing = [s for s in seeds if not (Path(args.sft_root) / args.task / f"seed{s}" / "sft").is_dir()]
    if missing:
        print(f"no SFT model under {args.sft_root}/{args.task}/seed{missing[0]}/sft: run "
              "`bash scripts/compare_all.sh` first, or pass --sft-root", file=sys.stderr)
        return 2
    command = ".venv/bin/python scripts/sigma_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run_sweep(cfg, settings, reference="no noise", sft_root=args.sft_root, seeds=seeds, task=args.task,
              readme=args.readme, command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
