"""Autograde a folder of submissions and print the gradebook.

    python -m autograder.grade SUBMISSIONS [--assignment 01_ngrams] [--timeout 900]
    make autograde SUBMISSIONS=path/to/folder

SUBMISSIONS is a folder in nbgrader's layout, ``<student>/<assignment>/<notebook>.ipynb``, or the
zip an LMS exports (see ``autograder/intake.py``). Every submission is graded in a process of its
own with an overall time limit, so an infinite loop, a dead kernel or a corrupt notebook is
reported as such and never stops the others. Results: the table on stdout, the CSV at
``autograder/grades.csv``, per-student HTML feedback under ``autograder/feedback/``, and
nbgrader's gradebook (``autograder/gradebook.db``, where formgrader does the manual grading).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import checks, notebooks, sandbox
from .api import load_config, make_api

DEFAULT_TIMEOUT_S = 900
STATUS_GRADED = "graded"
STATUS_MANUAL = "needs manual grading"


@dataclass
class Outcome:
    """One submission's row in the gradebook. ``score`` is None when no grade exists (and the
    status says why): a failed grading run is never shown as a 0."""

    student: str
    assignment: str
    status: str
    score: float | None = None
    max_score: float | None = None
    auto_score: float | None = None
    auto_max: float | None = None
    bonus: float = 0.0
    seconds: float = 0.0
    feedback: str = ""
    notes: list[str] = field(default_factory=list)
    device: str = ""  # what its kernel was given to compute on: "cpu", "gpu 0"
    worker: str = ""  # host:pid of the process that graded it


# --- discovering submissions ------------------------------------------------------------------

def discover(folder: Path, only: str | None = None) -> list[tuple[str, str, Path]]:
    """``(student, assignment, notebook path)`` for every ``<student>/<assignment>/<assignment>.ipynb``.

    A student folder that lacks the notebook is still listed (with a missing path), so it is
    reported rather than skipped silently.
    """
    known = set(notebooks.units())
    found = []
    for student_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for assignment_dir in sorted(p for p in student_dir.iterdir() if p.is_dir()):
            assignment = assignment_dir.name
            if assignment not in known or (only and assignment != only):
                continue
            found.append((student_dir.name, assignment, assignment_dir / f"{assignment}.ipynb"))
    return found


def _copy_in(student: str, assignment: str, notebook: Path, submitted_root: Path) -> None:
    dest = submitted_root / student / assignment
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if notebook.is_file():
        shutil.copy2(notebook, dest / notebook.name)
        stamp = notebook.parent / "timestamp.txt"
        if stamp.is_file():
            shutil.copy2(stamp, dest / "timestamp.txt")


def precheck(notebook: Path) -> str | None:
    """Why a submitted file cannot be graded at all (missing, not JSON, not a notebook), or None."""
    import nbformat

    if not notebook.is_file():
        return f"missing notebook ({notebook.name} not submitted)"
    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception as err:  # nbformat raises several types for unreadable files
        return f"corrupt notebook ({type(err).__name__})"
    if not isinstance(nb.get("cells"), list):
        return "corrupt notebook (no cells)"
    return None


# --- grading one submission: a task that runs here, in a local worker or on a Dask worker ------

@dataclass
class Task:
    """All that grading one submission needs, by value, so it can run on any machine that has the
    course's checkout and environment: the notebook, and the released gradebook without anyone's
    grades (``template_db``, the bytes of a sqlite file)."""

    student: str
    assignment: str
    notebook: bytes
    timestamp: bytes | None
    template_db: bytes
    timeout_s: float = DEFAULT_TIMEOUT_S
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for its kernel; None keeps the worker's own
    threads: int | None = None  # CPU threads for its kernel and checks; None: torch's default


class Running:
    """One task graded in a forked process, in a private grading state (its own gradebook,
    submitted/, autograded/ and feedback/), so gradings that run side by side share no file and
    only the process that started them writes the course's gradebook."""

    def __init__(self, task: Task):
        import tempfile

        self.task = task
        self.state = Path(tempfile.mkdtemp(prefix="llmcourse-task-"))
        submitted = self.state / "submitted" / task.student / task.assignment
        submitted.mkdir(parents=True)
        (submitted / f"{task.assignment}.ipynb").write_bytes(task.notebook)
        if task.timestamp is not None:
            (submitted / "timestamp.txt").write_bytes(task.timestamp)
        (self.state / "gradebook.db").write_bytes(task.template_db)
        ctx = multiprocessing.get_context("fork")
        self.conn, send = ctx.Pipe(duplex=False)
        self.started = time.monotonic()
        self.deadline = self.started + task.timeout_s
        self.proc = ctx.Process(target=_grade_in_child, args=(task, self.state, send), daemon=False)
        self.proc.start()
        send.close()

    def finish(self) -> dict:
        """Wait (until the deadline at most), then ``{"report", "seconds", "log", "device",
        "worker"}``; a child still running past its deadline is killed with its kernel."""
        report = None
        if self.conn.poll(max(0.0, self.deadline - time.monotonic())):
            try:
                report = self.conn.recv()
            except EOFError:
                report = None
        if report is None:
            if self.proc.is_alive():
                _kill_tree(self.proc.pid)
                report = {"success": False, "timed_out": True,
                          "error": f"overall time limit of {self.task.timeout_s:.0f} s exceeded"}
            else:
                report = {"success": False, "error": f"grading process died (exit code {self.proc.exitcode})"}
        self.proc.join(10)
        if self.proc.is_alive():
            _kill_tree(self.proc.pid)
        self.conn.close()
        log = self.state / "grading.log"
        result = {"report": report, "seconds": time.monotonic() - self.started,
                  "log": _tail(log, LOG_BYTES) if log.is_file() else "",
                  "device": device_label(self.task.gpu), "worker": f"{platform.node()}:{os.getpid()}"}
        shutil.rmtree(self.state, ignore_errors=True)
        return result


