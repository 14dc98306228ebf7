"""The benchmark script runs (a few iterations; the real run is `benchmarks/train_gpt.py`)."""

from __future__ import annotations

import importlib.util

import pytest

from autograder import notebooks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_gpt_benchmark_runs_and_reports(capsys):
    spec = importlib.util.spec_from_file_location("train_gpt", notebooks.ROOT / "benchmarks" / "train_gpt.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--iters", "3", "--baseline", "--device", "cpu"])
    assert [r["iters"] for r in results] == [3, 3]
    # the course's AdamW and PyTorch's take the same steps
    assert abs(results[0]["val"] - results[1]["val"]) < 1e-4
    out = capsys.readouterr().out
    assert "anchor: nanoGPT" in out and "ms/it" in out
