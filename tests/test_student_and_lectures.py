"""What students and instructors run: `nbgrader validate` on the release, and every lecture."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from autograder import lectures, notebooks, samples

pytestmark = pytest.mark.slow

UNITS = notebooks.units()
NOTEBOOK_CAP_S = 180  # the hard cap per notebook in grading mode (COURSE.md)


def _validate(path):
    from nbgrader.validator import Validator

    return Validator().validate(str(path))


@pytest.mark.parametrize("unit", UNITS)
def test_students_can_validate_their_work(unit, tmp_path, monkeypatch):
    """A student with no config and no gradebook: the untouched release reports failing tests
    (it must not crash), and a complete notebook validates cleanly."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMCOURSE_AUTOGRADER_ROOT", raising=False)
    # the student's copy of the released folder (the notebook, and the earlier references it ships)
    untouched = tmp_path / "untouched" / f"{unit}.ipynb"
    shutil.copytree(notebooks.release_notebook(unit).parent, untouched.parent)
    failures = _validate(untouched)
    assert failures.get("failed"), "the untouched release should fail its visible tests"
    expected = ("NotImplementedError", "AssertionError", "You did not provide a response")
    assert all(any(e in f["raw_error"] for e in expected) for f in failures["failed"])

    done = tmp_path / "done" / f"{unit}.ipynb"
    shutil.copytree(notebooks.release_notebook(unit).parent, done.parent)
    done.write_text(json.dumps(samples.answered(unit)))
    assert _validate(done) == {}, "a correct notebook must validate without failures"


@pytest.mark.parametrize("unit", UNITS)
def test_release_installs_the_course_package_on_colab(unit):
    first_code = next(c for c in notebooks.load(notebooks.release_notebook(unit))["cells"]
                      if c["cell_type"] == "code")
    assert "pip install" in notebooks.source(first_code) and "llmcourse" in notebooks.source(first_code)


@pytest.mark.parametrize("path", lectures.lecture_paths(), ids=lambda p: p.stem)
def test_lecture_executes_and_renders(path, tmp_path):
    start = time.monotonic()
    nb = lectures.execute(path)
    seconds = time.monotonic() - start
    executed, page, slides = lectures.render(nb, path.stem, tmp_path, vendor={})
    assert "reveal" in slides.read_text() and page.stat().st_size > 10_000
    assert sum(1 for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "display_data") >= 5, \
        "a lecture shows its demos as plots"
    print(f"{path.name}: {seconds:.0f} s")
    assert seconds < NOTEBOOK_CAP_S, f"{path.name} took {seconds:.0f} s (cap {NOTEBOOK_CAP_S} s)"


def test_every_unit_has_a_lecture():
    assert {p.stem for p in lectures.lecture_paths()} >= set(UNITS)