LOG_BYTES = 1 << 20  # the end of a grading log that comes back to the gradebook's machine


def run_task(task: Task) -> dict:
    """Grade one task, start to end, in this process's care: what a Dask worker runs."""
    _prepare_worker([task.assignment])
    return Running(task).finish()


def _prepare_worker(units) -> None:
    """Once per worker process: the data fetched, and the hidden checks and nbgrader imported, so
    each fork starts with them (torch and the references included)."""
    if not _PREPARED:
        os.environ.setdefault("LLMCOURSE_AUTOGRADER_ROOT", str(notebooks.ROOT))
        _prefetch_data()
        import nbgrader.apps  # noqa: F401  about 1 s an import
    for unit in set(units) - _PREPARED:
        checks.runs_outside_the_kernel(unit)
        _prepare_trained_models(unit)
        _PREPARED.add(unit)
    _PREPARED.add("")


def _prepare_trained_models(unit: str) -> None:
    """Train and cache, here, the char GPTs ``unit``'s notebook loads (``llmcourse.training.char_gpt``):
    a sandboxed kernel reads the cache read-only, and would otherwise train them in every submission."""
    import re

    text = "\n".join(notebooks.source(c) for c in notebooks.load(notebooks.solution_notebook(unit))["cells"])
    # While grading, pick(full, fast) is the fast choice: the second name of a pick(...), else a literal.
    names = {fast or literal for fast, literal in
             re.findall(r'char_gpt\(\s*(?:pick\(\s*"\w+"\s*,\s*"(\w+)"\s*\)|"(\w+)")', text)}
    if not names:
        return
    from llmcourse.grading import reference
    from llmcourse.training import char_gpt

    for name in sorted(names):
        try:
            char_gpt(name, reference("06_training"))
        except Exception as err:  # the kernels will train it themselves, slowly, and say why
            print(f"note: could not prepare the char GPT {name!r} ({type(err).__name__}: {err})", file=sys.stderr)


_PREPARED: set[str] = set()


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode(errors="replace")


def visible_gpus() -> list[str]:
    """The GPUs this machine lets the grader use: ``CUDA_VISIBLE_DEVICES`` when it is set, else
    each ``/dev/nvidia<N>``. Read without CUDA, which must not start before the grader forks."""
    import re

    devices = sorted((m.group(1) for p in Path("/dev").glob("nvidia*")
                      if (m := re.fullmatch(r"nvidia(\d+)", p.name))), key=int)
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices and listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    return devices


