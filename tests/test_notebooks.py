"""The tutorial notebooks are stored without outputs (CI executes them separately with
`python -m pytest --nbmake notebooks/`), valid, and each states its CPU run time at the top."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        k
        for k, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name} has outputs in cells {dirty}: clear them "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(path.parents[1])})"
    )
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state; clear it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_states_its_cpu_run_time(path):
    first = nbformat.read(path, as_version=4).cells[0].source
    assert "CPU run time:" in first and "not measured" not in first, (
        f"{path.name}: state the measured CPU run time"
    )
