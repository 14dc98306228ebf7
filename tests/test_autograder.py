"""The real autograder, end to end: the demo's sample submissions, the ways a submission can break,
and what feedback may show. Each batch of notebooks is graded once per test session."""

from __future__ import annotations

import copy
import io
import json
import os
import re

import pytest

from autograder import grade, notebooks, samples

pytestmark = pytest.mark.slow

UNITS = notebooks.units()


@pytest.fixture(scope="session")
def grading_dir(tmp_path_factory, monkeypatch_session):
    """Grading state in a temporary folder, so tests never touch a TA's real gradebook."""
    state = tmp_path_factory.mktemp("grading")
    monkeypatch_session.setenv("LLMCOURSE_GRADING_DIR", str(state))
    monkeypatch_session.setenv("LLMCOURSE_AUTOGRADER_ROOT", str(notebooks.ROOT))
    return state


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def demo(grading_dir):
    """The demo run: every bundled sample graded once, two at a time as on CI's two cores.
    Returns ({(student, unit): Outcome}, console)."""
    out = io.StringIO()
    outcomes = grade.autograde_folder(samples.SAMPLES, csv_path=grading_dir / "grades.csv", out=out, workers=2)
    return {(o.student, o.assignment): o for o in outcomes}, out.getvalue()


@pytest.mark.parametrize("unit", UNITS)
def test_reference_solution_earns_full_marks(demo, unit):
    alice = demo[0][("alice", unit)]
    assert alice.auto_score == alice.auto_max > 0, alice
    assert alice.status.startswith(grade.STATUS_MANUAL), "written answers must wait for a TA"
    assert alice.bonus == sum(notebooks.bonus_points(unit).values())


@pytest.mark.parametrize("unit", UNITS)
def test_untouched_release_earns_zero_and_does_not_crash(demo, unit):
    bob = demo[0][("bob", unit)]
    assert bob.status == grade.STATUS_GRADED, bob
    assert bob.score == 0 and bob.auto_score == 0 and bob.bonus == 0, bob


@pytest.mark.parametrize("unit", UNITS)
def test_partly_wrong_submission_scores_in_between(demo, unit):
    carol = demo[0][("carol", unit)]
    assert 0 < carol.auto_score < carol.auto_max, carol
    assert carol.auto_score == carol.auto_max - samples.CAROL_LOSES[unit], \
        "each of carol's mistakes must cost its own test cells, and only those"
    written = sum(1 for c in notebooks.load(notebooks.solution_notebook(unit))["cells"]
                  if c["cell_type"] == "markdown" and notebooks.nbgrader_meta(c).get("solution"))
    answered = written - samples.CAROL_SKIPS_WRITTEN
    assert carol.status == f"{grade.STATUS_MANUAL} ({answered} answers)", \
        "a blank written answer scores 0 at once; the others wait for a TA"


@pytest.mark.parametrize("unit", UNITS)
def test_broken_submissions_are_reported_not_zeroed(demo, unit):
    dave, erin = demo[0][("dave", unit)], demo[0][("erin", unit)]
    assert dave.status.startswith("corrupt notebook") and dave.score is None
    assert erin.status == "kernel died" and erin.score is None


def test_gradebook_table_and_csv(demo, grading_dir):
    _, console = demo
    assert re.search(r"student\s+assignment\s+score\s+max score", console)
    assert str(grading_dir / "grades.csv") in console and "Feedback:" in console
    rows = (grading_dir / "grades.csv").read_text().splitlines()
    assert rows[0].startswith("student,assignment,score,max_score")
    assert len(rows) == 1 + 5 * len(UNITS)
    dave_row = next(r for r in rows if r.startswith("dave,"))
    assert dave_row.split(",")[2] == "", "a corrupt notebook must not show up as a 0"