def device_label(gpu: str | None) -> str:
    """What a task's kernel was given to compute on: "cpu", or "gpu 1" (the machine's numbering)."""
    gpus = [gpu] if gpu is not None else visible_gpus()
    return f"gpu {','.join(gpus)}" if gpus and gpus != [""] else "cpu"


def _grade_in_child(task: Task, state: Path, conn) -> None:
    """Runs in a forked child: autograde in a sandboxed kernel while this process runs the hidden
    checks (``autograder.checks``), keep only the points the checks confirm, apply bonus points,
    write feedback; send the report, the grades and the files to keep via ``conn``.

    Everything the child and its kernel print goes to the state's ``grading.log``, so the TA's
    console shows one line per submission.
    """
    os.environ["LLMCOURSE_GRADING_DIR"] = str(state)
    if task.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = task.gpu
    if task.threads is not None:  # workers side by side share the cores instead of fighting for them
        import torch

        torch.set_num_threads(task.threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(task.threads)
    assignment, student = task.assignment, task.student
    bonus = notebooks.bonus_points(assignment)
    log_fd = os.open(state / "grading.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    spec = None
    try:
        spec, service = _prepare_sandbox(assignment, student, task.timeout_s)
        api = make_api()
        result = api.autograde(assignment, student, force=True, create=True)
        verdicts = service.stop() if service is not None else None
        report = {"success": bool(result["success"]), "error": result.get("error") or "",
                  "log": result.get("log") or "", "sandboxed": spec.sandboxed,
                  "checks_outside": verdicts is not None}
        report.update(_limits_hit(spec))
        if result["success"]:
            if verdicts is not None:
                from nbgrader.api import Gradebook

                with Gradebook(api.coursedir.db_url, api.coursedir.course_id) as gb:
                    report["overruled"] = checks.apply_verdicts(gb, assignment, student, verdicts)
                report["check_seconds"] = sum(v.seconds for v in verdicts.values())
                for name, v in sorted(verdicts.items()):  # where the time went, in the submission's log
                    print(f"[grader] {name}: {'passed' if v.passed else 'failed'} in {v.seconds:.2f} s, "
                          f"{v.calls} calls into the kernel", file=sys.stderr)
                report["check_calls"] = sum(v.calls for v in verdicts.values())
            report["bonus"] = _apply_bonus(api, assignment, student, bonus, verdicts)
            fb = api.generate_feedback(assignment, student, force=True)
            report["feedback_ok"] = bool(fb["success"])
            if not fb["success"]:
                report["error"] = fb.get("error") or fb.get("log") or ""
            report["grades"] = export_grades(api.coursedir.db_url, assignment, student)
            report["files"] = _files_to_keep(state, assignment, student)
        print(report["log"], report["error"], sep="\n")
        conn.send(report)
    except BaseException as err:  # report anything; the parent decides the status
        conn.send({"success": False, "error": f"{type(err).__name__}: {err}", "log": ""})
    finally:
        conn.close()
        if spec is not None:
            if spec.cgroups is not None:
                spec.cgroups.remove()
            shutil.rmtree(spec.rundir, ignore_errors=True)


def _files_to_keep(state: Path, assignment: str, student: str) -> dict[str, bytes]:
    """The graded notebook and the feedback, by path under the grading state. Nothing else the
    kernel wrote in its folder comes back."""
    kept = {}
    for folder, pattern in (("autograded", "*.ipynb"), ("autograded", "timestamp.txt"), ("feedback", "*")):
        base = state / folder / student / assignment
        for path in sorted(base.glob(pattern)) if base.is_dir() else []:
            if path.is_file() and not path.is_symlink():
                kept[str(path.relative_to(state))] = path.read_bytes()
    return kept


# --- the course's gradebook: one writer ------------------------------------------------------

def template_gradebook(db_url: str) -> bytes:
    """The gradebook as released, without students or grades: what each task starts from."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "template.db"
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as source, sqlite3.connect(copy) as dest:
            source.backup(dest)
            for table in ("grade", "comment", "submitted_notebook", "submitted_assignment", "student"):
                dest.execute(f"DELETE FROM {table}")
            dest.commit()
            dest.execute("VACUUM")
        return copy.read_bytes()


def export_grades(db_url: str, assignment: str, student: str) -> dict:
    """One submission's rows of a gradebook, by cell name: ``{"timestamp", "notebooks": {name:
    {"late_penalty", "grades": {cell: [auto, extra credit, needs manual grade]}, "comments":
    {cell: auto comment}}}}``."""
    from nbgrader.api import Gradebook

    with Gradebook(db_url, load_config().CourseDirectory.course_id) as gb:
        sub = gb.find_submission(assignment, student)
        return {"timestamp": sub.timestamp, "notebooks": {
            nb.name: {"late_penalty": nb.late_submission_penalty,
                      "grades": {g.name: [g.auto_score, g.extra_credit, g.needs_manual_grade] for g in nb.grades},
                      "comments": {c.name: c.auto_comment for c in nb.comments}}
            for nb in sub.notebooks}}


def merge_grades(db_url: str, assignment: str, student: str, grades: dict) -> None:
    """Write one submission's exported rows into the course's gradebook. A TA's manual score
    stays, and then the cell is marked for review, as nbgrader's own autograde does."""
    import warnings

    from nbgrader.api import Gradebook
    from sqlalchemy.exc import SAWarning

    with Gradebook(db_url, load_config().CourseDirectory.course_id) as gb, warnings.catch_warnings():
        # nbgrader's add_submission trips an autoflush warning; its own autograde does the same.
        warnings.simplefilter("ignore", SAWarning)
        gb.update_or_create_student(student)
        gb.update_or_create_submission(assignment, student, timestamp=grades["timestamp"])
        for nb_name, nb in grades["notebooks"].items():
            for cell, (auto, extra, needs_manual) in nb["grades"].items():
                row = gb.find_grade(cell, nb_name, assignment, student)
                row.auto_score, row.extra_credit = auto, extra
                row.needs_manual_grade = bool(needs_manual or row.manual_score is not None)
            for cell, text in nb["comments"].items():
                gb.find_comment(cell, nb_name, assignment, student).auto_comment = text
            gb.find_submission_notebook(nb_name, assignment, student).late_submission_penalty = nb["late_penalty"]
        gb.db.commit()


