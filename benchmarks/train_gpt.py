"""Benchmark: the course's reference ``train`` (unit 06) on the course's GPT (unit 05), with
nanoGPT's character-level tiny Shakespeare configurations. Not a test: it prints losses and times.

    .venv/bin/python benchmarks/train_gpt.py                  # nanoGPT's CPU config, 2000 iterations
    .venv/bin/python benchmarks/train_gpt.py --baseline       # the same run with torch.optim.AdamW too
    .venv/bin/python benchmarks/train_gpt.py --nanogpt-lr     # also at nanoGPT's learning rate
    .venv/bin/python benchmarks/train_gpt.py --gpu-config     # nanoGPT's GPU config (needs a GPU)

Sizes, batches and iterations are nanoGPT's (``config/train_shakespeare_char.py`` and its README's
CPU command), and so is the recipe: AdamW (betas (0.9, 0.99), weight decay 0.1), 100 warm-up
iterations, a cosine to a tenth of the peak at the last iteration, clipping at 1.0, val loss on 20
batches every 250 iterations. The course's ``TrainConfig`` peaks at 2e-3, twice nanoGPT's 1e-3
(``--nanogpt-lr`` runs that too). nanoGPT itself reaches val 1.88 with the CPU config (published),
measured on the course's 2-core machine at val 1.874 in 145 s (COURSE.md); with the GPU config
1.4697. ``--baseline`` runs the same loop with PyTorch's AdamW in place of the course's, side by
side, on the same machine state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the course repository: its references

from llmcourse.data import char_vocab, load_text  # noqa: E402
from llmcourse.grading import reference  # noqa: E402
from llmcourse.runtime import get_device, seed_everything  # noqa: E402

U06 = reference("06_training")

CPU = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0,
           train=dict(batch_size=12, context_length=64, max_iters=2000))
GPU = dict(n_layer=6, n_head=6, n_embd=384, dropout=0.2,
           train=dict(batch_size=64, context_length=256, max_iters=5000, max_lr=1e-3, min_lr=1e-4))  # nanoGPT's
ANCHORS = {"cpu": "nanoGPT: val 1.88 (published), 1.874 in 145 s on the course's 2-core machine",
           "gpu": "nanoGPT: val 1.4697 in about 3 minutes on an A100"}


def tiny_shakespeare() -> tuple[dict, int]:
    """nanoGPT's split: the first 90% of the characters for training, the rest for validation."""
    text = load_text("tinyshakespeare")
    stoi, _ = char_vocab(text, first=None)
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return {"train": data[:n], "val": data[n:]}, len(stoi)


def run(label: str, preset: dict, data: dict, vocab_size: int, device: str, iters: int | None,
        optimizer=None, **settings) -> dict:
    """One training run from seed 0; ``optimizer`` replaces the course's AdamW for the run, and
    ``settings`` override TrainConfig's."""
    config = U06.TrainConfig(**{**preset["train"], **({"max_iters": iters} if iters else {}), **settings},
                             device=device, progress=False)
    seed_everything(0)
    model = U06.GPT(vocab_size, config.context_length, preset["n_layer"], preset["n_head"], preset["n_embd"],
                    preset["dropout"])
    course_adamw = U06.AdamW
    if optimizer is not None:
        U06.AdamW = optimizer  # train() builds its optimizer from the module's AdamW
    try:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        history = U06.train(model, data, config)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        U06.AdamW = course_adamw
    result = {"run": label, "val": history["val_loss"][-1], "seconds": seconds,
              "ms/it": 1000 * seconds / config.max_iters, "iters": config.max_iters,
              "evals": list(zip(history["eval_iter"], [round(v, 4) for v in history["val_loss"]], strict=True))}
    print(f"{label:<34} val {result['val']:.4f}  {seconds:7.1f} s  {result['ms/it']:6.1f} ms/it  "
          f"({config.max_iters} iterations)", flush=True)
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-config", action="store_true", help="nanoGPT's GPU configuration")
    parser.add_argument("--baseline", action="store_true", help="also run with torch.optim.AdamW")
    parser.add_argument("--nanogpt-lr", action="store_true", help="also run at nanoGPT's lr (1e-3 to 1e-4)")
    parser.add_argument("--iters", type=int, default=None, help="override the number of iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default=None, help="default: CUDA, then MPS, then CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or str(get_device())
    preset, name = (GPU, "gpu") if args.gpu_config else (CPU, "cpu")
    data, vocab_size = tiny_shakespeare()
    print(f"{name} config on {device} ({torch.get_num_threads()} CPU threads): "
          f"{ {k: v for k, v in preset.items() if k != 'train'} } {preset['train']}")
    print(f"anchor: {ANCHORS[name]}")
    results = [run("course train + course AdamW", preset, data, vocab_size, device, args.iters)]
    if args.nanogpt_lr:
        results.append(run("the same at nanoGPT's lr 1e-3", preset, data, vocab_size, device, args.iters,
                           max_lr=1e-3, min_lr=1e-4))
    if args.baseline:
        results.append(run("course train + torch.optim.AdamW", preset, data, vocab_size, device, args.iters,
                           optimizer=torch.optim.AdamW))
    for result in results:
        print(f"  {result['run']}: val loss at {result['evals']}")
    return results


if __name__ == "__main__":
    main()