def test_grading_again_is_idempotent_and_regrades_only_what_changed(demo, grading_dir, tmp_path):
    """A second run over the same folder keeps every row (by content hash) and writes the same CSV;
    a changed notebook is graded again, and so is an unchanged one with force."""
    first_csv = (grading_dir / "grades.csv").read_text()
    out = io.StringIO()
    again = grade.autograde_folder(samples.SAMPLES, csv_path=tmp_path / "again.csv", out=out)
    assert (tmp_path / "again.csv").read_text() == first_csv
    assert not re.search(r"^grading ", out.getvalue(), re.M), "nothing unchanged is graded again"
    assert out.getvalue().count("unchanged since it was graded") == len(again)

    unit = UNITS[0]
    folder = tmp_path / "resubmitted"
    nb = notebooks.load(samples.SAMPLES / "erin" / unit / f"{unit}.ipynb")
    nb["cells"][0]["source"] = notebooks.source(nb["cells"][0]) + "\n# resubmitted"
    (folder / "erin" / unit).mkdir(parents=True)
    (folder / "erin" / unit / f"{unit}.ipynb").write_text(json.dumps(nb))
    (folder / "bob" / unit).mkdir(parents=True)
    (folder / "bob" / unit / f"{unit}.ipynb").write_bytes((samples.SAMPLES / "bob" / unit / f"{unit}.ipynb").read_bytes())
    out = io.StringIO()
    rows = {o.student: o for o in grade.autograde_folder(folder, csv_path=tmp_path / "re.csv", out=out)}
    assert f"grading erin/{unit}" in out.getvalue() and f"grading bob/{unit}" not in out.getvalue()
    assert rows["erin"].status == "kernel died" and rows["bob"] == demo[0][("bob", unit)]
    out = io.StringIO()
    forced = {o.student: o for o in grade.autograde_folder(folder, csv_path=tmp_path / "forced.csv", out=out,
                                                             force=True)}
    assert f"grading bob/{unit}" in out.getvalue()
    assert _same_grade(forced["bob"], demo[0][("bob", unit)]), "one at a time grades as two side by side do"


def _same_grade(a, b) -> bool:
    return (a.status, a.score, a.max_score, a.auto_score, a.bonus) == (b.status, b.score, b.max_score,
                                                                      b.auto_score, b.bonus)


def _sample_folder(root, unit, students):
    for student in students:
        (root / student / unit).mkdir(parents=True)
        for path in (samples.SAMPLES / student / unit).iterdir():
            (root / student / unit / path.name).write_bytes(path.read_bytes())
    return root


def test_a_dask_cluster_grades_as_the_local_run_does(demo, tmp_path, monkeypatch):
    """A Dask cluster on localhost grades each submission as a task on its workers: the same rows as
    the local run, and only this process writes the gradebook (the workers send results back).
    Once a cluster that grading starts itself ("local"), once one started beforehand (its address)."""
    import dask
    from distributed import Client, LocalCluster

    unit = UNITS[0]
    monkeypatch.setenv("LLMCOURSE_GRADING_DIR", str(tmp_path / "state"))
    folder = _sample_folder(tmp_path / "in", unit, ["alice", "bob", "dave", "erin"])
    rows = grade.autograde_folder(folder, csv_path=tmp_path / "local.csv", out=io.StringIO(),
                                  scheduler="local", workers=2)
    for row in rows:
        assert _same_grade(row, demo[0][(row.student, unit)]), row
    graded = [r for r in rows if r.student != "dave"]
    assert all(r.device == "cpu" and r.worker and not r.worker.endswith(f":{os.getpid()}") for r in graded)
    assert len({r.worker for r in graded}) == 2, "both workers graded"

    with dask.config.set({"distributed.worker.daemon": False}), \
            LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        again = grade.autograde_folder(folder, csv_path=tmp_path / "remote.csv", out=io.StringIO(), force=True,
                                       scheduler=cluster.scheduler_address)
    assert [_same_grade(a, b) for a, b in zip(again, rows, strict=True)] == [True] * len(rows)
    assert {int(r.worker.rsplit(":", 1)[1]) for r in again if r.student != "dave"} == pids