def _put_files(files: dict[str, bytes], state: Path, assignment: str, student: str) -> None:
    for folder in ("autograded", "feedback"):
        shutil.rmtree(state / folder / student / assignment, ignore_errors=True)
    for relative, data in files.items():
        parts = Path(relative).parts
        if len(parts) != 4 or parts[0] not in ("autograded", "feedback") or parts[1:3] != (student, assignment):
            raise ValueError(f"refusing to write {relative!r} for {student}/{assignment}")
        dest = state.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def _prepare_sandbox(assignment: str, student: str, timeout_s: float):
    """The sandbox of one submission, and the service that runs its hidden checks here (None for a
    unit whose checks still run in the kernel)."""
    import tempfile

    from llmcourse.data import cache_dir
    from llmcourse.wire import SOCKET_ENV

    rundir = Path(tempfile.mkdtemp(prefix="llmcourse-run-"))
    spec = sandbox.Spec(rundir=rundir)
    spec.sandboxed = sandbox.unavailable_reason() is None
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{student}-{assignment}")
    spec.cgroups = sandbox.Cgroups.make(f"{safe}-{os.getpid()}", spec.limits)
    spec.read_only += [p for p in (Path(os.environ.get("LLMCOURSE_DATA_DIR", "/nonexistent")), cache_dir())
                       if p.is_dir()]
    # The kernel's HOME is its working folder: without this it would look for the cache (data,
    # trained models such as unit 07's char GPTs) there, find none, and train them again.
    spec.env["LLMCOURSE_CACHE_DIR"] = str(cache_dir().resolve())
    service = None
    if checks.runs_outside_the_kernel(assignment):
        service = checks.CheckService(assignment, rundir / "checks.sock", timeout_s).start()
        os.environ[SOCKET_ENV] = str(service.socket_path)
        # Nothing in the kernel may find the hidden tests or this unit's reference.
        spec.unset_env += ["LLMCOURSE_AUTOGRADER_ROOT", "LLMCOURSE_GRADING_DIR"]
        spec.placed += [(notebooks.reference_path(earlier), f"references/unit{earlier}.py")
                        for earlier in notebooks.shipped_references(assignment)]
    else:  # not yet ported: the kernel imports its hidden tests (read-only)
        os.environ.pop(SOCKET_ENV, None)
        spec.read_only += [notebooks.ROOT / "autograder" / "__init__.py",
                           notebooks.ROOT / "autograder" / "hidden", notebooks.REFERENCES]
    sandbox.activate(spec)
    return spec, service


