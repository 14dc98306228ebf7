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
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import notebooks
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


# --- grading one submission in its own process ------------------------------------------------

def _grade_in_child(assignment: str, student: str, bonus: dict, log_path: Path, conn) -> None:
    """Runs in a forked child: autograde, apply bonus points, write feedback; report via ``conn``.

    Everything the child and its kernel print goes to ``log_path``, so the TA's console shows one
    line per submission.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    try:
        api = make_api()
        result = api.autograde(assignment, student, force=True, create=True)
        report = {"success": bool(result["success"]), "error": result.get("error") or "",
                  "log": result.get("log") or ""}
        if result["success"]:
            report["bonus"] = _apply_bonus(api, assignment, student, bonus)
            fb = api.generate_feedback(assignment, student, force=True)
            report["feedback_ok"] = bool(fb["success"])
            if not fb["success"]:
                report["error"] = fb.get("error") or fb.get("log") or ""
        print(report["log"], report["error"], sep="\n")
        conn.send(report)
    except BaseException as err:  # report anything; the parent decides the status
        conn.send({"success": False, "error": f"{type(err).__name__}: {err}", "log": ""})
    finally:
        conn.close()


def _apply_bonus(api, assignment: str, student: str, bonus: dict) -> float:
    """Turn passed bonus test cells (worth 0 regular points) into nbgrader extra credit."""
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


def grade_one(assignment: str, student: str, timeout_s: float, bonus: dict,
              log_path: Path) -> tuple[dict, float]:
    """Grade one submission in a forked process; returns its report and the seconds it took."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    start = time.monotonic()
    proc = ctx.Process(target=_grade_in_child, args=(assignment, student, bonus, log_path, send), daemon=False)
    proc.start()
    send.close()
    report = None
    if receive.poll(timeout_s):
        try:
            report = receive.recv()
        except EOFError:
            report = None
    if report is None:
        if proc.is_alive():
            _kill_tree(proc.pid)
            report = {"success": False, "timed_out": True,
                      "error": f"overall time limit of {timeout_s:.0f} s exceeded"}
        else:
            report = {"success": False, "error": f"grading process died (exit code {proc.exitcode})"}
    proc.join(10)
    if proc.is_alive():
        _kill_tree(proc.pid)
    return report, time.monotonic() - start


def failure_status(report: dict) -> str:
    """A short, honest status for a submission that could not be graded."""
    if report.get("timed_out"):
        return f"timed out ({report['error']})"
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
                     skip: set[str] = frozenset()) -> list[Outcome]:
    """Grade every submission under ``folder`` (but the students in ``skip``); write the CSV and
    feedback; return the rows."""
    from .release import release

    cfg = load_config()
    submitted_root = Path(cfg.CourseDirectory.submitted_directory)
    feedback_root = Path(cfg.CourseDirectory.feedback_directory)
    csv_path = csv_path or grading_state() / "grades.csv"
    submissions = [s for s in discover(folder, only) if s[0] not in skip]
    if not submissions:
        raise SystemExit(f"No submissions found under {folder} in the layout "
                         f"<student>/<assignment>/<assignment>.ipynb (assignments: {notebooks.units()})")

    # The gradebook must know every assignment before grading (a fresh clone has no gradebook).
    for assignment in sorted({a for _, a, _ in submissions}):
        _in_child(release, assignment)

    outcomes = []
    for student, assignment, nb_path in submissions:
        _copy_in(student, assignment, nb_path, submitted_root)
        problem = precheck(nb_path)
        print(f"grading {student}/{assignment} ...", end=" ", flush=True, file=out)
        if problem:
            outcome = Outcome(student, assignment, status=problem)
        else:
            log_path = grading_state() / "logs" / f"{student}-{assignment}.log"
            report, seconds = grade_one(assignment, student, timeout_s,
                                        notebooks.bonus_points(assignment), log_path)
            if report["success"]:
                outcome = Outcome(student, assignment, status=STATUS_GRADED, seconds=seconds,
                                  bonus=report.get("bonus", 0.0))
                read_scores(outcome, cfg.CourseDirectory.db_url)
                feedback = feedback_root / student / assignment / f"{assignment}.html"
                outcome.feedback = str(feedback) if feedback.is_file() else ""
            else:
                outcome = Outcome(student, assignment, status=failure_status(report), seconds=seconds)
        print(f"{outcome.status} ({outcome.seconds:.1f} s)", file=out)
        outcomes.append(outcome)

    write_csv(outcomes, csv_path)
    print_table(outcomes, out)
    timed = [o.seconds for o in outcomes if o.seconds]
    if timed:
        print(f"\n{len(outcomes)} submissions; grading took {sum(timed):.0f} s "
              f"({sum(timed) / len(timed):.1f} s per graded submission)", file=out)
    print(f"CSV:      {csv_path}", file=out)
    print(f"Logs:     {grading_state() / 'logs'}/<student>-<assignment>.log", file=out)
    print(f"Feedback: {feedback_root}/<student>/<assignment>/<assignment>.html", file=out)
    print(f"Manual grading: cd autograder && ../.venv/bin/jupyter lab  (Nbgrader > Formgrader), "
          f"or nbgrader's formgrader on {cfg.CourseDirectory.db_url}", file=out)
    return outcomes


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
              "status", "notes", "seconds", "feedback"]
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
    args = parser.parse_args(argv)

    # The hidden tests are found through this variable inside each grading kernel.
    os.environ["LLMCOURSE_AUTOGRADER_ROOT"] = str(notebooks.ROOT)
    folder = args.submissions
    if folder.suffix == ".zip":
        from .intake import unpack_lms_zip

        folder = unpack_lms_zip(folder, args.assignment)
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder")
    outcomes = autograde_folder(folder.resolve(), args.assignment, args.timeout, args.csv)
    return 0 if outcomes else 1


if __name__ == "__main__":
    sys.exit(main())
