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


def comparison_tables(result: dict) -> str:
    """A comparison's tables as markdown: the mean ± std table, then the paired-difference table when the
    result holds one, then the other protocols' paired tables it holds (:data:`EXTRA_PAIRED`)."""
    protocol, split, policy = result.get("protocol", "ranking"), result.get("split", "test"), result.get("split_policy")
    n = len(result["seeds"])
    table = comparison_table(result["summary"], n, protocol, split, policy)
    if result.get("paired"):
        table += "\n\n" + paired_table(result["paired"], n, result.get("paired_protocol", "ranking"), split, policy)
    for p in EXTRA_PAIRED:  # the ranking protocol's beside the catalogue's, the authors' protocol's
        if result.get(f"paired_{p}"):
            table += "\n\n" + paired_table(result[f"paired_{p}"], n, p, split, policy)
    meter = image_use_table(result)  # the modality meter, when eval.image_ablation ran
    if meter:
        table += "\n\n" + meter
    return table


def comparison_report(result: dict) -> str:
    """The README block of one comparison: command, machine, wall time, then :func:`comparison_tables`."""
    table = comparison_tables(result)
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
    """The stage-2 methods a comparison can run, display name -> `pref` overrides (the method registry's
    rows, hanorec.methods.variants): what the comparison's scripts and the app's Compare tab offer."""
    from hanorec import methods

    return {name: dict(over) for name, over in methods.variants().items()}


def method_order() -> list[str]:
    """Rows of the comparison tables, in order: the baselines, SFT, then every registered variant."""
    return ["random", "popularity", "SFT", *preference_methods()]


# per task, the columns of the mean ± std table (every results table carries MRR, coverage and popularity)
SUMMARY_METRICS = (
    ("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit3", "MRR"), ("hit3", "Coverage@3"), ("hit3", "Pop@3"),
    ("next1", "HR@1"), ("next1", "HR@3"), ("next1", "MRR"), ("next1", "Coverage@3"), ("next1", "Pop@3"),
    ("hit1", "AUC"),
)  # fmt: skip


def _method_order(names) -> list[str]:
    """``names`` in table order (:func:`method_order`), any other name after them in the order given."""
    names = list(dict.fromkeys(names))
    order = method_order()
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


# paired tables a comparison keeps beside its main one ("paired"), as "paired_<protocol>": the ranking
# protocol's when the main one is the catalogue's, and the authors' protocol's when it ran
EXTRA_PAIRED = ("ranking", "paper")


def main_protocol(per_example: list[dict]) -> str:
    """The protocol a comparison's paired intervals read by default: catalogue when its values are present,
    else ranking (an entry without ``"protocol"`` is the ranking protocol's, as older files wrote it)."""
    return "catalogue" if any(e.get("protocol") == "catalogue" for e in per_example) else "ranking"


def protocol_entries(per_example: list[dict], protocol: str | None = None) -> list[dict]:
    """The per-example entries of one protocol (None: :func:`main_protocol`). With "catalogue", a task that
    has no catalogue values (hit1) contributes its ranking ones, as the mean ± std table reads hit1."""
    protocol = protocol or main_protocol(per_example)
    mine = [e for e in per_example if e.get("protocol", "ranking") == protocol]
    if protocol == "catalogue":
        tasks = {e["task"] for e in mine}
        mine += [e for e in per_example if e.get("protocol", "ranking") == "ranking" and e["task"] not in tasks]
    return mine


PAIRED_METRICS = (("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit3", "MRR"), ("next1", "HR@1"), ("next1", "MRR"),
                  ("hit1", "AUC"))


