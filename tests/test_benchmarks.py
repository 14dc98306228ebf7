"""The benchmark script runs (a few iterations; the real run is `benchmarks/train_gpt.py`)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from autograder import notebooks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_gpt", notebooks.ROOT / "benchmarks" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_gpt_benchmark_runs_ours_and_nanogpt_side_by_side(bench, capsys, monkeypatch):
    monkeypatch.setitem(bench.CPU, "nanogpt_eval_iters", 4)  # nanoGPT's 20 batches per split: a slower test
    results = bench.main(["--iters", "3", "--baseline", "--device", "cpu"])
    assert [r["run"] for r in results] == ["ours: FusedGPT, nanoGPT's architecture", "ours with torch.optim.AdamW",
                                           "nanoGPT train.py + model.py"]
    assert [r["iters"] for r in results] == [3, 3, 3]  # --iters applies to nanoGPT's run too
    # the course's AdamW and PyTorch's take the same steps
    assert abs(results[0]["val"] - results[1]["val"]) < 1e-4
    # nanoGPT evaluates at iteration 0 (an untrained model: about uniform over 65 characters) and at the end
    nanogpt = results[2]
    assert [it for it, _ in nanogpt["evals"]] == [0, 3]
    assert abs(nanogpt["evals"][0][1] - math.log(65)) < 0.05
    assert nanogpt["val"] == pytest.approx(nanogpt["evals"][-1][1], abs=1e-4) and nanogpt["val"] < math.log(65)
    assert nanogpt["seconds"] > 0 and math.isfinite(nanogpt["train"])
    out = capsys.readouterr().out
    assert "anchor: nanoGPT" in out and "ms/it" in out
    assert "ours vs nanoGPT: val" in out and "the bar (val <= 1.88" in out


def test_train_gpt_benchmark_ours_only_skips_nanogpt(bench, capsys):
    results = bench.main(["--iters", "2", "--ours-only", "--gpt2", "--unfused", "--device", "cpu"])
    assert [r["run"] for r in results] == ["ours: FusedGPT, nanoGPT's architecture", "FusedGPT, GPT-2's architecture",
                                           "unit 05's GPT (GPT-2's, unfused)"]
    assert "ours vs nanoGPT" not in capsys.readouterr().out
    # FusedGPT's defaults are unit 05's GPT computed faster: the same run, to float rounding
    assert abs(results[1]["val"] - results[2]["val"]) < 1e-4 and abs(results[0]["val"] - results[1]["val"]) > 1e-4
