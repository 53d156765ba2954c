"""The method comparison as text: mean ± std over seeds per method, the paired differences against SFT and
DPO with their bootstrap intervals (hanorec.stats), and its README section.

`python -m hanorec compare --readme=README.md` writes each comparison (command, machine, wall time, table)
between `<!-- comparison:<name> -->` markers, so rerunning the command regenerates the README's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


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
    paired-difference table when the result holds one (and the paper protocol's, when it holds that too)."""
    protocol, split, policy = result.get("protocol", "ranking"), result.get("split", "test"), result.get("split_policy")
    table = comparison_table(result["summary"], len(result["seeds"]), protocol, split, policy)
    if result.get("paired"):
        table += "\n\n" + paired_table(
            result["paired"], len(result["seeds"]), result.get("paired_protocol", "ranking"), split, policy
        )
    if result.get("paired_paper"):  # the comparison also evaluated under the authors' protocol
        table += "\n\n" + paired_table(result["paired_paper"], len(result["seeds"]), "paper", split, policy)
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


def method_order() -> list[str]:
    """Rows of the comparison tables, in order: the baselines, SFT, then every registered variant."""
    from hanorec import methods

    return ["random", "popularity", "SFT", *methods.variants()]


def summarize(rows: list[dict], mean_std, protocol: str = "ranking") -> list[dict]:
    """Mean and std over seeds of hit3 HR@3 / NDCG@3 and hit1 AUC, per method, from one protocol's rows
    (rows whose value is None, like a paper-protocol AUC left undefined, are left out)."""
    out = []
    for method in method_order():
        entry: dict = {"method": method}
        for task, metric in (("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit1", "AUC")):
            vals = [
                r[metric]
                for r in rows
                if r["task"] == task and r["method"] == method and r["protocol"] == protocol
                and r.get(metric) is not None
            ]
            if vals:
                entry[f"{task} {metric}"] = mean_std(vals)
        if len(entry) > 1:
            out.append(entry)
    return out


def protocol_words(protocol: str) -> str:
    """How a table caption names a protocol."""
    return {
        "ranking": "ranking protocol (title likelihood)",
        "generative": "generative protocol (greedy decoding, lenient matching)",
        "paper": "paper protocol (the authors': seeded sampling, exact titles, hit1 AUC over Yes/No answers)",
    }.get(protocol, f"{protocol} protocol")


def comparison_table(
    summary: list[dict], n_seeds: int, protocol: str = "ranking", split: str = "test", split_policy: str | None = None
) -> str:
    """Markdown: mean ± std over seeds per method; the caption names the protocol and the split it used."""
    from hanorec.eval import split_label

    cols = ["hit3 HR@3", "hit3 NDCG@3", "hit1 AUC"]
    present = [c for c in cols if any(c in e for e in summary)]
    lines = ["| method | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for e in summary:
        cells = [f"{e[c][0]:.4f} ± {e[c][1]:.4f}" if c in e else "-" for c in present]
        lines.append(f"| {e['method']} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean ± sample std over {n_seeds} seeds; {protocol_words(protocol)}, {split_label(split, split_policy)}.")
    return "\n".join(lines)


PAIRED_METRICS = (("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit1", "AUC"))


def paired_differences(
    per_example: list[dict],
    references: Sequence[str] = ("SFT", "DPO"),
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    protocol: str = "ranking",
) -> list[dict]:
    """Each method against each reference: mean paired difference and bootstrap interval over test users.

    ``protocol``: whose per-example values are compared (an entry's ``"protocol"``, "ranking" when absent);
    "paper" gives the paired intervals under the authors' protocol (hanorec.eval.paper_per_example_values).

    ``per_example`` holds one entry per (task, seed, method): ``{"task", "seed", "method", "values"}`` with
    ``values`` the columns of hanorec.eval.per_example_values (same examples in the same order for every
    method of one task and seed). Seeds are pooled: hit3 metrics by :func:`hanorec.stats.paired_bootstrap`
    (a user's seeds resampled together), hit1 AUC by :func:`hanorec.stats.paired_bootstrap_auc` with the
    seed as group. Returns one dict per (reference, method) with a :class:`PairedDifference` dict per
    ``"<task> <metric>"`` present.
    """
    from hanorec.stats import paired_bootstrap, paired_bootstrap_auc

    by_key = {
        (e["task"], e["seed"], e["method"]): e["values"]
        for e in per_example
        if e.get("protocol", "ranking") == protocol
    }
    methods = [m for m in method_order() if any(k[2] == m for k in by_key)]
    methods += sorted({k[2] for k in by_key} - set(methods))
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
                star = " *" if d["excludes_zero"] else ""
                cells.append(f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{star}")
        lines.append(f"| {e['method']} | {e['reference']} | " + " | ".join(cells) + " |")
    level = next((e[c]["level"] for e in paired for c in present if c in e), 0.95)
    users = {c.split()[0]: e[c]["n_users"] for e in paired for c in present if c in e}
    sizes = ", ".join(f"{t}: {n} users" for t, n in users.items())
    lines.append(
        f"\nmethod minus reference: mean per-user paired difference [{level:.0%} percentile bootstrap interval "
        f"over test users ({sizes}), pooled over {n_seeds} seeds, a user's seeds resampled together]; "
        f"* marks an interval that excludes 0. {protocol.capitalize()} protocol"
        f"{' (title likelihood)' if protocol == 'ranking' else ''}, {split_label(split, split_policy)}."
    )
    return "\n".join(lines)