def paired_differences(
    per_example: list[dict],
    references: Sequence[str] = ("SFT", "DPO"),
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    protocol: str | None = None,
) -> list[dict]:
    """Each method against each reference: mean paired difference and bootstrap interval over test users.

    ``protocol``: whose per-example values are compared (:func:`protocol_entries`; None: the comparison's
    main one, the catalogue protocol when it ran, else ranking); "paper" gives the paired intervals under the
    authors' protocol (hanorec.eval.paper_per_example_values).

    ``per_example`` holds one entry per (task, seed, method): ``{"task", "seed", "method", "values"}`` with
    ``values`` the columns of hanorec.eval.per_example_values (same examples in the same order for every
    method of one task and seed). Seeds are pooled: hit3 metrics by :func:`hanorec.stats.paired_bootstrap`
    (a user's seeds resampled together), hit1 AUC by :func:`hanorec.stats.paired_bootstrap_auc` with the
    seed as group. Returns one dict per (reference, method) with a :class:`PairedDifference` dict per
    ``"<task> <metric>"`` present.
    """
    from hanorec.stats import paired_bootstrap, paired_bootstrap_auc

    by_key = {(e["task"], e["seed"], e["method"]): e["values"] for e in protocol_entries(per_example, protocol)}
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


# ----------------------------------------------------------------------------------------------------------
# Reading a comparison folder back: what the app's Compare tab shows (a CLI `compare` folder or a Compare job)

COMPARISON_FILE = "comparison.json"


def load_comparison(folder: str | Path) -> dict:
    """The comparison.json of a `compare` output folder (the CLI's or a Compare-tab job's: the same file).
    One clear sentence when the folder has none, or the file is damaged or lacks the per-example values."""
    import json

    path = Path(folder) / COMPARISON_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {COMPARISON_FILE}: it is not a finished comparison")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    missing = [k for k in ("rows", "summary", "seeds", "per_example") if k not in result]
    if not isinstance(result, dict) or missing:
        raise ValueError(f"{path} lacks {missing or 'its fields'}: not a comparison written by this version")
    return result


def comparison_methods(result: dict, protocol: str | None = None) -> list[str]:
    """Every method of a comparison with per-example values (baselines and SFT included), in table order
    (``protocol``: :func:`protocol_entries`; None: the comparison's main one)."""
    return _method_order(e["method"] for e in protocol_entries(result["per_example"], protocol))


def comparison_metrics(result: dict, protocol: str | None = None) -> list[str]:
    """The '<task> <metric>' keys a paired difference can be computed for in this comparison."""
    have = {(e["task"], k) for e in protocol_entries(result["per_example"], protocol) for k in e["values"]}
    out = []
    for task, metric in PAIRED_METRICS:
        if (task, metric) in have or (metric == "AUC" and (task, "score") in have):
            out.append(f"{task} {metric}")
    return out


def forest(
    result: dict, reference: str, metric: str, *, n_boot: int = 2000, seed: int = 0, protocol: str | None = None
) -> list[dict]:
    """Each method's paired difference against ``reference`` on one '<task> <metric>': a list of
    ``{"method", "mean", "low", "high", "detectable", "excludes_zero", "n_users"}`` (95% bootstrap interval
    over test users, seeds pooled; the forest plot's rows). Recomputed from the per-example values, so any
    method can be the reference. ``protocol``: whose values (None: the comparison's main protocol)."""
    methods = comparison_methods(result, protocol)
    if reference not in methods:
        raise ValueError(f"{reference!r} is not a method of this comparison; use one of {methods}")
    task = metric.split()[0]
    mine = [e for e in result["per_example"] if e["task"] == task]
    out = []
    for e in paired_differences(mine, references=(reference,), n_boot=n_boot, seed=seed, protocol=protocol):
        d = e.get(metric)
        if d is not None:
            out.append({"method": e["method"], **{k: d[k] for k in
                        ("mean", "low", "high", "detectable", "excludes_zero", "n_users")}})  # fmt: skip
    return out