def test_each_worker_gets_its_own_gpu(tmp_path, monkeypatch):
    """With GPUs, each local worker slot hands its GPU to its kernels as CUDA_VISIBLE_DEVICES, and the
    CSV records it. (CI has no GPU: the two GPUs are the list the grader would read from /dev.)"""
    unit = UNITS[0]
    monkeypatch.setenv("LLMCOURSE_GRADING_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(grade, "visible_gpus", lambda: ["0", "1"])
    release = notebooks.load(notebooks.release_notebook(unit))
    first_answer = next(c for c in release["cells"] if notebooks.nbgrader_meta(c).get("solution")
                        and c["cell_type"] == "code")
    first_answer["source"] = 'import os\nprint("CUDA_VISIBLE_DEVICES=" + os.environ["CUDA_VISIBLE_DEVICES"])\n'
    for student in ("gpu_a", "gpu_b"):
        (tmp_path / "in" / student / unit).mkdir(parents=True)
        (tmp_path / "in" / student / unit / f"{unit}.ipynb").write_text(json.dumps(release))
    rows = grade.autograde_folder(tmp_path / "in", csv_path=tmp_path / "gpus.csv", out=io.StringIO(), workers=2)
    assert sorted(r.device for r in rows) == ["gpu 0", "gpu 1"]
    for row in rows:
        graded = notebooks.load(tmp_path / "state" / "autograded" / row.student / unit / f"{unit}.ipynb")
        printed = "".join(str(o.get("text", "")) for c in graded["cells"] for o in c.get("outputs", []))
        assert f"CUDA_VISIBLE_DEVICES={row.device.split()[1]}" in printed
    assert "device" in (tmp_path / "gpus.csv").read_text().splitlines()[0]


def _hidden_source_lines(unit: str) -> list[str]:
    """Distinctive lines of the hidden tests: none may appear in feedback."""
    hidden = notebooks.ROOT / "autograder" / "hidden" / f"unit{unit}.py"
    lines = [ln.strip() for ln in hidden.read_text().splitlines()]
    return [ln for ln in lines if len(ln) > 30 and not ln.startswith(("#", '"', "def ", "from ", "import "))]


@pytest.mark.parametrize("unit", UNITS)
def test_feedback_never_shows_hidden_tests(demo, grading_dir, unit):
    secret = _hidden_source_lines(unit)
    assert secret
    for student in ("alice", "bob", "carol"):
        html = (grading_dir / "feedback" / student / unit / f"{unit}.html").read_text()
        assert "BEGIN HIDDEN TESTS" not in html and "hidden_tests(" not in html
        for line in secret:
            assert line not in html, f"{student}'s feedback leaks hidden test source: {line}"
    bob_html = (grading_dir / "feedback" / "bob" / unit / f"{unit}.html").read_text()
    assert "NotImplementedError" in bob_html, "feedback should say why the tests failed"


# --- submissions that try to break the grader -------------------------------------------------

def _first_answer(nb: dict, cell_type: str = "code") -> dict:
    return next(c for c in nb["cells"]
                if notebooks.nbgrader_meta(c).get("solution") and c["cell_type"] == cell_type)


def _test_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if notebooks.nbgrader_meta(c).get("grade")
            and not notebooks.nbgrader_meta(c).get("solution")]


def _prepend(cell: dict, code: str) -> None:
    cell["source"] = code + "\n" + notebooks.source(cell)


def _variants(unit: str) -> dict[str, dict]:
    ref = samples.answered(unit)
    v = {name: copy.deepcopy(ref) for name in
         ("sysexit", "edited", "deleted", "duplicated", "hugeoutput", "cellloop", "colab")}
    exit_cell = _first_answer(v["sysexit"])
    exit_cell["source"] = notebooks.source(exit_cell) + "\nimport sys\nsys.exit(0)"
    _test_cells(v["edited"])[0]["source"] = "pass  # a student 'fixed' the test"
    v["deleted"]["cells"].remove(_test_cells(v["deleted"])[0])
    dup = _first_answer(v["duplicated"])
    v["duplicated"]["cells"].insert(v["duplicated"]["cells"].index(dup) + 1, copy.deepcopy(dup))
    # 2 MB of stdout in 20k messages: enough to flood the notebook, quick enough that a loaded
    # CI machine does not turn it into a per-cell timeout instead.
    _prepend(_first_answer(v["hugeoutput"]), "for _i in range(20_000):\n    print('spam' * 25, _i)")
    _prepend(_first_answer(v["cellloop"]), "while True:\n    pass")
    for cell in v["colab"]["cells"]:  # Colab drops the lock flags and the cell ids
        cell["metadata"].pop("editable", None)
        cell["metadata"].pop("deletable", None)
        cell.pop("id", None)
    v["colab"]["nbformat_minor"] = 4
    return v


