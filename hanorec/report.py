"""The method comparison as text: mean ± std over seeds per method, and its README section.

`python -m hanorec compare --readme=README.md` writes each comparison (command, machine, wall time, table)
between `<!-- comparison:<name> -->` markers, so rerunning the command regenerates the README's numbers.
"""

from __future__ import annotations

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
    """The README block of one comparison: command, machine, wall time, then the mean ± std table."""
    table = comparison_table(result["summary"], len(result["seeds"]))
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


METHOD_ORDER = ["random", "popularity", "SFT", *PREF_VARIANTS]


def summarize(rows: list[dict], mean_std) -> list[dict]:
    """Mean and std over seeds of hit3 HR@3 / NDCG@3 and hit1 AUC, per method (ranking protocol)."""
    out = []
    for method in METHOD_ORDER:
        entry: dict = {"method": method}
        for task, metric in (("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit1", "AUC")):
            vals = [
                r[metric]
                for r in rows
                if r["task"] == task and r["method"] == method and r["protocol"] == "ranking" and metric in r
            ]
            if vals:
                entry[f"{task} {metric}"] = mean_std(vals)
        if len(entry) > 1:
            out.append(entry)
    return out


def comparison_table(summary: list[dict], n_seeds: int) -> str:
    cols = ["hit3 HR@3", "hit3 NDCG@3", "hit1 AUC"]
    present = [c for c in cols if any(c in e for e in summary)]
    lines = ["| method | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for e in summary:
        cells = [f"{e[c][0]:.4f} ± {e[c][1]:.4f}" if c in e else "-" for c in present]
        lines.append(f"| {e['method']} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nmean ± sample std over {n_seeds} seeds; ranking protocol (title likelihood), test split."
    )
    return "\n".join(lines)
