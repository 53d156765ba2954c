"""The comparison's README block: the command, machine and wall time travel with the table."""

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
