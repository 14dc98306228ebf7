"""``make samples``: the bundled sample submissions, generated from solutions/ and assignments/.

They are committed (the demo grades them) and a test fails when they are stale. For each unit:

- ``alice``: the reference answers typed into the release notebook: full autograded marks,
  written answers waiting for a TA.
- ``bob``: the release, untouched: 0, and the grader survives it.
- ``carol``: mostly right, with mistakes students really make (listed in ``MISTAKES``): a score
  in between, and written answers partly done.
- ``dave``: a corrupt notebook (truncated JSON, as from a failed upload).
- ``erin``: a notebook whose code kills the kernel (``os._exit``), reported as such, not as a 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from . import notebooks

SAMPLES = Path(__file__).resolve().parent / "samples"

# Mistakes for carol, per unit: (grade_id of the answer cell, text in the reference, replacement).
MISTAKES: dict[str, list[tuple[str, str, str]]] = {
    "01_ngrams": [
        # add-k that does not normalise: the denominator forgets k * |V|
        ("NGramLM", "(c_h + self.k * len(self.vocab))", "(c_h + self.k)"),
        # perplexity's N without the </s> of each sentence
        ("perplexity", "n_tokens += len(sentence) + 1", "n_tokens += len(sentence)"),
    ],
    "02_tokenization": [
        # ties broken towards the lexicographically smaller pair
        ("train_bpe", "best = max(pair for pair, count in pair_counts.items() if count == top)",
         "best = min(pair for pair, count in pair_counts.items() if count == top)"),
        # the negative samples' term with the wrong sign
        ("sgns_loss", "F.logsigmoid(-negative)", "F.logsigmoid(negative)"),
    ],
    "03_rnns": [
        # nn.RNNCell's second bias forgotten in the model
        ("RNNLM", "bias = self.bias_ih + self.bias_hh", "bias = self.bias_ih"),
        # the squared norm used as the norm (no square root)
        ("clip_grad_norm", "for g in grads]).sum().sqrt()", "for g in grads]).sum()"),
    ],
    "04_lstm_seq2seq": [
        # the gates read in the wrong order (i, f, o, g instead of PyTorch's i, f, g, o)
        ("lstm_cell", "i, f, g, o = gates.chunk(4, dim=-1)", "i, f, o, g = gates.chunk(4, dim=-1)"),
        # greedy decoding stops as soon as one row has produced EOS, not every row
        ("Seq2Seq", "if bool(finished.all()):", "if bool(finished.any()):"),
    ],
    "05_transformers": [
        # attention scores without the 1/sqrt(d_k) scaling
        ("scaled_dot_product_attention", "scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))",
         "scores = q @ k.transpose(-2, -1)"),
        # LayerNorm with the unbiased variance (divided by d - 1), unlike nn.LayerNorm
        ("LayerNorm", "var = x.var(dim=-1, keepdim=True, unbiased=False)",
         "var = x.var(dim=-1, keepdim=True, unbiased=True)"),
    ],
    "06_training": [
        # Adam with L2 regularization: the weight decay added to the gradient instead of decoupled
        ("AdamW", "p.mul_(1 - lr * wd)\n                m.lerp_(p.grad, 1 - beta1)\n"
                  "                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)",
         "g = p.grad + wd * p\n                m.lerp_(g, 1 - beta1)\n"
         "                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)"),
        # the warm-up one iteration ahead: (it + 1) / warmup_iters, so it never starts at 0
        ("lr_at", "return it / warmup_iters * max_lr", "return (it + 1) / warmup_iters * max_lr"),
    ],
    "07_decoding": [
        # top-k that keeps exactly k indices: the tokens tied with the k-th largest logit are dropped
        ("top_k_filter", "    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)\n"
                         "    return logits.masked_fill(logits < kth_largest, float(\"-inf\"))",
         "    top = torch.topk(logits, k, dim=-1).indices\n"
         "    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)\n"
         "    return logits.masked_fill(~keep, float(\"-inf\"))"),
        # beam search that keeps extending finished hypotheses: a candidate ending in eos also stays alive
        ("beam_search", "            else:\n                alive.append(torch.cat([seqs[beam], seqs.new_tensor([token])]))\n"
                        "                alive_sums.append(total)",
         "            alive.append(torch.cat([seqs[beam], seqs.new_tensor([token])]))\n"
         "            alive_sums.append(total)"),
        # speculative decoding that resamples a rejected position from the target p, not the residual
        ("speculative_decode", "residual = (p[i] - q[i]).clamp(min=0)\n"
                               "            last = torch.multinomial(residual / residual.sum(), num_samples=1, "
                               "generator=generator)",
         "last = torch.multinomial(p[i], num_samples=1, generator=generator)"),
    ],
}
# What carol's mistakes cost, in autograded points: each mistake fails its own test cells only.
CAROL_LOSES: dict[str, float] = {
    "01_ngrams": 7 + 10,  # test_ngram_add_k (7), test_perplexity (10)
    "02_tokenization": 6 + 8,  # test_bpe_tie_breaking (6), test_sgns_loss (8)
    "03_rnns": 12 + 10,  # test_rnnlm_forward (12), test_clip_grad_norm (10)
    "04_lstm_seq2seq": 12 + 12,  # test_lstm_cell (12), test_greedy_decode (12)
    "05_transformers": 15 + 10,  # test_scaled_dot_product_attention (15), test_layer_norm (10)
    "06_training": 12 + 8 + 8,  # test_adamw_steps (12), test_adamw_against_torch (8), test_lr_at (8)
    "07_decoding": 7 + 13 + 15,  # test_top_k_filter (7), test_beam_search (13), test_speculative_decode (15)
}
# Written answers carol leaves blank (the rest she answers with the key's text).
CAROL_SKIPS_WRITTEN = 1


def _answer_cells(nb: dict) -> dict[str, dict]:
    return {notebooks.nbgrader_meta(c)["grade_id"]: c for c in nb["cells"]
            if notebooks.nbgrader_meta(c).get("solution")}


def _strip_markers(text: str) -> str:
    return "\n".join(ln for ln in text.split("\n")
                     if ln.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))


def answered(unit: str, skip_written: int = 0) -> dict:
    """The release notebook with every answer cell filled in from the solution."""
    release = notebooks.load(notebooks.release_notebook(unit))
    solution = _answer_cells(notebooks.load(notebooks.solution_notebook(unit)))
    filled = copy.deepcopy(release)
    skipped = 0
    for cell in filled["cells"]:
        meta = notebooks.nbgrader_meta(cell)
        if not meta.get("solution"):
            continue
        if cell["cell_type"] == "markdown" and skipped < skip_written:
            skipped += 1
            continue
        cell["source"] = _strip_markers(notebooks.source(solution[meta["grade_id"]]))
    return filled


def with_mistakes(nb: dict, unit: str) -> dict:
    wrong = copy.deepcopy(nb)
    cells = _answer_cells(wrong)
    for grade_id, old, new in MISTAKES[unit]:
        text = notebooks.source(cells[grade_id])
        if old not in text:
            raise ValueError(f"sample mistake for {unit}/{grade_id} no longer applies: {old!r} "
                             f"is not in the reference; update autograder/samples.py")
        cells[grade_id]["source"] = text.replace(old, new, 1)
    return wrong


def with_kernel_crash(nb: dict) -> dict:
    crashed = copy.deepcopy(nb)
    first_answer = next(c for c in crashed["cells"]
                        if notebooks.nbgrader_meta(c).get("solution") and c["cell_type"] == "code")
    first_answer["source"] = "import os\nos._exit(1)  # a student's stray exit kills the kernel\n\n" + \
        notebooks.source(first_answer)
    return crashed


def _dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def sample_files(unit: str) -> dict[Path, str]:
    """Every sample file of ``unit`` and its exact content."""
    complete = answered(unit)
    files = {
        "alice": _dump(complete),
        "bob": _dump(notebooks.load(notebooks.release_notebook(unit))),
        "carol": _dump(with_mistakes(answered(unit, CAROL_SKIPS_WRITTEN), unit)),
        "erin": _dump(with_kernel_crash(complete)),
    }
    files["dave"] = files["alice"][: len(files["alice"]) // 3]  # truncated upload
    return {SAMPLES / student / unit / f"{unit}.ipynb": text for student, text in files.items()}


def write_samples() -> None:
    for unit in notebooks.units():
        for path, text in sample_files(unit).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(notebooks.ROOT)}")
