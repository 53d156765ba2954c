"""The comparison's README block: the command, machine and wall time travel with the table."""

import pytest

from hanorec.metrics import mean_std
from hanorec.report import comparison_report, summarize, update_readme_section


def _result():
    rows = [
        {"task": "hit3", "seed": s, "method": m, "protocol": "ranking", "HR@3": v, "NDCG@3": v / 2}
        for s, (a, b) in enumerate([(0.4, 0.5), (0.6, 0.7)])
        for m, v in (("SFT", a), ("DPO", b))
    ]
    return {
        "summary": summarize(rows, mean_std),
        "seeds": [0, 1],
        "wall_s": 90.0,
        "dataset": "assets/demo",
        "model": "tiny-llava",
        "command": "python -m hanorec compare --seeds=0,1",
        "machine": "test box",
    }


def test_report_holds_command_machine_time_and_mean_std():
    """SFT HR@3 over seeds (0.4, 0.6): mean 0.5, sample std sqrt(0.02) = 0.1414."""
    text = comparison_report(_result())
    assert "`python -m hanorec compare --seeds=0,1`" in text
    assert "test box" in text and "1.5 min" in text
    assert "| SFT | 0.5000 ± 0.1414 | 0.2500 ± 0.0707 |\n" in text  # no hit1 rows: no AUC column
    assert "| DPO | 0.6000 ± 0.1414 |" in text


def test_section_is_replaced_in_place_and_appended_when_missing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- comparison:demo -->\nold table\n<!-- /comparison:demo -->\noutro\n")
    update_readme_section(readme, "demo", "new table")
    assert (
        readme.read_text() == "intro\n<!-- comparison:demo -->\nnew table\n<!-- /comparison:demo -->\noutro\n"
    )
    update_readme_section(readme, "movielens", "other")
    text = readme.read_text()
    assert text.startswith("intro\n<!-- comparison:demo -->\nnew table")
    assert text.endswith("<!-- comparison:movielens -->\nother\n<!-- /comparison:movielens -->\n")
    assert not (tmp_path / "README.md.lock").exists()


def _per_example():
    """Two seeds, 30 users. hit3: DPO hits where SFT does and on 10 more users; HaNo-DPO equals SFT.
    hit1: SFT ranks every Yes above every No (AUC 1), DPO's scores are reversed (AUC 0)."""
    import numpy as np

    users = [f"u{i}" for i in range(30)]
    rng = np.random.default_rng(0)
    out = []
    for seed in (0, 1):
        sft = (rng.random(30) < 0.4).astype(float)
        dpo = sft.copy()
        dpo[np.flatnonzero(sft == 0)[:10]] = 1.0
        for method, hits in (("SFT", sft), ("DPO", dpo), ("HaNo-DPO", sft)):
            values = {"user": users, "HR@1": hits.tolist(), "HR@3": hits.tolist(), "NDCG@3": (hits / 2).tolist()}
            out.append({"task": "hit3", "seed": seed, "method": method, "values": values})
        labels = [i % 2 == 0 for i in range(30)]
        score = [float(i % 2 == 0) + rng.random() * 0.1 for i in range(30)]
        for method, s in (("SFT", score), ("DPO", [-v for v in score]), ("HaNo-DPO", score)):
            out.append({"task": "hit1", "seed": seed, "method": method, "values": {"user": users, "score": s, "label": labels}})
    return out


def test_paired_table_renders_the_bootstrap_numbers():
    from hanorec.report import paired_differences, paired_table
    from hanorec.stats import paired_bootstrap

    paired = paired_differences(_per_example(), n_boot=300)
    got = {(e["method"], e["reference"]): e for e in paired}
    assert set(got) == {("DPO", "SFT"), ("HaNo-DPO", "SFT"), ("SFT", "DPO"), ("HaNo-DPO", "DPO")}
    # DPO over SFT on hit3: 10 more hits out of 30 users in each seed -> +1/3, the whole interval above 0
    d = got[("DPO", "SFT")]["hit3 HR@3"]
    assert d["mean"] == pytest.approx(1 / 3) and d["excludes_zero"] and d["n_users"] == 30
    pe = {(e["task"], e["seed"], e["method"]): e["values"] for e in _per_example()}
    direct = paired_bootstrap(
        pe[("hit3", 0, "DPO")]["HR@3"] + pe[("hit3", 1, "DPO")]["HR@3"],
        pe[("hit3", 0, "SFT")]["HR@3"] + pe[("hit3", 1, "SFT")]["HR@3"],
        pe[("hit3", 0, "SFT")]["user"] * 2,
        n_boot=300,
    )
    assert d == direct.to_dict()
    # identical methods: 0 with an interval containing 0; hit1 AUC 0 - 1 = -1 against SFT
    same = got[("HaNo-DPO", "SFT")]
    assert same["hit3 NDCG@3"]["mean"] == 0.0 and not same["hit3 NDCG@3"]["excludes_zero"]
    assert got[("DPO", "SFT")]["hit1 AUC"]["mean"] == pytest.approx(-1.0)
    assert got[("HaNo-DPO", "DPO")]["hit1 AUC"]["mean"] == pytest.approx(1.0)

    table = paired_table(paired, 2, "ranking", "test")
    lines = table.splitlines()
    assert lines[0] == "| method | vs | hit3 HR@3 | hit3 NDCG@3 | hit1 AUC |"
    row = next(line for line in lines if line.startswith("| DPO | SFT |"))
    assert f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] *" in row
    zero = "+0.0000 [+0.0000, +0.0000] ±0.0000"
    assert f"| HaNo-DPO | SFT | {zero} | {zero} | {zero} |" in table
    assert f"±{d['detectable']:.4f}" in row and "80% power" in table
    assert "Ranking protocol (title likelihood), test split." in table
    assert "hit3: 30 users" in table and "pooled over 2 seeds" in table


def test_report_carries_the_paired_table_when_present():
    from hanorec.report import paired_differences

    result = {**_result(), "paired": paired_differences(_per_example(), n_boot=50), "split": "val"}
    text = comparison_report(result)
    assert "| DPO | SFT |" in text and "Ranking protocol (title likelihood), val split." in text
    assert "| method | vs |" not in comparison_report(_result())


def test_tables_name_their_protocol_and_split():
    """The mean ± std caption is no longer fixed to the ranking protocol and the test split: it names the
    protocol its rows come from and the split with its window policy (an old alias shown by its new name)."""
    from hanorec.report import comparison_table

    rows = [
        {"task": "hit3", "seed": s, "method": "SFT", "protocol": p, "HR@3": v, "NDCG@3": v}
        for s in (0, 1)
        for p, v in (("ranking", 0.5), ("paper", 0.25))
    ] + [{"task": "hit1", "seed": 0, "method": "SFT", "protocol": "paper", "AUC": None}]
    paper = summarize(rows, mean_std, "paper")
    assert paper[0]["hit3 HR@3"] == (0.25, 0.0) and "hit1 AUC" not in paper[0]  # an undefined AUC is left out
    table = comparison_table(paper, 2, "paper", "val", "by_user")
    assert "paper protocol (the authors'" in table and "val split (last_window_by_user windows)." in table
    assert "ranking protocol" not in table
    text = comparison_report({**_result(), "protocol": "ranking", "split": "test", "split_policy": "leave_one_out"})
    assert "ranking protocol (title likelihood), test split (leave_one_out windows)." in text
