"""The method comparison as text: mean ± std over seeds per method, the paired differences against SFT and
DPO with their bootstrap intervals (hanorec.stats), and its README section.

`python -m hanorec compare --readme=README.md` writes each comparison (command, machine, wall time, table)
between `<!-- comparison:<name> -->` markers, so rerunning the command regenerates the README's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hanorec.train.preference import PREF_VARIANTS


def machine_description() -> str:
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    )


def comparison_report(result: dict) -> str:
    """The README block of one comparison: command, machine, wall time, the mean ± std table, then the
    paired-difference table when the result holds one."""
    protocol, split, policy = result.get("protocol", "ranking"), result.get("split", "test"), result.get("split_policy")
    table = comparison_table(result["summary"], len(result["seeds"]), protocol, split, policy)
    if result.get("paired"):
        table += "\n\n" + paired_table(
            result["paired"], len(result["seeds"]), result.get("paired_protocol", "ranking"), split, policy
        )
    return (
        f"`{result.get('command') or 'python -m hanorec compare ...'}`\n\n"
        f"Machine: {result.get('machine', 'not recorded')}; wall time {result['wall_s'] / 60:.1f} min; "
        f"dataset `{result['dataset']}`, model `{result['model']}`, seeds {result['seeds']}.\n\n{table}"
    )


def update_readme_section(readme: str | Path, key: str, body: str) -> None:
    """Replace the text between `<!-- comparison:key -->` and `<!-- /comparison:key -->` (or append it)."""
    import fcntl

    path = Path(readme)
    with open(path.with_name(path.name + ".lock"), "w") as lock:  # two comparisons may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_section(path, key, body)
    path.with_name(path.name + ".lock").unlink(missing_ok=True)


def _replace_section(path: Path, key: str, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- comparison:{key} -->", f"<!-- /comparison:{key} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def preference_methods() -> dict[str, dict]:
    """The stage-2 methods a comparison can run, display name -> `pref` overrides: the one place the
    comparison, its scripts and the app's Compare tab read them from."""
    return {name: dict(over) for name, over in PREF_VARIANTS.items()}


METHOD_ORDER = ["random", "popularity", "SFT", *PREF_VARIANTS]
# per task, the columns of the mean ± std table (every results table carries MRR, coverage and popularity)
SUMMARY_METRICS = (
    ("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit3", "MRR"), ("hit3", "Coverage@3"), ("hit3", "Pop@3"),
    ("next1", "HR@1"), ("next1", "HR@3"), ("next1", "MRR"), ("next1", "Coverage@3"), ("next1", "Pop@3"),
    ("hit1", "AUC"),
)  # fmt: skip


def _method_order(names) -> list[str]:
    names = list(dict.fromkeys(names))
    order = ["random", "popularity", "SFT", *preference_methods()]
    return [m for m in order if m in names] + [m for m in names if m not in order]


def summarize(rows: list[dict], mean_std, protocol: str = "ranking") -> list[dict]:
    """Mean and std over seeds of each task's metrics (:data:`SUMMARY_METRICS`), per method, from one
    protocol's rows (rows whose value is None, like a paper-protocol AUC left undefined, are left out); then
    one "chance" entry: each metric's value under a random ranking (std 0; the rows' ``chance`` entries).
    A hit1 row has no catalogue protocol: with protocol "catalogue", hit1 reads its ranking rows."""
    out = []

    def mine(task):
        p = "ranking" if task == "hit1" and protocol == "catalogue" else protocol
        return [r for r in rows if r["task"] == task and r.get("protocol") == p]

    for method in _method_order(r["method"] for r in rows):
        entry: dict = {"method": method}
        for task, metric in SUMMARY_METRICS:
            vals = [r[metric] for r in mine(task) if r["method"] == method and r.get(metric) is not None]
            if vals:
                entry[f"{task} {metric}"] = mean_std(vals)
        if len(entry) > 1:
            out.append(entry)
    chance: dict = {"method": "chance"}
    for task, metric in SUMMARY_METRICS:
        vals = [r["chance"][metric] for r in mine(task) if metric in (r.get("chance") or {})]
        if vals:
            chance[f"{task} {metric}"] = (float(sum(vals) / len(vals)), 0.0)
    if len(chance) > 1:
        out.append(chance)
    return out


def protocol_words(protocol: str) -> str:
    """How a table caption names a protocol."""
    return {
        "ranking": "ranking protocol (title likelihood)",
        "generative": "generative protocol (greedy decoding, lenient matching)",
        "paper": "paper protocol (the authors': seeded sampling, exact titles, hit1 AUC over Yes/No answers)",
        "catalogue": "catalogue protocol (the true item ranked by title likelihood against the items the user never "
        "interacted with; hit1 rows: ranking protocol)",
    }.get(protocol, f"{protocol} protocol")


