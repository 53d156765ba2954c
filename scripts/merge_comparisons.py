"""Merge comparisons made on disjoint seeds with the same configuration (one process per seed, e.g. to use
both cores) into one folder, with the mean ± std table and the paired differences over all seeds:

    .venv/bin/python scripts/merge_comparisons.py --out runs/merged runs/cmp-seed0 runs/cmp-seed1 runs/cmp-seed2 \
        [--readme README.md]

Writes <out>/comparison.json and <out>/comparison.md (which the app's Compare tab opens); with --readme, the
tables replace the README section marked <!-- comparison:<out folder name> -->. wall time = the sum of the
parts' (they may have run side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hanorec.report import (  # noqa: E402
    comparison_report,
    comparison_tables,
    load_comparison,
    merge_comparisons,
    update_readme_section,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="comparison output folders (each holds comparison.json)")
    ap.add_argument("--out", required=True, help="the merged comparison's folder")
    ap.add_argument("--readme", help="also write the tables into this README's section for --out")
    args = ap.parse_args(argv)
    try:
        merged = merge_comparisons([load_comparison(f) for f in args.folders])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merged["command"] = " ; ".join([merged["command"], ".venv/bin/python scripts/merge_comparisons.py "
                                    + " ".join(argv if argv is not None else sys.argv[1:])])  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(merged, indent=2))
    text = comparison_tables(merged)
    (out / "comparison.md").write_text(text + "\n")
    print(text)
    if args.readme:
        update_readme_section(args.readme, out.name, comparison_report(merged))
        print(f"README section comparison:{out.name} updated in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
