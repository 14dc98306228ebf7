"""The grader's side of the hidden checks: they run here, in the grading process, never in the
student's kernel.

While nbgrader executes a submission, ``CheckService`` listens on a Unix socket in the
submission's run folder. A test cell's hidden line, ``hidden_tests("01_ngrams").check_x(globals())``,
makes the kernel connect and ask for ``check_x``; the service runs that check here, against the
notebook's names reached over ``llmcourse.wire``, and records the verdict. Each check runs once per
grading run: a kernel that asks again gets the first verdict, so it cannot probe the checks.

Then ``apply_verdicts`` decides the points: an autograded cell keeps nbgrader's points only if
its hidden check passed *here*. A cell that "passed" in the kernel because the student's code
tampered with it (an input transformer that rewrote the cell, a patched ``torch.allclose``) earns
nothing, and the gradebook row says how many cells that was.
"""

from __future__ import annotations

import importlib
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmcourse.grading import GradingFailure, HiddenTests
from llmcourse.wire import Peer, RemoteNamespace, WireError, recv_message, send_message

from . import notebooks

_CALL = re.compile(r"""hidden_tests\(\s*["'](\d\d_\w+)["']\s*\)\s*\.\s*(check_\w+)\s*\(""")


def hidden_module(unit: str):
    return importlib.import_module(f"autograder.hidden.unit{unit}")


def runs_outside_the_kernel(unit: str) -> bool:
    """Whether ``unit``'s hidden checks run in the grader (ported to the wire) or still in the kernel."""
    return bool(getattr(hidden_module(unit), "RUNS_OUTSIDE_THE_KERNEL", False))


def checks_by_cell(unit: str) -> dict[str, str]:
    """``{grade_id: check name}`` for every autograded cell, read from the trusted source notebook."""
    found = {}
    for cell in notebooks.load(notebooks.solution_notebook(unit))["cells"]:
        meta = notebooks.nbgrader_meta(cell)
        if meta.get("grade") and not meta.get("solution") and cell["cell_type"] == "code":
            match = _CALL.search(notebooks.source(cell))
            if match and match.group(1) == unit:
                found[meta["grade_id"]] = match.group(2)
    return found


@dataclass
class Verdict:
    passed: bool
    message: str
    seconds: float
    calls: int


class CheckService:
    """Serve one submission's hidden checks on ``socket_path`` (a thread of the grading process)."""

    def __init__(self, unit: str, socket_path: Path, timeout_s: float = 900):
        self.unit = unit
        self.module = hidden_module(unit)
        self.allowed = set(checks_by_cell(unit).values())
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self.verdicts: dict[str, Verdict] = {}
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="check-service")

    def start(self) -> CheckService:
        if self.socket_path.exists():
            self.socket_path.unlink()
        self._server.bind(str(self.socket_path))
        self._server.listen(4)
        self._server.settimeout(0.5)
        # The checks' thread shares this process with nbclient's loop; with the default 5 ms GIL
        # switch interval every round trip to the kernel could wait that long for its turn.
        sys.setswitchinterval(min(sys.getswitchinterval(), 1e-4))
        self._thread.start()
        return self

    def stop(self) -> dict[str, Verdict]:
        self._stopped.set()
        self._thread.join(self.timeout_s)
        try:
            self._server.close()
        except OSError:
            pass
        return dict(self.verdicts)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._handle(conn)
            except Exception:  # a broken connection must not stop the service
                pass
            finally:
                try:
                    conn.close()
                except OSError:
                    pass

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout_s)
        header, _ = recv_message(conn)
        check = str(header.get("run_check", ""))
        if header.get("unit") != self.unit or check not in self.allowed:
            send_message(conn, {"done": "failed", "message": f"no hidden check {check!r} in {self.unit}"}, [])
            return
        if check in self.verdicts:  # once per grading run: the kernel cannot probe the checks
            verdict = self.verdicts[check]
            send_message(conn, {"done": "passed" if verdict.passed else "failed", "message": verdict.message}, [])
            return
        peer = Peer(conn, trusted_side=True)
        peer.pure = getattr(self.module, "PURE_METHODS", {})
        start = time.perf_counter()
        try:
            getattr(HiddenTests(self.module), check)(RemoteNamespace(peer))
            passed, message = True, ""
        except GradingFailure as err:
            passed, message = False, str(err)
        except (WireError, OSError):
            passed, message = False, ("the kernel stopped answering during the hidden tests (it crashed, "
                                      "exited, or was interrupted at the cell time limit)")
        except BaseException as err:  # noqa: BLE001  a grader bug must fail the check, not the run
            passed, message = False, f"grading error in the hidden tests: {type(err).__name__}: {err}"
        self.verdicts[check] = Verdict(passed, message, time.perf_counter() - start, peer.calls)
        try:
            send_message(conn, {"done": "passed" if passed else "failed", "message": message}, [])
        except OSError:
            pass
        peer.close()


def apply_verdicts(gradebook, unit: str, student: str, verdicts: dict[str, Verdict]) -> int:
    """Zero every autograded cell of ``student``'s ``unit`` whose hidden check did not pass in the
    grader; return how many cells had scored in the kernel but not here (tampering, or a check the
    cell never reached)."""
    overruled = 0
    for grade_id, check in checks_by_cell(unit).items():
        verdict = verdicts.get(check)
        if verdict is not None and verdict.passed:
            continue
        grade = gradebook.find_grade(grade_id, unit, unit, student)
        if grade.auto_score:
            overruled += 1
        grade.auto_score = 0.0
        if grade.extra_credit:
            grade.extra_credit = 0.0
    gradebook.db.commit()
    return overruled