def per_user_means(result: dict, metric: str, method: str, protocol: str | None = None) -> dict[str, float]:
    """user -> the method's mean of one per-example metric over the user's examples and all seeds (the
    scatter's coordinates; hit1 AUC is not per user: its per-example Yes-minus-No score is used)."""
    import numpy as np

    task, name = metric.split(maxsplit=1)
    key = "score" if name == "AUC" else name
    sums: dict[str, list[float]] = {}
    for e in protocol_entries(result["per_example"], protocol):
        if e["task"] == task and e["method"] == method and key in e["values"]:
            for u, v in zip(e["values"]["user"], e["values"][key]):
                sums.setdefault(str(u), []).append(float(v))
    if not sums:
        raise ValueError(f"the comparison has no {metric} values for {method!r}")
    return {u: float(np.mean(v)) for u, v in sums.items()}


def scatter(result: dict, metric: str, a: str, b: str, protocol: str | None = None) -> dict:
    """Per-user means of method A and method B on one metric, users in common: ``{"user", "a", "b"}``."""
    ma, mb = per_user_means(result, metric, a, protocol), per_user_means(result, metric, b, protocol)
    users = sorted(set(ma) & set(mb))
    return {"user": users, "a": [ma[u] for u in users], "b": [mb[u] for u in users]}


def summary_records(result: dict) -> list[dict]:
    """The mean ± std table as flat records: method, then '<task> <metric> mean' / 'std' per column."""
    out = []
    for e in result["summary"]:
        rec: dict = {"method": e["method"]}
        for k, v in e.items():
            if k != "method" and isinstance(v, (list, tuple)) and len(v) == 2:
                rec[f"{k} mean"], rec[f"{k} std"] = v
        out.append(rec)
    return out