@pytest.fixture(scope="session")
def robustness(demo, grading_dir, tmp_path_factory, monkeypatch_session):
    """Grade the hostile variants once, with short time limits."""
    folder = tmp_path_factory.mktemp("hostile")
    unit = UNITS[0]
    for name, nb in _variants(unit).items():
        path = folder / name / unit / f"{unit}.ipynb"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(nb, indent=1))
    timeout_dir = folder / "overall" / unit
    timeout_dir.mkdir(parents=True)
    slow = samples.answered(unit)
    _prepend(_first_answer(slow), "import time\ntime.sleep(600)")
    (timeout_dir / f"{unit}.ipynb").write_text(json.dumps(slow))
    monkeypatch_session.setenv("LLMCOURSE_CELL_TIMEOUT", "8")
    out = io.StringIO()
    # The overall limit must cut the 600 s sleep long before the per-cell limit would matter,
    # so the per-cell limit is raised for that one student only by grading it separately.
    outcomes = grade.autograde_folder(folder, csv_path=folder / "grades.csv", out=out,
                                      timeout_s=90, skip={"overall"})
    monkeypatch_session.setenv("LLMCOURSE_CELL_TIMEOUT", "600")
    outcomes += grade.autograde_folder(folder, csv_path=folder / "grades2.csv", out=out,
                                       timeout_s=8, skip=set(_variants(unit)))
    monkeypatch_session.setenv("LLMCOURSE_CELL_TIMEOUT", "60")
    reference = demo[0][("alice", unit)]
    return {o.student: o for o in outcomes}, reference


def test_sys_exit_does_not_stop_grading(robustness):
    got, ref = robustness
    assert got["sysexit"].auto_score == ref.auto_max, got["sysexit"]


def test_edited_test_cell_is_restored(robustness):
    got, ref = robustness
    assert got["edited"].auto_score == ref.auto_max and got["edited"].auto_max == ref.auto_max


def test_deleted_test_cell_is_restored(robustness):
    got, ref = robustness
    assert got["deleted"].auto_max == ref.auto_max, "a deleted test cell must still count"
    assert got["deleted"].auto_score == ref.auto_max


def test_duplicated_cell_does_not_break_grading(robustness):
    got, ref = robustness
    assert got["duplicated"].auto_score == ref.auto_max, got["duplicated"]


def test_huge_output_is_survived(robustness):
    got, ref = robustness
    assert got["hugeoutput"].auto_score == ref.auto_max, got["hugeoutput"]


def test_notebook_saved_by_colab_is_graded(robustness):
    got, ref = robustness
    assert got["colab"].auto_score == ref.auto_max, got["colab"]


def test_infinite_loop_costs_one_cell_not_the_run(robustness):
    got, ref = robustness
    loop = got["cellloop"]
    assert loop.status.startswith((grade.STATUS_GRADED, grade.STATUS_MANUAL)), loop
    assert 0 <= loop.auto_score < ref.auto_max
    assert any("time limit" in n for n in loop.notes)


def test_overall_time_limit(robustness):
    got, _ = robustness
    assert got["overall"].status.startswith("timed out"), got["overall"]
    assert got["overall"].score is None
    assert got["overall"].seconds < 60


# --- LMS intake -------------------------------------------------------------------------------

def test_lms_zip_becomes_nbgrader_layout(tmp_path):
    import zipfile

    from autograder.intake import unpack_lms_zip

    unit = UNITS[0]
    archive = tmp_path / "submissions.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"smithjane_12345_67890_{unit}.ipynb", "{}")
        zf.writestr(f"doejohn_late_222_333_{unit}-1.ipynb", "{}")
        zf.writestr("notes.txt", "not a notebook")
        zf.writestr("mystery.ipynb", "{}")
    layout = unpack_lms_zip(archive)
    found = sorted((s, a) for s, a, _ in grade.discover(layout))
    assert found == [("doejohn", unit), ("smithjane", unit)]
    assert (layout / "smithjane" / unit / f"{unit}.ipynb").read_text() == "{}"
