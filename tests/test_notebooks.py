"""Every notebook in examples/ executes top to bottom in its fast mode, outputs not committed.

Notebooks are discovered by glob, like the scripts of tests/test_examples.py. Each runs
in a fresh Jupyter kernel (``nbclient``) with ``HE_FAST=1`` (the notebooks' switch for
fewer steps, the counterpart of the scripts' ``--fast``), one thread per process, and the
repository on ``PYTHONPATH``, in a temporary working directory. The executed notebook
must have no error output, show its figures inline (``image/png``) and display results
through their rich HTML representation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb")) if (ROOT / "examples").is_dir() else []
TIMEOUT_S = 600


def test_notebooks_exist() -> None:
    assert (ROOT / "examples" / "analyse_checkpoint.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_are_not_committed(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_fast(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in ("matplotlib", "tqdm"):
        pytest.importorskip(module)
    monkeypatch.setenv("HE_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws figures
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{path.name}: executed in {seconds:.1f} s (HE_FAST=1)")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    data = [
        o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result")
    ]
    assert any("image/png" in d for d in data), f"{path.name} showed no inline figure"
    html = [d["text/html"] for d in data if "text/html" in d]
    assert any("EigenResult" in h for h in html), f"{path.name} displayed no result as HTML"