def summary_csv(result: dict) -> str:
    """The mean ± std table as CSV (one row per method, a mean and a std column per metric)."""
    import csv
    import io

    recs = summary_records(result)
    cols = list(dict.fromkeys(k for r in recs for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(recs)
    return buf.getvalue()


def summary_latex(result: dict) -> str:
    """The mean ± std table as a LaTeX tabular (booktabs), with its caption as a comment."""
    summary = result["summary"]
    cols = [c for c in (f"{t} {m}" for t, m in SUMMARY_METRICS) if any(c in e for e in summary)]

    def esc(text: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            text = text.replace(a, b)
        return text

    lines = [
        f"% {protocol_words(result.get('protocol', 'ranking'))}; mean $\\pm$ sample std over "
        f"{len(result['seeds'])} seeds; dataset {result.get('dataset')}",
        r"\begin{tabular}{l" + "r" * len(cols) + "}",
        r"\toprule",
        "method & " + " & ".join(esc(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    for e in summary:
        cells = []
        for c in cols:
            if c not in e:
                cells.append("--")
            elif e["method"] == "chance":
                cells.append(f"{e[c][0]:.4f}")
            else:
                cells.append(f"{e[c][0]:.4f} $\\pm$ {e[c][1]:.4f}")
        lines.append(esc(e["method"]) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def find_comparisons(root: str | Path, depth: int = 2) -> list[Path]:
    """Folders under ``root`` (itself included, ``depth`` levels down) holding a comparison.json, newest first."""
    root = Path(root)
    found, level = [], [root]
    for _ in range(depth + 1):
        found += [p for p in level if (p / COMPARISON_FILE).is_file()]
        level = [c for p in level if p.is_dir() for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    return sorted(found, key=lambda p: (p / COMPARISON_FILE).stat().st_mtime, reverse=True)


def merge_comparisons(results: Sequence[dict], *, n_boot: int = 2000) -> dict:
    """One comparison from several made with the same configuration on disjoint seeds (e.g. one process per
    seed): rows and per-example values concatenated, the mean ± std table and the paired differences
    recomputed over all seeds, exactly as one `compare` call over those seeds computes them. One clear
    sentence when they differ in dataset, model, protocol or split, or share a seed."""
    from hanorec.metrics import mean_std

    if not results:
        raise ValueError("nothing to merge: give at least one comparison")
    first = results[0]
    for key in ("dataset", "model", "protocol", "paired_protocol", "split", "split_policy"):
        values = {str(r.get(key)) for r in results}
        if len(values) > 1:
            raise ValueError(f"the comparisons differ in {key} ({sorted(values)}): they cannot be merged")
    seeds = [s for r in results for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the comparisons share a seed ({sorted(seeds)}): each seed may come from one only")
    rows = [row for r in results for row in r["rows"]]
    per_example = [e for r in results for e in r["per_example"]]
    protocol = first.get("protocol", "ranking")
    meter = {}
    sections = [r.get(IMAGE_ABLATION) for r in results]
    if all(isinstance(m, dict) and isinstance(m.get("per_example"), list) for m in sections):
        # the modality meter, when every part ran it: its drops recomputed over all seeds
        blanked = [e for m in sections for e in m["per_example"]]
        meter = {IMAGE_ABLATION: {
            **image_ablation_section(per_example, blanked, list(sections[0].get("drop", {}))),
            "rows": [row for m in sections for row in m.get("rows", [])],
        }}  # fmt: skip
    return {
        **meter,
        **{k: first.get(k) for k in ("protocol", "paired_protocol", "split", "split_policy", "dataset", "model",
                                     "machine")},  # fmt: skip
        "paired_protocol": first.get("paired_protocol") or protocol,
        "rows": rows,
        "summary": summarize(rows, mean_std, protocol),
        "paired": paired_differences(per_example, n_boot=n_boot),
        **{f"paired_{p}": paired_differences(per_example, n_boot=n_boot, protocol=p)
           for p in EXTRA_PAIRED if any(r.get(f"paired_{p}") for r in results)},  # fmt: skip
        "seeds": sorted(seeds),
        "tasks": sorted({t for r in results for t in r.get("tasks", [])}),
        "wall_s": sum(r.get("wall_s", 0.0) for r in results),
        "command": " ; ".join(r.get("command", "") for r in results),
        "per_example": per_example,
        "merged_from": len(results),
    }


# ----------------------------------------------------------------------------------------------------------
# Readouts: what a result means, one plain sentence each (the Compare tab and the Train tab's run list show
# them, so a student never has to notice these alone)


def _num(v) -> float | None:
    import math

    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def below_chance(name: str, metric: str, value, chance) -> str:
    """The sentence for a model whose metric is below a random ranking's, '' otherwise."""
    v, c = _num(value), _num(chance)
    if v is None or c is None or not v < c:
        return ""
    return (
        f"{name} is below chance on {metric}: {v:.4f} against {c:.4f} for a random ranking, so it ranks the "
        "true item no better than guessing."
    )


def identical_on_every_user(result: dict, method: str, reference: str, metric: str, protocol: str | None = None) -> str:
    """The sentence for a method whose per-example values equal its reference's on every test example of
    every seed (training changed no ranking this metric sees), '' otherwise."""
    task, name = metric.split(maxsplit=1)
    key = "score" if name == "AUC" else name
    by = {}
    for e in protocol_entries(result.get("per_example", []), protocol):
        if e.get("task") == task and e.get("method") in (method, reference) and key in e.get("values", {}):
            by[(e["method"], e["seed"])] = e["values"]
    seeds = sorted({s for (m, s) in by if m == method} & {s for (m, s) in by if m == reference})
    if not seeds:
        return ""
    users: set = set()
    for s in seeds:
        a, b = by[(method, s)], by[(reference, s)]
        if list(a.get("user", [])) != list(b.get("user", [])) or list(a[key]) != list(b[key]):
            return ""
        users.update(map(str, a.get("user", [])))
    return (
        f"{method} gives exactly the same {metric} as {reference} on every one of the {len(users)} test users "
        f"({len(seeds)} seed{'s' if len(seeds) > 1 else ''}): training changed no ranking this metric sees."
    )


def difference_sentence(row: dict, reference: str, metric: str) -> str:
    """What one forest row (:func:`forest`) means: a difference the interval shows, or, when the interval
    holds 0, how large a difference the comparison rules out ('no difference larger than ±x')."""
    mean, low, high, mdd = (_num(row.get(k)) for k in ("mean", "low", "high", "detectable"))
    if mean is None or low is None or high is None:
        return ""
    m = row["method"]
    if row.get("excludes_zero"):
        word = "above" if mean > 0 else "below"
        return (
            f"{m} is {word} {reference} on {metric} by {mean:+.4f} (95% interval [{low:+.4f}, {high:+.4f}] "
            "excludes 0): a difference the comparison can see."
        )
    if mdd is not None and mdd > 0 and -mdd <= low and high <= mdd:
        return (
            f"{m} against {reference} on {metric}: no difference larger than ±{mdd:.4f} (the interval "
            f"[{low:+.4f}, {high:+.4f}] lies inside the detectable difference), so any effect is smaller than that."
        )
    return (
        f"{m} against {reference} on {metric}: the interval [{low:+.4f}, {high:+.4f}] holds 0 but is wider than "
        f"the detectable difference{f' ±{mdd:.4f}' if mdd else ''}: too few users to tell; add seeds or users."
    )


BASELINES = ("random", "popularity")


def readouts(result: dict, reference: str, metric: str, *, n_boot: int = 2000, protocol: str | None = None) -> list[str]:
    """One plain sentence per thing a student should notice in a comparison for this reference and metric:
    each model below chance (mean over seeds against the chance row), each trained method identical to the
    reference on every user, and each trained method's paired difference (:func:`difference_sentence`); the
    baselines' differences are in the forest plot, not in sentences."""
    out = []
    chance = next((e.get(metric) for e in result.get("summary", []) if e.get("method") == "chance"), None)
    for e in result.get("summary", []):
        if e.get("method") in ("chance", "random") or metric not in e:
            continue
        s = below_chance(e["method"], metric, e[metric][0], chance[0] if chance else None)
        if s:
            out.append(s)
    rows = forest(result, reference, metric, n_boot=n_boot, protocol=protocol)
    for r in rows:
        if r["method"] in BASELINES:  # the forest plot shows them; the sentences are about trained models
            continue
        same = identical_on_every_user(result, r["method"], reference, metric, protocol)
        out.append(same or difference_sentence(r, reference, metric))
    return [s for s in out if s]


def run_readouts(results: dict | None, reference: dict | None = None, name: str = "This model") -> list[str]:
    """Readouts for one evaluated stage (its results.json): below chance on any metric its rows carry a chance
    level for, and, given the results of the SFT model it started from (``reference``), every metric of every
    protocol exactly equal to SFT's (the preference stage changed nothing the evaluation sees)."""
    if not isinstance(results, dict):
        return []
    out = []
    rows = [r for r in results.get("rows", []) if isinstance(r, dict) and r.get("method") not in ("random", "popularity")]
    for r in rows:  # each protocol's row, on its main metric (the first it has a chance level for)
        chance = r.get("chance") if isinstance(r.get("chance"), dict) else {}
        metric = next((m for m in ("HR@3", "HR@1", "AUC", "NDCG@3", "MRR") if m in chance and m in r), None)
        if metric is not None:
            where = f"{metric} ({r.get('protocol', 'ranking')} protocol)"
            out.append(below_chance(name, where, r.get(metric), chance.get(metric)))
    if isinstance(reference, dict):
        ref_rows = {r.get("protocol"): r for r in reference.get("rows", []) if isinstance(r, dict) and r.get("method") == "SFT"}
        same = [r for r in rows if r.get("protocol") in ref_rows]
        keys = ("HR@1", "HR@3", "NDCG@3", "MRR", "AUC", "n")
        if same and all(all(r.get(k) == ref_rows[r.get("protocol")].get(k) for k in keys) for r in same):
            out.append(f"{name} scores exactly what its SFT model scores on every metric: training changed no ranking.")
    return [s for s in out if s]


# ----------------------------------------------------------------------------------------------------------
# The modality meter (eval.image_ablation): how much each model loses when its history images are blanked

IMAGE_ABLATION = "image_ablation"  # the key results.json and comparison.json keep it under (absent: not run)
BLANKING = (
    "every history image blanked after processing: its normalised pixel values set to 0, the image processor's "
    "mean colour (a flat grey), so the image tokens and the token count are unchanged (mDPO's imageless prompt)"
)


def image_drops(
    per_example: list[dict],
    blanked: list[dict],
    *,
    protocol: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict]:
    """Per method evaluated both ways, the drop when its history images are blanked: its value with the images
    minus its value without them, the mean per-user paired difference with its bootstrap interval and
    detectable difference (:func:`paired_differences` on the two evaluations, seeds pooled). Positive: the
    images help it. ``blanked`` holds the blanked evaluations' entries, as ``per_example`` the plain ones.
    Returns one dict per method: ``{"method", "<task> <metric>": PairedDifference dict, ...}``."""
    out = []
    for method in _method_order(e["method"] for e in blanked):
        both = [{**e, "method": "with images"} for e in per_example if e["method"] == method]
        both += [{**e, "method": "blanked"} for e in blanked if e["method"] == method]
        d = paired_differences(both, references=("blanked",), n_boot=n_boot, seed=seed, level=level, protocol=protocol)
        if d:
            out.append({"method": method, **{k: v for k, v in d[0].items() if k not in ("method", "reference")}})
    return out


def image_ablation_section(per_example: list[dict], blanked: list[dict], protocols: Sequence[str]) -> dict:
    """What results.json / comparison.json keep under :data:`IMAGE_ABLATION`: the blanked evaluations'
    per-example values and, per protocol they hold, :func:`image_drops` (recomputable from the two)."""
    have = {e.get("protocol", "ranking") for e in blanked}
    return {
        "blanking": BLANKING,
        "per_example": blanked,
        "drop": {p: image_drops(per_example, blanked, protocol=p) for p in protocols if p in have},
    }


def _mean_of(entries: list[dict], method: str, task: str, key: str) -> float | None:
    values = [float(v) for e in entries if e["method"] == method and e["task"] == task for v in e["values"].get(key, [])]
    return sum(values) / len(values) if values else None


def image_use_choice(result: dict, metric: str | None = None, protocol: str | None = None) -> tuple[str, str] | None:
    """(protocol, metric) the "uses the images?" panel reads: ``protocol`` when the meter has it, else the
    comparison's paired protocol, else the first kept; ``metric`` ('<task> <metric>'), else the first the
    meter has. None when the comparison ran without eval.image_ablation (older files included)."""
    section = result.get(IMAGE_ABLATION)
    if not isinstance(section, dict) or not isinstance(section.get("drop"), dict) or not section["drop"]:
        return None
    drops = section["drop"]
    protocol = protocol if protocol in drops else result.get("paired_protocol")
    if protocol not in drops:
        protocol = next(iter(drops))
    rows = [r for r in drops[protocol] if isinstance(r, dict)]
    if metric is None:
        metric = next((f"{t} {m}" for t, m in PAIRED_METRICS if any(f"{t} {m}" in r for r in rows)), None)
    return None if metric is None else (protocol, metric)


def image_use(result: dict, metric: str | None = None, protocol: str | None = None) -> list[dict]:
    """The Compare tab's "uses the images?" panel: per method evaluated with its images blanked (random first,
    then SFT, then the trained methods; popularity, which reads no images either, is left out), its mean on
    ``metric`` with and without the images and the drop with its interval: ``{"method", "with images",
    "blanked", "drop", "low", "high", "detectable", "excludes_zero", "n_users", "reading"}``
    (:func:`image_use_choice` picks the protocol and metric). [] when the meter did not run."""
    choice = image_use_choice(result, metric, protocol)
    if choice is None:
        return []
    protocol, metric = choice
    section = result[IMAGE_ABLATION]
    rows = [r for r in section["drop"][protocol] if isinstance(r, dict) and r.get("method") != "popularity"]
    task, name = metric.split(maxsplit=1)
    key = "score" if name == "AUC" else name
    plain = protocol_entries(result.get("per_example", []), protocol)
    dark = protocol_entries(section.get("per_example", []), protocol)
    by_method = {r["method"]: r for r in rows}
    order = ["random", "SFT"] + [m for m in _method_order(by_method) if m not in ("random", "SFT")]
    out = []
    for m in order:
        d = by_method.get(m, {}).get(metric)
        if not isinstance(d, dict):
            continue
        row = {"method": m, "with images": _mean_of(plain, m, task, key), "blanked": _mean_of(dark, m, task, key),
               "drop": d.get("mean"), **{k: d.get(k) for k in ("low", "high", "detectable", "excludes_zero", "n_users")}}  # fmt: skip
        row["reading"] = image_use_sentence(row, metric)
        out.append(row)
    return out


def image_use_sentence(row: dict, metric: str) -> str:
    """One plain sentence: does this method measurably use its history images on ``metric``?"""
    m, drop, low, high, mdd = row["method"], row["drop"], row.get("low"), row.get("high"), row.get("detectable")
    if m in BASELINES:
        return f"{m} never looks at an image: its drop is 0 by construction, the meter's zero."
    if not all(isinstance(x, (int, float)) and x == x for x in (drop, low, high)):
        return f"{m}: the drop on {metric} could not be computed."
    span = f"{drop:+.4f} [{low:+.4f}, {high:+.4f}]"
    if low > 0:
        return f"{m} uses the images: blanking them costs {span} {metric}."
    if high < 0:
        return f"{m} does better without its images ({span} {metric}): the images mislead it."
    if isinstance(mdd, (int, float)) and mdd == mdd and -mdd <= low and high <= mdd:
        return f"{m} does not measurably use the images: no drop larger than ±{mdd:.4f} on {metric} ({span})."
    return f"{m}: the drop {span} on {metric} holds 0 but is wider than the detectable ±{mdd:.4f}: too few users to tell."


def image_use_table(result: dict, metric: str | None = None, protocol: str | None = None) -> str:
    """:func:`image_use` as markdown (comparison.md and the Compare tab); "" when the meter did not run."""
    rows = image_use(result, metric, protocol)
    if not rows:
        return ""
    protocol, metric = image_use_choice(result, metric, protocol)

    def num(x):
        return f"{x:.4f}" if isinstance(x, (int, float)) and x == x else "-"

    lines = [f"| method | {metric} with images | blanked | drop [95% CI] ±detectable |", "|---|---:|---:|---:|"]
    for r in rows:
        d = {"mean": r["drop"], "low": r["low"], "high": r["high"], "detectable": r["detectable"],
             "excludes_zero": r["excludes_zero"]}  # fmt: skip
        ok = all(isinstance(d[k], (int, float)) and d[k] == d[k] for k in ("mean", "low", "high"))
        lines.append(f"| {r['method']} | {num(r['with images'])} | {num(r['blanked'])} | "
                     f"{format_difference(d) if ok else '-'} |")  # fmt: skip
    lines.append(
        f"\nUses the images? {protocol.capitalize()} protocol. The drop is a model's value with its history images "
        f"minus its value with {BLANKING}: the mean per-user paired difference [95% percentile bootstrap interval "
        "over test users, seeds pooled], * when it excludes 0, ±x the difference detectable with 80% power."
    )
    return "\n".join(lines)


def image_use_panel(result: dict, metric: str | None = None) -> str:
    """The Compare tab's "uses the images?" panel as markdown: :func:`image_use_table` on ``metric`` when the
    meter has it (else its first metric) and one sentence per method; without the meter, how to run it."""
    choice = image_use_choice(result, metric)
    if choice is None:
        return (
            "**Uses the images?** This comparison ran without the modality meter: run it again with "
            "`--eval.image_ablation=true` (the CLI, or the Compare form's overrides field) to see how much each "
            "model loses when its history images are blanked."
        )
    protocol, metric = choice
    said = "\n".join(f"- {r['reading']}" for r in image_use(result, metric, protocol))
    return f"**Uses the images?**\n\n{image_use_table(result, metric, protocol)}\n\n{said}"
