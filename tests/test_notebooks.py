"""Execute every notebook in notebooks/ top to bottom with nbclient; any cell that raises fails the test.

The kernel is ``python3`` launched with this interpreter (jupyter_client replaces a kernelspec's
``python`` with ``sys.executable``), and a last cell checks that the kernel really runs this venv's
Python. Outputs go to a temporary directory (``LLAVA_LENS_RESULTS``), never into the repository.
Deselect with ``-m "not notebooks"``.
"""

import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
BUDGET_S = 180  # each notebook must run in under 3 minutes on a 2-core CPU


def test_notebooks_found():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_step_through.ipynb", "02_where_does_it_look.ipynb", "03_dataset_sweep.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"
    sources = "\n".join(c.source for c in nb.cells)
    assert "USE_REAL_MODEL = False" in sources and "llava-hf/llava-1.5-7b-hf" in sources


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LENS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable); print(sys.prefix)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError if any cell raises
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    kernel_python = "".join(o.get("text", "") for o in nb.cells[-1].outputs).split()
    assert kernel_python == [sys.executable, sys.prefix], f"kernel runs {kernel_python}, not this venv"
    written = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "results" / path.stem) for p in written)
    assert seconds < BUDGET_S, f"{path.name} took {seconds:.0f} s (budget {BUDGET_S} s)"
