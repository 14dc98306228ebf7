"""The tests every graded unit gets, written once: a unit's test file describes the unit (a
``UnitUnderTest``), adds its own tests (the reference against PyTorch or a naive definition, its
lazy stubs and its mutants), and takes the common ones with
``globals().update(common_tests(U, lazy_ns=..., mutants=...))``.

The common tests check that

- the reference passes every hidden check, quickly, and ``swapped()`` restores the names;
- release stubs, missing names and lazy stubs (constants a student might hope to get points
  with) fail every check;
- every mutant (a mistake students really make) fails exactly the checks listed for it: through
  the hidden checks alone (this part also runs on the GPU machine, which has no Jupyter) and
  through whole cells as nbgrader grades them (visible asserts, then the hidden check);
- the solution notebook is well-formed for nbgrader (ids, metadata, points, markers, one check per
  test cell, graded names top-level) and its exported reference is fresh;
- the visible tests pass on the reference and fail on the release stubs, the written answers are
  blanked in the release, and the release runs end to end with the stubs.

A notebook namespace is a dict of names, as the hidden tests receive ``globals()`` from the
grading kernel.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import time
from collections.abc import Callable, Iterable
from functools import cached_property

import pytest
from notebook_testing import (
    exec_cells,
    is_definition_cell,
    nbformat_module,
    nbg,
    read_notebook,
    release_notebook,
)

from autograder import notebooks
from llmcourse.grading import GradingFailure, HiddenTests
from llmcourse.wire import Loopback

C = "check_"
Mutants = dict[str, tuple[dict, set[str]]]  # name: (namespace overrides, the checks it must fail)


class InNotebook:
    """A mutant given as source code and run in the notebook's namespace, as a student's cell is: its
    global names (the parts it calls) are then the namespace's, including those a check swaps in
    (the reference parts, a crashing ``get_batch``), instead of fixed objects."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source

    def define(self, ns: dict):
        exec(compile(self.source, f"<mutant {self.name}>", "exec"), ns)
        return ns[self.name]