def comparison_table(
    summary: list[dict], n_seeds: int, protocol: str = "ranking", split: str = "test", split_policy: str | None = None
) -> str:
    """Markdown: mean ± std over seeds per method; the caption names the protocol and the split it used."""
    from hanorec.eval import split_label

    cols = [f"{t} {m}" for t, m in SUMMARY_METRICS]
    present = [c for c in cols if any(c in e for e in summary)]
    lines = ["| method | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]

    def cell(e, c):
        if c not in e:
            return "-"
        digits = 2 if c.endswith("Pop@3") else 4
        if e["method"] == "chance":
            return f"{e[c][0]:.{digits}f}"
        return f"{e[c][0]:.{digits}f} ± {e[c][1]:.{digits}f}"

    for e in summary:
        lines.append(f"| {e['method']} | " + " | ".join(cell(e, c) for c in present) + " |")
    lines.append(
        f"\nmean ± sample std over {n_seeds} seeds; {protocol_words(protocol)}, {split_label(split, split_policy)}. "
        "chance = a uniformly random ranking; Coverage@3 = distinct items in any top 3 / catalogue; Pop@3 = mean "
        "training interactions of the top-3 items (higher = more popularity bias)."
    )
    return "\n".join(lines)


PAIRED_METRICS = (("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit3", "MRR"), ("next1", "HR@1"), ("next1", "MRR"),
                  ("hit1", "AUC"))


def paired_differences(
    per_example: list[dict],
    references: Sequence[str] = ("SFT", "DPO"),
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict]:
    """Each method against each reference: mean paired difference and bootstrap interval over test users.

    ``per_example`` holds one entry per (task, seed, method): ``{"task", "seed", "method", "values"}`` with
    ``values`` the columns of hanorec.eval.per_example_values (same examples in the same order for every
    method of one task and seed). Seeds are pooled: hit3 metrics by :func:`hanorec.stats.paired_bootstrap`
    (a user's seeds resampled together), hit1 AUC by :func:`hanorec.stats.paired_bootstrap_auc` with the
    seed as group. Returns one dict per (reference, method) with a :class:`PairedDifference` dict per
    ``"<task> <metric>"`` present.
    """
    from hanorec.stats import paired_bootstrap, paired_bootstrap_auc

    by_key = {(e["task"], e["seed"], e["method"]): e["values"] for e in per_example}
    methods = _method_order(k[2] for k in by_key)
    out = []
    for ref in references:
        for method in methods:
            if method == ref:
                continue
            entry: dict = {"method": method, "reference": ref}
            for task, metric in PAIRED_METRICS:
                seeds = sorted(s for (t, s, m) in by_key if t == task and m == method and (t, s, ref) in by_key)
                a = [by_key[(task, s, method)] for s in seeds]
                b = [by_key[(task, s, ref)] for s in seeds]
                if not seeds or any(metric not in x and "score" not in x for x in a):
                    continue
                for s, x, y in zip(seeds, a, b):
                    if x["user"] != y["user"]:
                        raise ValueError(f"{task} seed {s}: {method} and {ref} were scored on different examples")
                users = [u for x in a for u in x["user"]]
                if metric == "AUC":
                    d = paired_bootstrap_auc(
                        [v for x in a for v in x["score"]],
                        [v for y in b for v in y["score"]],
                        [v for x in a for v in x["label"]],
                        users,
                        groups=[s for s, x in zip(seeds, a) for _ in x["user"]],
                        n_boot=n_boot,
                        seed=seed,
                        level=level,
                    )
                else:
                    d = paired_bootstrap(
                        [v for x in a for v in x[metric]],
                        [v for y in b for v in y[metric]],
                        users,
                        n_boot=n_boot,
                        seed=seed,
                        level=level,
                    )
                entry[f"{task} {metric}"] = d.to_dict()
            if len(entry) > 2:
                out.append(entry)
    return out


def format_difference(d: dict) -> str:
    """``+0.0123 [-0.0040, +0.0290] ±0.0230``: mean paired difference, interval (* without 0), detectable size."""
    star = " *" if d.get("excludes_zero") else ""
    mdd = d.get("detectable")
    tail = f" ±{mdd:.4f}" if isinstance(mdd, (int, float)) and mdd == mdd else ""
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{star}{tail}"


def paired_table(
    paired: list[dict], n_seeds: int, protocol: str = "ranking", split: str = "test", split_policy: str | None = None
) -> str:
    """Markdown: per reference, each method's mean paired difference [95% CI]; * marks an interval without 0."""
    from hanorec.eval import split_label

    if not paired:
        return "no paired differences: the comparison has no method beside its references"
    cols = [f"{t} {m}" for t, m in PAIRED_METRICS]
    present = [c for c in cols if any(c in e for e in paired)]
    lines = ["| method | vs | " + " | ".join(present) + " |", "|---|---|" + "---:|" * len(present)]
    for e in paired:
        cells = []
        for c in present:
            d = e.get(c)
            if d is None:
                cells.append("-")
            else:
                cells.append(format_difference(d))
        lines.append(f"| {e['method']} | {e['reference']} | " + " | ".join(cells) + " |")
    level = next((e[c]["level"] for e in paired for c in present if c in e), 0.95)
    users = {c.split()[0]: e[c]["n_users"] for e in paired for c in present if c in e}
    sizes = ", ".join(f"{t}: {n} users" for t, n in users.items())
    lines.append(
        f"\nmethod minus reference: mean per-user paired difference [{level:.0%} percentile bootstrap interval "
        f"over test users ({sizes}), pooled over {n_seeds} seeds, a user's seeds resampled together]; "
        f"* marks an interval that excludes 0; ±x = the smallest difference detectable with 80% power at the "
        f"5% level given the per-user paired variance (2.80 SE), so an interval containing 0 rules out "
        f"differences of that size. {protocol.capitalize()} protocol"
        f"{' (title likelihood)' if protocol == 'ranking' else ''}, {split_label(split, split_policy)}."
    )
    return "\n".join(lines)