def _limits_hit(spec) -> dict:
    if spec is None or spec.cgroups is None:
        return {}
    return {"memory_limit": spec.limits.memory_label() if spec.cgroups.memory_limit_hit() else "",
            "process_limit": spec.limits.processes if spec.cgroups.process_limit_hit() else 0}


def _apply_bonus(api, assignment: str, student: str, bonus: dict, verdicts=None) -> float:
    """Turn passed bonus test cells (worth 0 regular points) into nbgrader extra credit; where the
    checks ran in the grader, a bonus cell counts only if its check passed there."""
    if not bonus:
        return 0.0
    from nbgrader.api import Gradebook

    autograded = Path(api.coursedir.format_path(api.coursedir.autograded_directory, student,
                                                 assignment)) / f"{assignment}.ipynb"
    cells = notebooks.load(autograded)["cells"]
    passed = {
        notebooks.nbgrader_meta(c).get("grade_id")
        for c in cells
        if notebooks.nbgrader_meta(c).get("grade_id") in bonus
        and c.get("outputs") is not None
        and not any(o.get("output_type") == "error" for o in c.get("outputs", []))
    }
    if verdicts is not None:
        by_cell = checks.checks_by_cell(assignment)
        passed = {g for g in passed if g in by_cell and by_cell[g] in verdicts and verdicts[by_cell[g]].passed}
    total = 0.0
    with Gradebook(api.coursedir.db_url, api.coursedir.course_id) as gb:
        for grade_id, points in bonus.items():
            grade = gb.find_grade(grade_id, assignment, assignment, student)
            grade.extra_credit = points if grade_id in passed else 0.0
            total += grade.extra_credit
        gb.db.commit()
    return total


def _kill_tree(pid: int) -> None:
    """Kill a process and every descendant (the grading kernel included)."""
    try:
        import psutil

        parent = psutil.Process(pid)
        for child in parent.children(recursive=True):
            child.kill()
        parent.kill()
    except Exception:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


UNSANDBOXED = "UNSANDBOXED: graded without bubblewrap"


def _report_notes(report: dict) -> list[str]:
    notes = []
    if report.get("overruled"):
        n = report["overruled"]
        notes.append(f"{n} test cell{'s' if n > 1 else ''} passed in the notebook but not in the grader's "
                     f"own comparison (scored 0)")
    if report.get("process_limit"):
        notes.append(f"hit the process limit ({report['process_limit']})")
    if report.get("memory_limit"):
        notes.append(f"hit the memory limit ({report['memory_limit']})")
    return notes


def failure_status(report: dict) -> str:
    """A short, honest status for a submission that could not be graded."""
    if report.get("timed_out"):
        return f"timed out ({report['error']})"
    if report.get("memory_limit"):
        return f"memory limit {report['memory_limit']}"
    if report.get("process_limit"):
        return f"process limit {report['process_limit']}"
    text = f"{report.get('error', '')}\n{report.get('log', '')}"
    if "DeadKernelError" in text or "Kernel died" in text or "kernel died" in text:
        return "kernel died"
    if "NotJSONError" in text or "JSONDecodeError" in text or "Unreadable" in text:
        return "corrupt notebook"
    last = [ln for ln in report.get("error", "").strip().splitlines() if ln.strip()]
    return "grading error" + (f": {last[-1][:120]}" if last else "")


# --- reading results back ---------------------------------------------------------------------

def read_scores(outcome: Outcome, db: str) -> None:
    """Fill score fields and the manual-grading status from nbgrader's gradebook."""
    from nbgrader.api import Gradebook

    with Gradebook(db, load_config().CourseDirectory.course_id) as gb:
        sub = gb.find_submission(outcome.assignment, outcome.student)
        outcome.score = float(sub.score)
        outcome.max_score = float(sub.max_score)
        # nbgrader's code score includes extra credit; the table shows the bonus on its own.
        outcome.auto_score = float(sub.code_score) - outcome.bonus
        outcome.auto_max = float(sub.max_code_score)
        pending = sum(1 for nb in sub.notebooks for g in nb.grades if g.needs_manual_grade)
        if pending:
            outcome.status = f"{STATUS_MANUAL} ({pending} answer{'s' if pending > 1 else ''})"
        failed_cells = _timed_out_cells(outcome)
        if failed_cells:
            outcome.notes.append(f"{failed_cells} cell(s) hit the per-cell time limit")


