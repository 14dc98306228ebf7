"""Helpers the per-unit test files share to read a solution notebook the way nbgrader does.

They need nbformat and nbgrader (CI has both); on a machine without Jupyter, such as the GPU
machine, the tests that use them are skipped and the hidden-test checks still run.
"""

from __future__ import annotations

import pytest


def nbformat_module():
    return pytest.importorskip("nbformat", reason="reading notebooks needs nbformat")


def read_notebook(path):
    return nbformat_module().read(path, as_version=4)


def release_notebook(path):
    """The student release of a source notebook, made by nbgrader's own preprocessors."""
    pytest.importorskip("nbgrader", reason="the release stubs come from nbgrader")
    from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions

    nb = read_notebook(path)
    nb, _ = ClearSolutions().preprocess(nb, {})
    nb, _ = ClearHiddenTests().preprocess(nb, {})
    return nb


def nbg(cell) -> dict:
    """A cell's nbgrader metadata ({} for an ordinary cell)."""
    return cell.metadata.get("nbgrader", {})


def is_definition_cell(cell) -> bool:
    """A solution cell that defines graded names, or a cell tagged ``export`` (their imports)."""
    meta = nbg(cell)
    return bool(meta.get("solution") and not meta.get("grade")) or "export" in cell.metadata.get("tags", [])


def exec_cells(nb, predicate, ns=None) -> dict:
    """Run the code cells of ``nb`` that ``predicate`` selects in one namespace; returns it."""
    ns = {} if ns is None else ns
    for cell in nb.cells:
        if cell.cell_type == "code" and predicate(cell):
            exec(compile(cell.source, f"<cell {cell.get('id')}>", "exec"), ns)
    return ns
