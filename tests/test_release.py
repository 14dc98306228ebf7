"""The student release is exactly what nbgrader generates from solutions/, and every generated
file (exported references, sample submissions) is fresh."""

from __future__ import annotations

import shutil

import pytest

from autograder import notebooks, samples
from autograder.api import make_api

UNITS = notebooks.units()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """A release generated from solutions/ into a scratch course folder."""
    root = tmp_path_factory.mktemp("course")
    shutil.copytree(notebooks.SOLUTIONS, root / "solutions")
    api = make_api(**{"CourseDirectory.root": str(root),
                      "CourseDirectory.db_url": f"sqlite:///{root / 'gradebook.db'}"})
    for unit in UNITS:
        result = api.generate_assignment(unit, force=True, create=True)
        assert result["success"], result["log"]
    return root / "assignments"


def test_there_are_units():
    assert "01_ngrams" in UNITS


@pytest.mark.parametrize("unit", UNITS)
def test_release_is_byte_identical_to_generated(regenerated, unit):
    committed = notebooks.release_notebook(unit).read_bytes()
    fresh = (regenerated / unit / f"{unit}.ipynb").read_bytes()
    assert committed == fresh, f"assignments/{unit} is stale or hand-edited: run `make release`"
    released = notebooks.release_notebook(unit).parent
    files = {p.relative_to(released) for p in released.rglob("*") if p.is_file()}
    assert files == {p.relative_to(regenerated / unit) for p in (regenerated / unit).rglob("*") if p.is_file()}
    for path in files:
        assert (released / path).read_bytes() == (regenerated / unit / path).read_bytes(), path


@pytest.mark.parametrize("unit", UNITS)
def test_release_hides_solutions_and_hidden_tests(unit):
    text = notebooks.release_notebook(unit).read_text()
    assert "BEGIN HIDDEN TESTS" not in text and "hidden_tests(" not in text
    assert "BEGIN SOLUTION" not in text
    nb = notebooks.load(notebooks.release_notebook(unit))
    assert not any(c.get("outputs") for c in nb["cells"])


@pytest.mark.parametrize("unit", UNITS)
def test_notebooks_are_stored_without_outputs(unit):
    for path in (notebooks.solution_notebook(unit), notebooks.release_notebook(unit)):
        nb = notebooks.load(path)
        assert not any(c.get("outputs") or c.get("execution_count") for c in nb["cells"]
                       if c["cell_type"] == "code"), f"{path}: strip outputs"


@pytest.mark.parametrize("unit", UNITS)
def test_exported_reference_is_fresh(unit):
    assert notebooks.reference_path(unit).read_text() == notebooks.exported_reference(unit), \
        "the exported reference is stale: run `make references`"


@pytest.mark.parametrize("unit", UNITS)
def test_shipped_references_are_fresh_copies(unit):
    """A later unit ships the references it builds on (COURSE.md, "One source": generated copies)."""
    folder = notebooks.SOLUTIONS / unit / "references"
    shipped = {notebooks.shipped_reference_path(unit, earlier) for earlier in notebooks.shipped_references(unit)}
    assert set(folder.glob("*.py")) == shipped, "run `make references`"
    for path in shipped:
        assert path.read_text() == notebooks.reference_path(path.stem.removeprefix("unit")).read_text(), \
            f"{path} is stale: run `make references`"
    assert all(earlier < unit for earlier in notebooks.shipped_references(unit)), "only earlier units' references"


@pytest.mark.parametrize("unit", UNITS)
def test_sample_submissions_are_fresh(unit):
    for path, text in samples.sample_files(unit).items():
        assert path.read_text() == text, f"{path} is stale: run `make samples`"


@pytest.mark.parametrize("unit", UNITS)
def test_solution_cells_are_well_formed(unit):
    cells = notebooks.load(notebooks.solution_notebook(unit))["cells"]
    ids = [notebooks.nbgrader_meta(c)["grade_id"] for c in cells if notebooks.nbgrader_meta(c)]
    assert len(ids) == len(set(ids)), "grade_ids must be unique"
    points = sum(notebooks.nbgrader_meta(c).get("points", 0) for c in cells
                 if notebooks.nbgrader_meta(c).get("grade"))
    assert 90 <= points <= 110, f"{unit} is worth {points} points; units are about 100"
    assert all(c.get("id") for c in cells), "every cell needs an id (nbformat 4.5)"