def _timed_out_cells(outcome: Outcome) -> int:
    autograded = Path(load_config().CourseDirectory.autograded_directory)
    path = autograded / outcome.student / outcome.assignment / f"{outcome.assignment}.ipynb"
    if not path.is_file():
        return 0
    return sum(1 for c in notebooks.load(path)["cells"] for o in c.get("outputs", [])
               if o.get("output_type") == "error" and o.get("ename") == "CellTimeoutError")


# --- the whole run ----------------------------------------------------------------------------

def grading_state() -> Path:
    """The folder that holds submitted/, autograded/, feedback/, the gradebook and grades.csv."""
    return Path(load_config().CourseDirectory.submitted_directory).parent


def autograde_folder(folder: Path, only: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     csv_path: Path | None = None, out=sys.stdout,
                     skip: set[str] = frozenset(), force: bool = False,
                     workers: int = 1, scheduler: str | None = None) -> list[Outcome]:
    """Grade every submission under ``folder`` (but the students in ``skip``); write the CSV and
    feedback; return the rows, in the folder's order.

    ``workers`` submissions are graded side by side on this machine, each GPU (if any) given to
    one worker at a time; with ``scheduler`` ("local", or a Dask scheduler's address) they are
    graded by a Dask cluster instead. Either way this process alone writes the gradebook.

    A submission graded before whose notebook, and the unit's solution and hidden checks, have not
    changed keeps its row without a second run (``force`` grades it again); so grading a folder twice
    gives the same gradebook and CSV, and a run that was killed resumes where it stopped.
    """
    from .release import register

    cfg = load_config()
    state = grading_state()
    submitted_root = Path(cfg.CourseDirectory.submitted_directory)
    feedback_root = Path(cfg.CourseDirectory.feedback_directory)
    csv_path = csv_path or state / "grades.csv"
    submissions = [s for s in discover(folder, only) if s[0] not in skip]
    if not submissions:
        raise SystemExit(f"No submissions found under {folder} in the layout "
                         f"<student>/<assignment>/<assignment>.ipynb (assignments: {notebooks.units()})")

    reason = sandbox.unavailable_reason()
    if reason:
        print(sandbox.WARNING.format(reason=reason), file=out)
    # The gradebook must know every assignment before grading (a fresh clone has no gradebook).
    for assignment in sorted({a for _, a, _ in submissions}):
        _in_child(register, assignment, state / "released")
    _prepare_worker({a for _, a, _ in submissions})
    template = template_gradebook(cfg.CourseDirectory.db_url)
    from tqdm.auto import tqdm

    done = _Manifest(state, cfg.CourseDirectory.db_url)
    outcomes: dict[tuple[str, str], Outcome] = {}
    tasks = []
    for student, assignment, nb_path in submissions:
        fingerprint = _fingerprint(assignment, nb_path)
        kept = None if force else done.get(student, assignment, fingerprint)
        if kept is not None:  # graded before, unchanged: the same row, no second run
            print(f"unchanged since it was graded: {student}/{assignment}, {kept.status}", file=out)
            outcomes[student, assignment] = kept
            continue
        _copy_in(student, assignment, nb_path, submitted_root)
        problem = precheck(nb_path)
        if problem:
            outcomes[student, assignment] = Outcome(student, assignment, status=problem)
            print(f"grading {student}/{assignment} ... {problem}", file=out)
            done.put(outcomes[student, assignment], fingerprint)
            continue
        stamp = nb_path.parent / "timestamp.txt"
        tasks.append((Task(student, assignment, nb_path.read_bytes(),
                           stamp.read_bytes() if stamp.is_file() else None, template, timeout_s), fingerprint))

    bar = tqdm(total=len(tasks), desc="grading", unit="submission", file=sys.stderr,
               disable=not sys.stderr.isatty() or out is not sys.stdout)
    fingerprints = {(t.student, t.assignment): f for t, f in tasks}
    if scheduler:
        from .cluster import dask_results

        results = dask_results([t for t, _ in tasks], scheduler, workers)
    else:
        results = local_results([t for t, _ in tasks], workers)
    for task, result in results:
        outcome = _store(task, result, cfg, state, feedback_root)
        print(f"grading {task.student}/{task.assignment} ... {outcome.status} ({outcome.seconds:.1f} s)",
              file=out, flush=True)
        outcomes[task.student, task.assignment] = outcome
        done.put(outcome, fingerprints[task.student, task.assignment])  # a killed run resumes here
        bar.set_postfix_str(f"{task.student}/{task.assignment}")
        bar.update()
    bar.close()

    rows = [outcomes[s, a] for s, a, _ in submissions]
    write_csv(rows, csv_path)
    print_table(rows, out)
    timed = [o.seconds for o in rows if o.seconds]
    if timed:
        print(f"\n{len(rows)} submissions; grading took {sum(timed):.0f} s "
              f"({sum(timed) / len(timed):.1f} s per graded submission)", file=out)
    print(f"CSV:      {csv_path}", file=out)
    print(f"Logs:     {state / 'logs'}/<student>-<assignment>.log", file=out)
    print(f"Feedback: {feedback_root}/<student>/<assignment>/<assignment>.html", file=out)
    print(f"Manual grading: cd autograder && ../.venv/bin/jupyter lab  (Nbgrader > Formgrader), "
          f"or nbgrader's formgrader on {cfg.CourseDirectory.db_url}", file=out)
    return rows


