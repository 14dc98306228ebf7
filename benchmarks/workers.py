"""Benchmark: grading throughput with workers side by side, against one at a time, in one run.

    .venv/bin/python benchmarks/workers.py                 # 6 copies of alice's unit 01, 2 workers
    .venv/bin/python benchmarks/workers.py --copies 12 --workers 4 --unit 03_rnns

The same folder (``--copies`` students, each with the reference submission of ``--unit``) is graded
from scratch, each time in a fresh grading state, by ``python -m autograder.grade``:

- **sequential**: ``--workers 1``, one submission at a time (the peer: how nbgrader grades);
- **workers**: ``--workers N`` forked on this machine;
- **dask**: ``--scheduler local --workers N``, a Dask cluster on this machine.

It prints each run's wall time (start-up and releases included) and its speed-up over sequential,
and checks that every run gave the same scores. Not a test: CI has 2 cores and a noisy neighbour.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, state: Path, extra: list[str]) -> tuple[float, list[tuple[str, str]]]:
    env = {**os.environ, "LLMCOURSE_GRADING_DIR": str(state)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autograder.grade", str(folder), *extra], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(state / "grades.csv", newline="") as f:
        rows = [(r["student"], r["score"], r["status"]) for r in csv.DictReader(f)]
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit", default="01_ngrams")
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmcourse-workers-") as tmp:
        folder = Path(tmp) / "in"
        for i in range(args.copies):
            dest = folder / f"student{i:02d}" / args.unit
            dest.mkdir(parents=True)
            shutil.copy(ROOT / "autograder" / "samples" / "alice" / args.unit / f"{args.unit}.ipynb", dest)
        runs = {"sequential": ["--workers", "1"], f"{args.workers} workers": ["--workers", str(args.workers)]}
        if not args.no_dask:
            runs[f"dask, {args.workers} workers"] = ["--scheduler", "local", "--workers", str(args.workers)]
        results = {name: _run(folder, Path(tmp) / f"state{i}", extra) for i, (name, extra) in enumerate(runs.items())}

    base = results["sequential"][0]
    print(f"{args.copies} x alice/{args.unit} on {os.cpu_count()} cores")
    for name, (seconds, _) in results.items():
        print(f"  {name:<20} {seconds:7.1f} s   {base / seconds:4.2f}x sequential")
    rows = {name: r for name, (_, r) in results.items()}
    same = all(r == rows["sequential"] for r in rows.values())
    print("same scores in every run:", same)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