class UnitUnderTest:
    """One graded unit: its hidden-test module, the reference exported from its solution
    notebook, and how its checks split into parts.

    ``part_names`` maps a part to the notebook names its cells (visible and hidden) use, and
    ``part_of(check)`` names a check's part: a mutant only runs the checks of the parts that use
    a name it overrides (the others cannot change). Without them every check runs.
    ``helper_cell_ids`` are the read-only cells the visible tests need (imports, data, helpers).
    """

    def __init__(self, unit: str, hidden, *, graded_names: Iterable[str], helpers: Iterable[str] = (),
                 part_names: dict[str, set[str]] | None = None, part_of: Callable[[str], str] | None = None,
                 helper_cell_ids: Iterable[str] = ("notebook-imports",), bonus: dict[str, float] | None = None,
                 auto_points: float = 85, manual_points: float = 15, written_questions: int = 3):
        self.unit = unit
        self.hidden = hidden
        self.graded_names = list(graded_names)
        self.helpers = list(helpers)
        self.part_names = part_names
        self.part_of = part_of
        self.helper_cell_ids = set(helper_cell_ids)
        self.bonus = bonus or {}
        self.auto_points, self.manual_points = auto_points, manual_points
        self.written_questions = written_questions
        self.checks = sorted(name for name in dir(hidden) if name.startswith(C))
        self.nb_path = notebooks.solution_notebook(unit)
        self.reference_path = notebooks.reference_path(unit)
        self._reference_code = compile(self.reference_path.read_text(encoding="utf-8"),
                                       str(self.reference_path), "exec")

    @property
    def names(self) -> list[str]:
        return self.graded_names + self.helpers

    # --- namespaces -------------------------------------------------------------------------------

    @property
    def runs_outside_the_kernel(self) -> bool:
        return bool(getattr(self.hidden, "RUNS_OUTSIDE_THE_KERNEL", False))

    def run_check(self, check: str, ns: dict) -> None:
        """Run a hidden check the way the autograder does (failures become GradingFailure): for a
        unit whose checks run outside the kernel, through the wire, with ``ns`` on the other side."""
        if not self.runs_outside_the_kernel:
            getattr(HiddenTests(self.hidden), check)(ns)
            return
        loop = Loopback(ns)
        loop.peer.pure = getattr(self.hidden, "PURE_METHODS", {})
        with loop as remote_ns:
            getattr(HiddenTests(self.hidden), check)(remote_ns)

    def reference_ns(self) -> dict:
        """A namespace holding the reference: its code runs in the namespace, as in a kernel, so a
        name replaced in it (a mutant, or swapped()) is what the other code sees."""
        ns = {"__name__": "__main__"}
        exec(self._reference_code, ns)
        return ns

    def make_ns(self, *updates: dict) -> dict:
        """The reference namespace updated *in place* with each of ``updates`` (e.g. a mutant); an
        ``InNotebook`` value is defined in the namespace itself, as a student's cell would be."""
        ns = self.reference_ns()
        for update in updates:
            for name, value in update.items():
                ns[name] = value.define(ns) if isinstance(value, InNotebook) else value
        return ns

    def affected_checks(self, overrides: dict) -> list[str]:
        """The checks of every part that uses one of the overridden names."""
        if self.part_names is None:
            return list(self.checks)
        return [c for c in self.checks if self.part_names[self.part_of(c)] & set(overrides)]

    def failing_checks(self, ns_factory: Callable[[], dict], checks: Iterable[str] | None = None) -> set[str]:
        failed = set()
        for check in self.checks if checks is None else checks:
            try:
                self.run_check(check, ns_factory())
            except GradingFailure:
                failed.add(check)
        return failed

    # --- the notebook, as nbgrader reads and releases it ------------------------------------------

    @cached_property
    def nb(self):
        return read_notebook(self.nb_path)

    @cached_property
    def release_nb(self):
        return release_notebook(self.nb_path)

    def release_ns(self) -> dict:
        """A fresh namespace with the release's definitions (the stubs) and its imports."""
        return exec_cells(self.release_nb, is_definition_cell)

    @cached_property
    def graded_cells(self) -> list[tuple[str, str]]:
        """(check name, visible source of the release cell) for every autograded cell."""
        source = {c.id: c.source for c in self.nb.cells}
        cells = []
        for cell in self.release_nb.cells:
            meta = nbg(cell)
            if meta.get("grade") and not meta.get("solution"):
                check = source[cell.id].split(f'hidden_tests("{self.unit}").')[1].split("(")[0]
                cells.append((check, cell.source))
        return cells

    @cached_property
    def notebook_helpers(self) -> dict:
        """The read-only helper cells the visible tests use, run on top of the reference (as in
        the notebook, where they come after the solution cells), without the graded names."""
        os.environ.setdefault("MPLBACKEND", "Agg")
        ns = exec_cells(self.release_nb, lambda c: c.get("id") in self.helper_cell_ids, self.reference_ns())
        for name in self.names:
            ns.pop(name, None)
        return ns

    def visible_test_cells(self, nb) -> list:
        return [c for c in nb.cells if nbg(c).get("grade") and not nbg(c).get("solution")]


def _from_earlier_reference(node, unit: str) -> bool:
    """``reference("NN_name").attribute`` of an earlier unit."""
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "reference"
            and len(node.value.args) == 1 and isinstance(node.value.args[0], ast.Constant)
            and str(node.value.args[0].value) < unit)


def run_cell(u: UnitUnderTest, check: str, visible: str, ns: dict, mutant: str) -> None:
    """What nbgrader runs for one autograded cell: its visible asserts, then its hidden check."""
    exec(compile(visible, check, "exec"), ns)
    u.run_check(check, ns)