def local_results(tasks: list[Task], workers: int = 1):
    """Grade ``tasks`` here, ``workers`` at a time; yield ``(task, result)`` as each finishes. With
    GPUs, each worker slot has one (round robin), set as its kernels' ``CUDA_VISIBLE_DEVICES``."""
    from multiprocessing.connection import wait

    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    queue = list(reversed(tasks))
    free = list(reversed(range(max(1, workers))))
    running: dict = {}
    while queue or running:
        while queue and free:
            slot = free.pop()
            task = replace(queue.pop(), threads=threads)
            if gpus:
                task = replace(task, gpu=gpus[slot % len(gpus)])
            job = Running(task)
            running[job.conn] = (job, slot)
        next_deadline = min(job.deadline for job, _ in running.values())
        ready = wait(list(running), timeout=max(0.0, next_deadline - time.monotonic()))
        overdue = [c for c, (job, _) in running.items() if job.deadline <= time.monotonic()]
        for conn in dict.fromkeys([*ready, *overdue]):
            job, slot = running.pop(conn)
            free.append(slot)
            yield job.task, job.finish()


def _store(task: Task, result: dict, cfg, state: Path, feedback_root: Path) -> Outcome:
    """A finished task's row; its grades and files go into the course's gradebook and folders."""
    student, assignment = task.student, task.assignment
    report, seconds = result["report"], result["seconds"]
    log_path = state / "logs" / f"{student}-{assignment}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(result.get("log", ""))
    outcome = None
    if report["success"]:
        try:
            merge_grades(cfg.CourseDirectory.db_url, assignment, student, report["grades"])
            _put_files(report.get("files", {}), state, assignment, student)
        except Exception as err:  # a result that does not fit the gradebook is reported, not kept
            report = {"success": False, "error": f"could not record the grades ({type(err).__name__}: {err})"}
        else:
            outcome = Outcome(student, assignment, status=STATUS_GRADED, seconds=seconds,
                              bonus=report.get("bonus", 0.0))
            read_scores(outcome, cfg.CourseDirectory.db_url)
            outcome.notes += _report_notes(report)
            feedback = feedback_root / student / assignment / f"{assignment}.html"
            outcome.feedback = str(feedback) if feedback.is_file() else ""
    if outcome is None:
        outcome = Outcome(student, assignment, status=failure_status(report), seconds=seconds)
    if report.get("sandboxed") is False:
        outcome.notes.append(UNSANDBOXED)
    outcome.device, outcome.worker = result.get("device", ""), result.get("worker", "")
    return outcome


