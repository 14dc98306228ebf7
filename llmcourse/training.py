"""Training utilities the lectures and assignments share: batches, one training loop, evaluation.

Nothing graded lives here: a unit's graded pieces (a loss, a clipping function, a sampler) are
passed in by the notebook, so the same loop trains the student's parts and the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


def context_windows(words: Iterable[str], stoi: dict[str, int], block_size: int, end: str = ".") -> tuple[
        torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, as in Bengio et al.'s MLP model.

    Each word is read as ``end * block_size + word + end``: the first context is all ``end``.
    Returns ``X`` (N, block_size) and ``Y`` (N,), both int64, N = sum of (len(word) + 1).
    """
    xs, ys = [], []
    for word in words:
        context = [stoi[end]] * block_size
        for ch in word + end:
            xs.append(context)
            ys.append(stoi[ch])
            context = context[1:] + [stoi[ch]]
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


def random_chunks(data: torch.Tensor, block_size: int, batch_size: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's ``get_batch``: ``batch_size`` random windows of a long 1-D id tensor.

    Returns ``x`` and ``y``, both (batch_size, block_size), with ``y`` the next id after each of ``x``.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in starts.tolist()])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in starts.tolist()])
    return x, y


def random_rows(n: int, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch_size`` random row indices in ``range(n)`` (sampled with replacement), shape (batch_size,)."""
    return torch.randint(n, (batch_size,), generator=generator)


@dataclass
class History:
    """What a training run recorded: the loss of every step, and the evaluations made on the way."""

    train: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    evals: dict[str, list[float]] = field(default_factory=dict)

    def smoothed(self, window: int = 100) -> list[float]:
        """The training loss averaged over consecutive windows (one point per window)."""
        window = max(1, min(window, len(self.train)))
        return [sum(self.train[i:i + window]) / len(self.train[i:i + window])
                for i in range(0, len(self.train), window)]


def fit(model: torch.nn.Module, batch_loss: Callable[[int], torch.Tensor], steps: int,
          optimizer: torch.optim.Optimizer, *, clip: Callable | None = None, max_norm: float = 1.0,
          evaluate: Callable[[], dict[str, float]] | None = None, eval_every: int = 0,
          on_eval: Callable[[int], None] | None = None, desc: str = "training",
          progress: bool = True) -> History:
    """The course's training loop: ``steps`` optimizer steps on ``batch_loss(step)``.

    ``batch_loss(step)`` returns the scalar loss of one batch. ``clip(parameters, max_norm)``,
    when given, runs between ``backward`` and ``step`` (e.g. a student's ``clip_grad_norm``).
    ``evaluate()`` returns named losses; it runs every ``eval_every`` steps and after the last one,
    in eval mode and without gradients, and ``on_eval(step)`` runs after it (e.g. to print samples).
    A tqdm bar shows the running loss. Stops early, with a message, if the loss is not finite.
    """
    from tqdm.auto import tqdm

    history = History()
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        loss = batch_loss(step)
        if not math.isfinite(loss.item()):
            print(f"step {step}: the loss is {loss.item()}, stopping")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            clip(model.parameters(), max_norm)
        optimizer.step()
        history.train.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = step == steps - 1
        if evaluate is not None and ((eval_every and step % eval_every == 0) or last):
            model.eval()
            with torch.no_grad():
                for name, value in evaluate().items():
                    history.evals.setdefault(name, []).append(float(value))
                if on_eval is not None:
                    on_eval(step)
            history.eval_steps.append(step)
            model.train()
    model.eval()
    return history


@torch.no_grad()
def mean_loss(loss_of_batch: Callable[[torch.Tensor], tuple[torch.Tensor, int]], n: int,
              batch_size: int = 4096) -> float:
    """The mean loss over ``n`` examples, evaluated ``batch_size`` rows at a time.

    ``loss_of_batch(rows)`` gets int64 row indices (k,) and returns ``(mean, count)``: the mean
    loss over those rows and the number of predictions it averaged (k for one target per row, the
    number of non-padding targets for padded sequences), so the result is the mean per prediction.
    """
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        mean, k = loss_of_batch(torch.arange(start, min(n, start + batch_size)))
        total += float(mean) * k
        count += k
    return total / max(count, 1)


def pad_sequences(sequences: list[list[int]], pad: int = 0, side: str = "right") -> torch.Tensor:
    """Pad id lists to the longest one: (B, max length) int64.

    ``side="left"`` puts the padding first, so that every sequence ends at the last position (an
    encoder's last output is then the summary of every row).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            start = 0 if side == "right" else width - len(seq)
            out[row, start:start + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


CHAR_GPTS = {
    # name: (the GPT's sizes, TrainConfig overrides). Trained on tiny Shakespeare's first 90%, seed 0, on
    # windows of the whole block (every position's embedding is trained). "base" is nanoGPT's CPU model.
    "draft": (dict(block_size=64, n_layer=1, n_head=2, n_embd=32), dict(max_iters=400, batch_size=16)),
    "small": (dict(block_size=64, n_layer=2, n_head=4, n_embd=64), dict(max_iters=800, batch_size=16)),
    "base": (dict(block_size=64, n_layer=4, n_head=4, n_embd=128), dict(max_iters=2000)),
}


def char_gpt(name: str, trainer, device="cpu"):
    """A character-level GPT trained on tiny Shakespeare, for the units that use a trained model
    (decoding, fine-tuning, alignment). ``name`` is one of ``CHAR_GPTS``: "draft" (about 10 s to
    train on a CPU), "small" (about 30 s) or "base" (nanoGPT's CPU model, about 2.5 minutes).

    ``trainer`` is unit 06's reference module (``reference("06_training")``): its ``GPT``, ``train``
    and ``TrainConfig`` build and train the model, deterministically on the CPU from seed 0. The
    weights are cached in the data cache (``LLMCOURSE_CACHE_DIR``, models/), keyed by the settings and the
    reference's source, so a changed reference retrains. Returns (model in eval mode on ``device``,
    stoi, itos).
    """
    import hashlib
    import inspect
    import os

    from llmcourse.data import cache_dir, char_vocab, load_text
    from llmcourse.runtime import seed_everything

    sizes, overrides = CHAR_GPTS[name]
    text = load_text("tinyshakespeare")
    stoi, itos = char_vocab(text, first=None)
    key = hashlib.sha256(repr((name, sizes, overrides, inspect.getsource(trainer.GPT),
                               inspect.getsource(trainer.train))).encode()).hexdigest()[:16]
    path = cache_dir() / "models" / f"char-gpt-{name}-{key}.pt"
    seed_everything(0)
    model = trainer.GPT(len(itos), **sizes)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        n_train = int(0.9 * len(tokens))
        config = trainer.TrainConfig(**overrides, context_length=sizes["block_size"], device="cpu", progress=False)
        trainer.train(model, {"train": tokens[:n_train], "val": tokens[n_train:]}, config)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)  # atomic: a half-written file is never loaded, two writers never mix
        except OSError:  # a read-only cache (a grading sandbox): the model is simply not kept
            pass
    return model.to(device).eval(), stoi, itos


class MarkovLM(torch.nn.Module):
    """A language model with a known distribution, to test samplers and decoders against: the next
    token depends on the last one only, ``logits[b, t] = log(probs[idx[b, t]])``.

    probs: (V, V), each row a distribution. ``forward(idx (B, T), targets=None)`` returns
    ``(logits (B, T, V), None)``, as the course's GPT does.
    """

    def __init__(self, probs, block_size: int = 8):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(probs, dtype=torch.float32).log())
        self.block_size = block_size

    def forward(self, idx: torch.Tensor, targets=None):
        assert idx.size(1) <= self.block_size, f"{idx.size(1)} tokens > block_size {self.block_size}"
        return self.table[idx], None

