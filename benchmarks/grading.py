"""Benchmark: what grading one submission costs, against the physical floor, side by side in one run.

    .venv/bin/python benchmarks/grading.py                    # unit 01, 3 rounds
    .venv/bin/python benchmarks/grading.py --unit 03_rnns --rounds 2

Per round, for the reference submission (alice) of the unit, one after the other on the same machine:

- **floor**: ``jupyter nbconvert --execute`` of the notebook, with nbgrader's environment
  (``NBGRADER_EXECUTION``), outside any sandbox and with the hidden tests run in the kernel: what
  executing the notebook costs, with nothing of the grader around it;
- **unsandboxed**: ``python -m autograder.grade`` with ``LLMCOURSE_NO_SANDBOX=1``: the grader, its
  gradebook writes and feedback, and (for a ported unit) the hidden checks in the grader's process;
- **sandboxed**: the same with bubblewrap and the cgroup limits, as a TA runs it.

It prints the median seconds of each, the overheads (grader minus floor, sandbox minus
unsandboxed), and, for a unit whose checks run in the grader, the time the checks took there
against the same checks run in one process (``in process``): the cost of the wire. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _floor(unit: str, workdir: Path) -> float:
    nb = ROOT / "autograder" / "samples" / "alice" / unit / f"{unit}.ipynb"
    dest = workdir / f"{unit}.ipynb"
    shutil.copy(nb, dest)
    for extra in (ROOT / "assignments" / unit / "references",):
        if extra.is_dir():
            shutil.copytree(extra, workdir / "references", dirs_exist_ok=True)
    env = {**os.environ, "NBGRADER_EXECUTION": "autograde", "LLMCOURSE_AUTOGRADER_ROOT": str(ROOT)}
    env.pop("LLMCOURSE_CHECK_SOCKET", None)
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
                    "--output", str(workdir / "executed.ipynb"), str(dest)],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _grade(unit: str, state: Path, sandboxed: bool) -> tuple[float, dict]:
    folder = state / "in"
    (folder / "alice" / unit).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "autograder" / "samples" / "alice" / unit / f"{unit}.ipynb", folder / "alice" / unit)
    env = {**os.environ, "LLMCOURSE_GRADING_DIR": str(state / "grading")}
    if not sandboxed:
        env["LLMCOURSE_NO_SANDBOX"] = "1"
    run = subprocess.run([sys.executable, "-m", "autograder.grade", str(folder), "--assignment", unit],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    with open(state / "grading" / "grades.csv", newline="") as f:
        seconds = float(next(csv.DictReader(f))["seconds"])
    return seconds, {"console": run.stdout[-400:]}


def _checks_in_process(unit: str) -> tuple[float, float] | None:
    """(seconds in one process, seconds over the wire's loopback) for the unit's checks."""
    from autograder import checks, notebooks
    from llmcourse.grading import HiddenTests
    from llmcourse.wire import Loopback

    if not checks.runs_outside_the_kernel(unit):
        return None
    module = checks.hidden_module(unit)
    code = compile(notebooks.reference_path(unit).read_text(), "reference", "exec")
    times = []
    for through_wire in (False, True):
        start = time.perf_counter()
        for check in sorted(set(checks.checks_by_cell(unit).values())):
            ns = {"__name__": "__main__"}
            exec(code, ns)
            if through_wire:
                loop = Loopback(ns)
                loop.peer.pure = getattr(module, "PURE_METHODS", {})
                with loop as remote:
                    getattr(HiddenTests(module), check)(remote)
            else:
                getattr(HiddenTests(module), check)(ns)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit", default="01_ngrams")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from autograder import sandbox

    reason = sandbox.unavailable_reason()
    results: dict[str, list[float]] = {"floor": [], "unsandboxed": [], "sandboxed": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "floor").mkdir()
            results["floor"].append(_floor(args.unit, tmp / "floor"))
            results["unsandboxed"].append(_grade(args.unit, tmp / "plain", sandboxed=False)[0])
            if reason is None:
                results["sandboxed"].append(_grade(args.unit, tmp / "boxed", sandboxed=True)[0])
    median = {k: statistics.median(v) for k, v in results.items() if v}
    print(f"unit {args.unit}, {args.rounds} rounds, median seconds per submission (alice):")
    for name, value in median.items():
        print(f"  {name:12s} {value:6.2f} s")
    print(f"  grader overhead over the floor: {median['unsandboxed'] - median['floor']:+.2f} s "
          f"({median['unsandboxed'] / median['floor']:.2f}x)")
    if "sandboxed" in median:
        print(f"  sandbox overhead: {median['sandboxed'] - median['unsandboxed']:+.2f} s")
    else:
        print(f"  sandbox: not measured ({reason})")
    wire = _checks_in_process(args.unit)
    if wire:
        print(f"  hidden checks: {wire[0]:.2f} s in one process, {wire[1]:.2f} s through the wire's loopback "
              f"({wire[1] - wire[0]:+.2f} s)")
    out = {"median": median, "wire": wire}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