def _fingerprint(assignment: str, notebook: Path) -> str:
    """What a grade depends on: the submitted file, the unit's solution notebook and hidden checks."""
    import hashlib

    digest = hashlib.sha256()
    for path in (notebook, notebooks.solution_notebook(assignment),
                 notebooks.ROOT / "autograder" / "hidden" / f"unit{assignment}.py"):
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


class _Manifest:
    """``graded.json`` beside the gradebook: each graded submission's fingerprint and row. It is
    trusted only while the gradebook it was written with is still there."""

    def __init__(self, state: Path, db_url: str):
        self.path = state / "graded.json"
        db = Path(db_url.removeprefix("sqlite:///"))
        self.entries = {}
        if self.path.is_file() and db.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except ValueError:
                self.entries = {}

    def get(self, student: str, assignment: str, fingerprint: str) -> Outcome | None:
        entry = self.entries.get(f"{student}/{assignment}")
        if not entry or entry.get("fingerprint") != fingerprint:
            return None
        try:
            return Outcome(**entry["outcome"])
        except TypeError:
            return None

    def put(self, outcome: Outcome, fingerprint: str) -> None:
        self.entries[f"{outcome.student}/{outcome.assignment}"] = {"fingerprint": fingerprint,
                                                                   "outcome": asdict(outcome)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        tmp.replace(self.path)


def _prefetch_data() -> None:
    """Fetch the course's corpora here, before grading: a sandboxed kernel has no network, and
    reads the data mirror or cache read-only."""
    from llmcourse.data import DATASETS, data_path

    for name in DATASETS:
        try:
            data_path(name)
        except Exception as err:  # offline and no mirror: the notebooks that need it will say so
            print(f"note: could not fetch {name} before grading ({type(err).__name__}: {err})", file=sys.stderr)


def _in_child(fn, *args) -> None:
    """Run an nbgrader step in a forked child so the parent never holds a database connection
    across the forks that grade each submission."""
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=fn, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{fn.__name__}{args} failed (exit code {proc.exitcode})")


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def print_table(outcomes: list[Outcome], out=sys.stdout) -> None:
    headers = ["student", "assignment", "score", "max score", "autograded", "bonus", "status", "time"]
    rows = [[o.student, o.assignment, _fmt(o.score), _fmt(o.max_score),
             "—" if o.auto_score is None else f"{o.auto_score:g}/{o.auto_max:g}",
             f"+{o.bonus:g}" if o.bonus else "", o.status + ("; " + "; ".join(o.notes) if o.notes else ""),
             f"{o.seconds:.1f}s" if o.seconds else ""] for o in outcomes]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print("\n" + line + "\n" + "-" * len(line), file=out)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)), file=out)


def write_csv(outcomes: list[Outcome], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["student", "assignment", "score", "max_score", "auto_score", "auto_max", "bonus",
              "status", "notes", "seconds", "feedback", "device", "worker"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for o in outcomes:
            row = asdict(o)
            row["notes"] = "; ".join(o.notes)
            row["seconds"] = f"{o.seconds:.1f}"
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in fields})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", type=Path, help="folder in nbgrader layout, or an LMS zip")
    parser.add_argument("--assignment", help="grade only this assignment (e.g. 01_ngrams)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"overall seconds per submission (default {DEFAULT_TIMEOUT_S})")
    parser.add_argument("--csv", type=Path, help="where to write the CSV (default: autograder/grades.csv)")
    parser.add_argument("--force", action="store_true",
                        help="grade again the submissions that are unchanged since they were graded")
    parser.add_argument("--workers", type=int, default=1,
                        help="submissions graded side by side on this machine (default 1); with "
                             "--scheduler local, the number of Dask workers")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help='grade on a Dask cluster: "local" starts one on this machine, or give a '
                             "running scheduler's address (tcp://host:8786)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    # The hidden tests are found through this variable inside each grading kernel.
    os.environ["LLMCOURSE_AUTOGRADER_ROOT"] = str(notebooks.ROOT)
    folder = args.submissions
    if folder.suffix == ".zip":
        from .intake import unpack_lms_zip

        folder = unpack_lms_zip(folder, args.assignment)
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder")
    outcomes = autograde_folder(folder.resolve(), args.assignment, args.timeout, args.csv, force=args.force,
                                workers=args.workers, scheduler=args.scheduler)
    return 0 if outcomes else 1


if __name__ == "__main__":
    sys.exit(main())