def common_tests(u: UnitUnderTest, *, lazy_ns: Callable[[], dict], mutants: Mutants,
                 slow_mutants: Iterable[str] = (), slow_check: str | None = None,
                 cascades: dict[str, set[str]] | None = None,
                 may_also_fail: Callable[[dict], set[str]] = lambda overrides: set(),
                 cell_runner: Callable = run_cell, hidden_seconds: float = 10.0,
                 hidden_only_mutants: Iterable[str] | None = None,
                 solution_cell_words: Iterable[str] = ("print(", "plt.", "shakespeare")) -> dict:
    """The tests every unit gets, as a dict of pytest test functions for the unit's module.

    ``slow_mutants`` are too slow to run ``slow_check``'s cell with: the whole-cell test counts that
    cell as failed (the unit tests its hidden check on them itself). ``cascades`` lists, per mutant,
    the cells it also fails when the visible tests must run the student's own parts (the hidden
    checks swap in the reference; the visible ones cannot). ``may_also_fail(overrides)`` names
    cells that may fail or not (a bonus cell that uses the overridden name).
    ``hidden_only_mutants`` (default: all) are also run through the hidden checks alone.
    """
    cascades = cascades or {}
    slow_mutants = set(slow_mutants)

    @pytest.mark.parametrize("check", u.checks)
    def test_reference_passes(check):
        ns = u.reference_ns()
        before = {name: ns[name] for name in u.names}
        u.run_check(check, ns)
        assert all(ns[name] is before[name] for name in before), "swapped() must restore names"

    @pytest.mark.parametrize("check", u.checks)
    def test_reference_passes_in_its_own_process(check):
        """Where no grader listens (a course test, an instructor's run), the checks of a ported
        unit run in the notebook's process: they must pass there too."""
        getattr(HiddenTests(u.hidden), check)(u.reference_ns())

    def test_hidden_checks_are_fast():
        start = time.perf_counter()
        for check in u.checks:
            u.run_check(check, u.reference_ns())
        assert time.perf_counter() - start < hidden_seconds

    @pytest.mark.parametrize("check", u.checks)
    def test_release_stubs_fail(check):
        with pytest.raises(GradingFailure, match="NotImplementedError"):
            u.run_check(check, u.release_ns())

    @pytest.mark.parametrize("check", u.checks)
    def test_missing_names_fail(check):
        with pytest.raises(GradingFailure, match="is not defined"):
            u.run_check(check, {})

    @pytest.mark.parametrize("check", u.checks)
    def test_lazy_stubs_fail(check):
        with pytest.raises(GradingFailure):
            u.run_check(check, lazy_ns())

    @pytest.mark.parametrize("mutant", sorted(mutants if hidden_only_mutants is None else hidden_only_mutants))
    def test_mutant_fails_its_hidden_checks_only(mutant):
        overrides, expected = mutants[mutant]
        checks = [c for c in u.affected_checks(overrides) if not (mutant in slow_mutants and c == slow_check)]
        failed = u.failing_checks(lambda: u.make_ns(overrides), checks)
        expected = expected - ({slow_check} if mutant in slow_mutants else set())
        assert failed == expected, f"{mutant}: failed {sorted(failed)}, expected {sorted(expected)}"

    @pytest.mark.parametrize("mutant", sorted(mutants))
    def test_mutant_costs_exactly_once(mutant):
        """Whole cells, as nbgrader grades them. A mistake fails its own cells only."""
        overrides, expected = mutants[mutant]
        checks = set(u.affected_checks(overrides))
        failed, messages = set(), {}
        if mutant in slow_mutants:
            checks.discard(slow_check)
            failed.add(slow_check)
        for check, visible in u.graded_cells:
            if check not in checks:
                continue
            try:
                cell_runner(u, check, visible, u.make_ns(u.notebook_helpers, overrides), mutant)
            except Exception as err:
                failed.add(check)
                messages[check] = f"{type(err).__name__}: {str(err)[:300]}"
        unsure = may_also_fail(overrides)
        failed -= unsure
        expected = (expected | cascades.get(mutant, set())) - unsure
        assert failed == expected, f"{mutant}: failed {sorted(failed)}, expected {sorted(expected)}; {messages}"

    def test_cells_use_only_their_parts_names():
        """What lets the mutant tests skip the cells of other parts."""
        for check, visible in u.graded_cells:
            used = {n for n in u.names if re.search(rf"\b{n}\b", visible)}
            assert used <= u.part_names[u.part_of(check)], (check, used)
        for check in u.checks:
            src = inspect.getsource(getattr(u.hidden, check))
            used = set(re.findall(r'student\(ns, "(\w+)"\)', src)) | set(re.findall(r"swapped\(ns, (\w+)=", src))
            assert used <= u.part_names[u.part_of(check)], (check, used)

    # --- the notebook is well-formed for nbgrader -------------------------------------------------

    def test_notebook_format():
        nb = u.nb
        nbformat_module().validate(nb)
        assert (nb.nbformat, nb.nbformat_minor) == (4, 5)
        assert nb.metadata.kernelspec == {"display_name": "Python 3 (ipykernel)", "language": "python",
                                          "name": "python3"}
        ids = [cell.get("id") for cell in nb.cells]
        assert all(ids) and len(set(ids)) == len(ids)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, cell.id
            meta = nbg(cell)
            assert meta and meta["schema_version"] == 3 and meta["task"] is False, cell.id
            assert set(meta) >= {"grade", "grade_id", "locked", "solution"}, cell.id

    def test_grade_ids_and_points():
        cells = u.nb.cells
        grade_ids = [nbg(c)["grade_id"] for c in cells]
        assert len(set(grade_ids)) == len(grade_ids)
        auto = {nbg(c)["grade_id"]: nbg(c)["points"] for c in cells if nbg(c)["grade"] and not nbg(c)["solution"]}
        manual = {nbg(c)["grade_id"]: nbg(c)["points"] for c in cells if nbg(c)["grade"] and nbg(c)["solution"]}
        assert notebooks.bonus_points(u.unit) == u.bonus
        assert all(auto[grade_id] == 0 for grade_id in u.bonus)
        assert sum(auto.values()) == u.auto_points and len(auto) == len(u.checks)
        assert sum(manual.values()) == u.manual_points and len(manual) == u.written_questions
        for c in cells:
            meta = nbg(c)
            if meta["grade"] and not meta["solution"]:
                assert c.cell_type == "code" and meta["locked"], meta["grade_id"]
                assert meta["grade_id"].startswith("bonus_" if meta["grade_id"] in u.bonus else "test_")
                bonus_tags = {t for t in c.metadata.get("tags", []) if t.startswith("bonus:")}
                assert bonus_tags == ({f"bonus:{u.bonus[meta['grade_id']]:g}"} if meta["grade_id"] in u.bonus
                                      else set()), meta["grade_id"]
            if meta["grade"] and meta["solution"]:
                assert c.cell_type == "markdown" and not meta["locked"] and meta["grade_id"].startswith("q_")
                assert "Answer key" in c.source and "Rubric" in c.source
            if not meta["grade"] and not meta["solution"]:
                assert meta["locked"], meta["grade_id"]

    def test_every_check_is_called_once_from_a_test_cell():
        called = []
        for c in u.visible_test_cells(u.nb):
            src = c.source
            assert src.count("### BEGIN HIDDEN TESTS") == 1 and src.rstrip().endswith("### END HIDDEN TESTS")
            hidden_part = src.split("### BEGIN HIDDEN TESTS")[1]
            calls = [line.strip() for line in hidden_part.splitlines() if "hidden_tests(" in line]
            assert len(calls) == 1 and calls[0].startswith(f'hidden_tests("{u.unit}").check_')
            called.append(calls[0].split(".")[1].split("(")[0])
        assert sorted(called) == u.checks

    def test_graded_names_are_top_level_in_solution_cells():
        defined = set()
        for c in u.nb.cells:
            meta = nbg(c)
            if c.cell_type == "code" and meta["solution"]:
                assert not meta["grade"]
                defined |= {node.name for node in ast.parse(c.source).body
                            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
                for word in solution_cell_words:
                    assert word not in c.source, (c.id, word)
        assert set(u.names) <= defined, set(u.names) - defined

    def test_solution_regions_wrap_every_method_separately():
        for c in u.nb.cells:
            if c.cell_type == "code" and nbg(c)["solution"]:
                lines = c.source.splitlines()
                begins = [i for i, ln in enumerate(lines) if ln.strip() == "### BEGIN SOLUTION"]
                ends = [i for i, ln in enumerate(lines) if ln.strip() == "### END SOLUTION"]
                assert len(begins) == len(ends) >= 1
                for b, e in zip(begins, ends, strict=True):
                    assert b < e
                    assert not any(ln.lstrip().startswith(("def ", "class ")) for ln in lines[b:e]), c.id

    def test_markers_only_where_nbgrader_expects_them():
        for c in u.nb.cells:
            meta = nbg(c)
            if not meta["solution"]:
                assert "BEGIN SOLUTION" not in c.source and "END SOLUTION" not in c.source, c.id
            if not (meta["grade"] and not meta["solution"]):
                assert "HIDDEN TESTS" not in c.source, c.id

    def test_imports_cells():
        """The Colab install cell comes first, then the locked ``export`` imports cell: imports, constants
        the reference needs, and names taken from an earlier unit's reference
        (``GPT = reference("05_transformers").GPT``), which the exported reference module carries.
        Later ``export`` cells are given code (unit 06's FusedGPT): locked, ungraded, without solution
        markers, so the release keeps them as they are and the reference carries them too."""
        code = [c for c in u.nb.cells if c.cell_type == "code"]
        assert "%pip install" in code[0].source and "export" not in code[0].metadata.get("tags", [])
        export = [c for c in code if "export" in c.metadata.get("tags", [])]
        assert export and export[0] is code[1] and all(nbg(c)["locked"] for c in export)
        for given in export[1:]:
            assert not nbg(given)["solution"] and not nbg(given)["grade"], given.id
            assert "BEGIN SOLUTION" not in given.source and "import " not in given.source, given.id
        for node in ast.parse(export[0].source).body:
            assert isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Assign) and (isinstance(node.value, ast.Constant)
                                                  or _from_earlier_reference(node.value, u.unit))), ast.dump(node)[:80]

    def test_reference_is_fresh():
        assert u.reference_path.read_text(encoding="utf-8") == notebooks.exported_reference(u.unit), \
            "run `make references`"

    # --- the visible tests pass on the reference and fail on the release stubs ---------------------

    def test_visible_tests_pass_on_the_reference():
        for cell in u.visible_test_cells(u.release_nb):
            assert "hidden_tests" not in cell.source  # nbgrader removed the hidden part
            exec(compile(cell.source, cell.id, "exec"), u.make_ns(u.notebook_helpers))

    def test_visible_tests_fail_on_the_release_stubs():
        for cell in u.visible_test_cells(u.release_nb):
            with pytest.raises(NotImplementedError):
                exec(compile(cell.source, cell.id, "exec"), {**u.notebook_helpers, **u.release_ns()})

    def test_release_replaces_written_answers():
        answers = [c for c in u.release_nb.cells if nbg(c)["grade"] and nbg(c)["solution"]]
        assert len(answers) == u.written_questions and all(c.source == "YOUR ANSWER HERE" for c in answers)

    def test_release_experiments_run_with_the_stubs():
        """The student release runs end to end: experiment cells print a note instead of failing."""
        ns = {**u.notebook_helpers, **u.release_ns()}
        for cell in u.release_nb.cells:
            meta = nbg(cell)
            if cell.cell_type != "code" or meta["grade"] or meta["solution"] or cell.id == "colab-install":
                continue
            exec(compile(cell.source, cell.id, "exec"), ns)

    tests = {name: value for name, value in locals().items() if name.startswith("test_")}
    if u.part_names is None:  # every check runs for every mutant: no parts to keep apart
        del tests["test_cells_use_only_their_parts_names"]
    return tests
