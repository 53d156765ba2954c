"""The catalogue protocol's cost per test user (issue 16): the true item ranked against every unseen item.

For each catalogue size (default 1,682 items, MovieLens-100K's, and 20,000), the demo data's items plus
synthetic items whose titles are drawn like the demo's (same vocabulary, so the tiny tokenizer reads them the
same way), one prompt per test user, every title scored by ``hanorec.eval.catalogue_scores`` (what
``evaluate`` runs for ``eval.protocols=[catalogue]``), ``--chunk`` titles per forward. Prints seconds per
user (median over ``--users`` users and ``--repeats`` passes), title tokens and forwards per user (what the
cost scales with, for any model), and the process's peak resident memory after each size (flat across
sizes: a forward holds one chunk, never the catalogue).

    python benchmarks/bench_catalogue.py [--sizes 1682,20000] [--users 3] [--repeats 2] [--chunk 256]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from dataclasses import replace

import torch
from common import demo_examples, header, tiny_bundle

from hanorec.data import DEMO_GENRE_WORDS, Item, _demo_title
from hanorec.eval import catalogue_candidates, catalogue_scores


def grown(ds, n_items: int, seed: int = 0):
    """The dataset with synthetic items added (no image: never shown, only their titles are scored) until it
    holds ``n_items`` items; users and sequences unchanged."""
    rng = random.Random(seed)
    items = dict(ds.items)
    genres = list(DEMO_GENRE_WORDS)
    k = 0
    while len(items) < n_items:
        k += 1
        items[f"x{k}"] = Item(f"x{k}", _demo_title(rng, genres[k % len(genres)]), None)
    return replace(ds, items=items)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1682,20000")
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="titles per forward (eval.catalogue_chunk)")
    ap.add_argument("--hidden", type=int, default=128, help="tiny preset width (the comparison presets' 128)")
    ap.add_argument("--preset", default="tiny-qwen2.5-vl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("catalogue protocol: cost per test user against catalogue size", args)
    ds0, examples = demo_examples("hit3", args.users, seed=args.seed)
    bundle = tiny_bundle(args.preset, ds0, hidden=args.hidden, seed=args.seed)
    bundle.model.eval()
    out = []
    for size in [int(s) for s in args.sizes.split(",")]:
        ds = grown(ds0, size, args.seed)
        cands = [catalogue_candidates(e, ds) for e in examples]
        tokens = [sum(len(bundle.encode_completion(f'"{ds.items[i].title}"')) for i in c) for c in cands]
        catalogue_scores(bundle, ds, examples[:1], cands[:1], chunk=args.chunk)  # warm-up
        times = []
        for _ in range(args.repeats):
            for e, c in zip(examples, cands):
                t = time.perf_counter()
                catalogue_scores(bundle, ds, [e], [c], chunk=args.chunk)
                times.append(time.perf_counter() - t)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {
            "items": size,
            "candidates": statistics.mean(len(c) for c in cands),
            "s_per_user": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "tokens_per_user": statistics.mean(tokens),
            "forwards_per_user": statistics.mean(-(-len(c) // args.chunk) for c in cands),
            "peak_rss_mb": peak_mb,
        }
        out.append(row)
        print(
            f"{size:>6} items: {row['candidates']:.0f} candidates per user, {row['tokens_per_user']:.0f} title tokens "
            f"in {row['forwards_per_user']:.0f} forwards; {row['s_per_user']:.3f} s per user (median of "
            f"{len(times)}, range {row['min_s']:.3f}-{row['max_s']:.3f}); peak RSS so far {peak_mb:.0f} MB"
        )
    if len(out) > 1:
        a, b = out[0], out[-1]
        print(
            f"ratio {b['items']} / {a['items']} items: time x{b['s_per_user'] / a['s_per_user']:.2f}, "
            f"title tokens x{b['tokens_per_user'] / a['tokens_per_user']:.2f} (measured side by side in this run)"
        )
    return out


if __name__ == "__main__":
    main()
