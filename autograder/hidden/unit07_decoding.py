"""Hidden tests of unit 07 (sampling and decoding: filters, search, a KV cache, speculative decoding).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with the reference exported from the solution
notebook, and the filters also with Hugging Face's logits processors (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``NoRepeatNGramLogitsProcessor``; only that comparison is
skipped when ``transformers`` is not installed), on several seeds, shapes, dtypes, models and
settings, on every device present, and raises ``GradingFailure`` with a message that says what was
expected, on which input, and how far off.

Exact comparisons of random draws are possible because the notebook fixes every draw
("Conventions"): one ``torch.multinomial(probs, num_samples=1, generator=generator)`` per token (for
a whole batch at once) and one ``torch.rand(1, generator=generator, device=...)`` per uniform. The
checks compare the generator's state afterwards too, so a draw too many shows even when the tokens
agree. The models are unit 05's reference GPT with random weights, scaled up where the tokens are
compared (peaked distributions: no near-ties that rounding could flip).

More than the comparison with the reference:

- ``beam_search``: the hypotheses of a beam as wide as the whole tree (V ** 3 over three tokens of a
  vocabulary of 3 to 5) against an exhaustive enumeration written here.
- ``generate``: the student's cached run of 256 new tokens (unit 05's GPT(65, 288, 4, 4, 128), one
  thread, on the CPU) must be at least ``SPEEDUP``x faster than the *reference's* uncached run
  (timed in the same process, re-timed once before failing).
- ``speculative_decode``: a chi-square goodness-of-fit test of the first two tokens over
  ``SPEC_SAMPLES`` runs (two Markov models with very different distributions over 4 tokens, a
  fixed seed) against the target's exact distribution, computed by enumeration.

One mistake costs once: ``sample_next`` is graded with the reference filters swapped into the
notebook's namespace, and ``generate`` with the reference ``sample_next`` and ``forward_with_cache``;
``speculative_decode`` calls no other graded name.

Forbidden while the student's code runs: Hugging Face's logits processors (in the filters,
``sample_next`` and ``no_repeat_ngram_mask``), calling unit 05's GPT (``model(...)``) in
``forward_with_cache``, and in each check this unit's reference of the name it grades (a student
could reach ``autograder/references`` only inside the grader, where the guard catches it).
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn as nn

from autograder.references import unit05_transformers as ref05
from autograder.references import unit07_decoding as ref
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    beside,
    call_student,
    forbid,
    load_weights,
    manual_seed,
    on_each_device,
    repeated_calls,
    round_trip_seconds,
    served_calls,
    single_thread_where,
    student,
    swapped,
)
from llmcourse.runtime import single_thread
from llmcourse.training import MarkovLM
from llmcourse.wire import by_handle

# The checks run in the grader's process; the student's names are reached over llmcourse.wire.
RUNS_OUTSIDE_THE_KERNEL = True

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
INF = float("inf")

NO_SHORTCUTS = ("Write it with tensor operations (torch.topk, torch.sort, torch.cumsum, torch.multinomial are "
                "fine): Hugging Face's logits processors and the course's reference are not allowed here.")
NO_REFERENCE = "The course's reference of this unit is not allowed here."
HF_PROCESSORS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
                 "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "NoRepeatNGramLogitsProcessor")


def _unwrapped(fn):
    """The function a decorator (``@torch.no_grad()``) wraps: forbid() swaps the code of plain functions."""
    while getattr(fn, "__closure__", None) and getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


def _own(name: str):
    """This unit's reference of a graded name, as forbid() needs it."""
    return _unwrapped(getattr(ref, name))


@functools.lru_cache(maxsize=1)
def hf_processors():
    """``transformers.generation.logits_process``, or None when transformers is not installed (then only
    the comparison with it is skipped). Imported lazily: about a second, once per process."""
    try:
        from transformers.generation import logits_process
    except ImportError:
        return None
    return logits_process


def _no_shortcuts(*own):
    lp = hf_processors()
    classes = [getattr(lp, name) for name in HF_PROCESSORS if lp is not None and hasattr(lp, name)]
    return forbid(*classes, *own, reason=NO_SHORTCUTS)


def _no_reference(*own):
    return forbid(*own, reason=NO_REFERENCE)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _logits(seed: int, shape: tuple, kind: str = "normal", dtype=F32) -> torch.Tensor:
    """Random logits: "normal" (std 2), "sharp" (std 8), "flat" (std 0.05), "ties" (integers -2..2, so
    many ties), "-inf" (std 2, about 40% already -inf, never the first token of a row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64)
    if kind == "normal":
        x = 2 * x
    elif kind == "sharp":
        x = 8 * x
    elif kind == "flat":
        x = 0.05 * x
    elif kind == "ties":
        x = torch.randint(-2, 3, shape, generator=g).to(F64)
    elif kind == "-inf":
        gone = torch.rand(*shape, generator=g) < 0.4
        gone[..., 0] = False
        x = (2 * x).masked_fill(gone, -INF)
    else:
        raise ValueError(kind)
    return x.to(dtype)


def _describe_input(shape, kind, dtype) -> str:
    return f"{kind} logits of shape {tuple(shape)}, {_dtype_name(dtype)}"


def _check_tensor(got, *, shape, dtype, device, what, name="the result"):
    if not isinstance(got, torch.Tensor):
        raise GradingFailure(f"{what}: {name} must be a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise GradingFailure(f"{what}: {name} has shape {tuple(got.shape)}, expected {tuple(shape)}")
    if got.dtype != dtype:
        raise GradingFailure(f"{what}: {name} has dtype {got.dtype}, expected {dtype}")
    if got.device.type != device.type:
        raise GradingFailure(f"{what}: {name} is on {got.device}, expected {device} (return tensors on the device "
                             f"of the input; create new tensors with device=...)")


def _unchanged(x: torch.Tensor, before: torch.Tensor, what: str):
    if not torch.equal(x, before):
        raise GradingFailure(f"{what}: your function modified its input logits in place; return a new tensor "
                             f"(e.g. logits.masked_fill(...), not masked_fill_)")


def _row_text(values, limit=12) -> str:
    shown = ", ".join("-inf" if v == -INF else f"{v:.4g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _compare_filtered(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, what: str, against: str):
    """got, expected, x: the filtered logits, the expected ones and the input, same shape. Explains the
    first difference: the kept set, then the kept values, then the value of the removed ones."""
    g, e, inp = got.detach().cpu(), expected.detach().cpu(), x.detach().cpu()
    if torch.equal(g, e):
        return
    V = inp.size(-1)
    g2, e2, x2 = g.reshape(-1, V), e.reshape(-1, V), inp.reshape(-1, V)
    kept_g, kept_e = torch.isfinite(g2), torch.isfinite(e2)
    def index(r: int) -> str:
        if inp.dim() == 1:
            return "(the only row)"
        return str(tuple(int(i) for i in torch.unravel_index(torch.tensor(r), inp.shape[:-1])))

    differs = (kept_g != kept_e).any(dim=-1)
    if differs.any():
        r = int(differs.nonzero()[0])
        mine, theirs = kept_g[r].nonzero().flatten().tolist(), kept_e[r].nonzero().flatten().tolist()
        raise GradingFailure(f"{what}: in row {index(r)} you kept the tokens {mine[:20]}, {against} keeps {theirs[:20]} "
                             f"(the row's logits: {_row_text(x2[r].tolist())})")
    values = torch.where(kept_e, g2, torch.zeros_like(g2)) != torch.where(kept_e, x2, torch.zeros_like(x2))
    if values.any():
        r, t = (int(i) for i in values.nonzero()[0])
        raise GradingFailure(f"{what}: the kept logits must be returned unchanged: row {index(r)}, token {t} is "
                             f"{float(g2[r, t]):.6g}, the input's is {float(x2[r, t]):.6g}")
    bad = (~kept_e) & (g2 != -INF)
    r, t = (int(i) for i in bad.nonzero()[0])
    raise GradingFailure(f"{what}: a removed token must get the logit -inf (probability 0 after the softmax, as in "
                         f"Hugging Face); row {index(r)}, token {t} is {float(g2[r, t])}")


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.size(-1))


# --- part 1: apply_temperature, top_k_filter, top_p_filter, sample_next --------------------------

TEMPERATURE_CASES = [  # (shape, kind, dtype, temperature)
    ((7,), "normal", F32, 0.5),
    ((4, 10), "normal", F32, 2.0),
    ((4, 10), "normal", F64, 0.7),
    ((2, 3, 9), "normal", F32, 1.3),
    ((3, 50), "sharp", F32, 0.01),
    ((3, 20), "-inf", F32, 0.9),
    ((2, 16), "normal", BF16, 0.6),
    ((2, 16), "normal", F16, 1.7),
    ((1, 1), "normal", F32, 3.0),
    ((4, 10), "normal", F32, 1.0),
    ((3, 7), "normal", F64, 100.0),
]
_TEMPERATURE_TOL = {F32: 1e-6, F64: 1e-12, BF16: 1e-2, F16: 2e-3}


def _call_filter(fn, name: str, x: torch.Tensor, *args, what: str, **kwargs) -> torch.Tensor:
    """The student's filter ``name`` on logits ``x`` (its own shortcuts forbidden): a tensor of x's
    shape, dtype and device, with x left as it was."""
    before = x.clone()
    with _no_shortcuts(_own(name)):
        got = call_student(fn, x, *args, what=what, **kwargs)
    _check_tensor(got, shape=tuple(x.shape), dtype=x.dtype, device=x.device, what=what)
    _unchanged(x, before, what)
    return got


def check_apply_temperature(ns):
    fn = student(ns, "apply_temperature")
    lp = hf_processors()

    def check(device):
        for seed, (shape, kind, dtype, t) in enumerate(TEMPERATURE_CASES):
            x = _logits(seed, shape, kind, dtype).to(device)
            what = f"apply_temperature({_describe_input(shape, kind, dtype)}, temperature={t}) on {device}"
            got = _call_filter(fn, "apply_temperature", x, t, what=what)
            tol = _TEMPERATURE_TOL[dtype]
            assert_close(got, ref.apply_temperature(x, t), atol=tol, rtol=tol,
                         what=f"{what}: against the reference (logits / temperature)")
            if lp is not None:
                hf = lp.TemperatureLogitsWarper(float(t))(None, _as_2d(x)).reshape(shape)
                assert_close(got, hf, atol=tol, rtol=tol, what=f"{what}: against HF's TemperatureLogitsWarper")

    with single_thread():
        on_each_device(check)


TOP_K_CASES = [  # (shape, kind, dtype, k)
    ((10,), "normal", F32, 3),
    ((4, 10), "normal", F32, 1),
    ((4, 10), "ties", F32, 3),
    ((6, 10), "ties", F32, 1),
    ((6, 12), "ties", F64, 5),
    ((2, 3, 9), "normal", F32, 4),
    ((2, 3, 9), "ties", F32, 2),
    ((3, 7), "normal", F32, 7),  # k = V
    ((3, 7), "normal", F32, 20),  # k > V
    ((3, 7), "ties", F32, 6),  # k = V - 1
    ((5, 20), "-inf", F32, 15),  # k beyond the finite logits
    ((5, 20), "-inf", F32, 2),
    ((4, 50), "normal", BF16, 10),
    ((4, 50), "ties", F16, 4),
    ((1, 1), "normal", F32, 1),
    ((2, 1000), "normal", F32, 50),
]


def check_top_k_filter(ns):
    fn = student(ns, "top_k_filter")
    lp = hf_processors()

    def check(device):
        for seed, (shape, kind, dtype, k) in enumerate(TOP_K_CASES):
            x = _logits(seed, shape, kind, dtype).to(device)
            what = f"top_k_filter({_describe_input(shape, kind, dtype)}, k={k}) on {device}"
            got = _call_filter(fn, "top_k_filter", x, k, what=what)
            _compare_filtered(got, ref.top_k_filter(x, k), x, what,
                              "the reference (every logit tied with the k-th largest is kept too)")
            if lp is not None:
                hf = lp.TopKLogitsWarper(k)(None, _as_2d(x)).reshape(shape)
                _compare_filtered(got, hf, x, what, "HF's TopKLogitsWarper")

    with single_thread():
        on_each_device(check)


TOP_P_CASES = [  # (shape, kind, dtype, p, min_tokens_to_keep)
    ((10,), "normal", F32, 0.9, 1),
    ((4, 10), "normal", F32, 0.5, 1),
    ((6, 10), "sharp", F32, 0.9, 1),
    ((6, 10), "flat", F32, 0.5, 1),
    ((6, 10), "flat", F32, 0.95, 1),
    ((2, 3, 9), "normal", F32, 0.7, 1),
    ((4, 10), "normal", F32, 1.0, 1),
    ((4, 30), "sharp", F32, 1.0, 1),
    ((6, 10), "normal", F64, 0.8, 1),
    ((4, 10), "normal", F32, 1e-6, 1),  # a tiny p: the most likely token only
    ((4, 10), "normal", F32, 1e-6, 3),
    ((6, 10), "normal", F32, 0.3, 4),
    ((5, 20), "-inf", F32, 0.9, 1),
    ((5, 20), "-inf", F32, 1.0, 1),
    ((5, 20), "-inf", F32, 0.6, 8),
    ((4, 50), "normal", BF16, 0.9, 1),
    ((4, 50), "normal", F16, 0.7, 2),
    ((1, 1), "normal", F32, 0.5, 1),
    ((2, 1000), "normal", F32, 0.9, 1),
    ((8, 6), "normal", F64, 0.6, 1),
]


def check_top_p_filter(ns):
    fn = student(ns, "top_p_filter")
    lp = hf_processors()

    def check(device):
        for seed, (shape, kind, dtype, p, m) in enumerate(TOP_P_CASES):
            x = _logits(seed, shape, kind, dtype).to(device)
            what = f"top_p_filter({_describe_input(shape, kind, dtype)}, p={p}, min_tokens_to_keep={m}) on {device}"
            got = _call_filter(fn, "top_p_filter", x, p, min_tokens_to_keep=m, what=what)
            expected = ref.top_p_filter(x, p, m)
            hf = lp.TopPLogitsWarper(p, min_tokens_to_keep=m)(None, _as_2d(x)).reshape(shape) if lp else None
            if dtype in (BF16, F16):
                # The cumulative sum in half precision is coarse: computing it in float32 is fine too.
                in_f32 = x.masked_fill(~torch.isfinite(ref.top_p_filter(x.float(), p, m)), -INF)
                if torch.equal(got.detach().cpu(), in_f32.cpu()):
                    continue
            against = "the reference (sort ascending, drop the tokens whose cumulative probability is <= 1 - p: the " \
                      "token that crosses p is kept; the min_tokens_to_keep most likely always stay)"
            _compare_filtered(got, expected, x, what, against)
            if hf is not None:
                _compare_filtered(got, hf, x, what, "HF's TopPLogitsWarper")

    with single_thread():
        on_each_device(check)


SAMPLE_CASES = [  # (B, V, kind, dtype, settings); a seed for the generator and the logits
    (1, 10, "normal", F32, {}),
    (8, 10, "normal", F32, {}),
    (32, 20, "normal", F64, {}),
    (16, 12, "normal", F32, dict(temperature=0.5)),
    (16, 12, "normal", F32, dict(temperature=2.0)),
    (16, 12, "ties", F32, dict(top_k=1)),
    (16, 12, "normal", F32, dict(top_k=4)),
    (16, 12, "normal", F32, dict(top_k=40)),
    (16, 12, "normal", F32, dict(top_p=0.9)),
    (16, 12, "normal", F32, dict(top_p=1.0)),
    (32, 12, "normal", F32, dict(temperature=3.0, top_p=0.3)),  # the temperature comes first
    (32, 12, "normal", F32, dict(temperature=0.4, top_p=0.8)),
    (32, 12, "normal", F32, dict(top_k=3, top_p=0.5)),  # top-k before top-p
    (32, 20, "normal", F64, dict(temperature=0.8, top_k=8, top_p=0.9)),
    (8, 20, "-inf", F32, dict(temperature=1.5, top_p=0.95)),
]
GLOBAL_GENERATOR_CASE = (8, 10, "normal", F32, dict(temperature=0.9))


def _settings_text(settings: dict) -> str:
    return "".join(f", {k}={v}" for k, v in settings.items())


def check_sample_next(ns):
    fn = student(ns, "sample_next")
    hf_processors()  # so that the guard knows HF's warpers

    def reference_filters():
        return swapped(ns, apply_temperature=ref.apply_temperature, top_k_filter=ref.top_k_filter,
                       top_p_filter=ref.top_p_filter)

    def compare(got, expected, B, what):
        _check_tensor(got, shape=(B,), dtype=torch.int64, device=expected.device, what=what, name="the ids")
        if not torch.equal(got.cpu(), expected.cpu()):
            rows = (got.cpu() != expected.cpu()).nonzero().flatten().tolist()
            raise GradingFailure(f"{what}: drew {got.tolist()[:16]}, the reference draws {expected.tolist()[:16]} from "
                                 f"the same generator state ({len(rows)} of {B} rows differ, e.g. row {rows[0]}): "
                                 f"temperature, then top-k, then top-p, then the softmax over the vocabulary, then "
                                 f"ONE torch.multinomial(probs, num_samples=1, generator=generator) for the batch")

    def check(device):
        for seed, (B, V, kind, dtype, settings) in enumerate(SAMPLE_CASES):
            x = _logits(seed, (B, V), kind, dtype).to(device)
            what = f"sample_next({_describe_input((B, V), kind, dtype)}, a generator{_settings_text(settings)}) on {device}"
            g_ref, g_mine = (torch.Generator(device).manual_seed(seed) for _ in range(2))
            expected = ref.sample_next(x, g_ref, **settings)
            before = x.clone()
            with reference_filters(), _no_shortcuts(_own("sample_next")):
                got = call_student(fn, x, g_mine, **settings, what=what)
            _unchanged(x, before, what)
            compare(got, expected, B, what)
            if not torch.equal(torch.rand(4, generator=g_mine, device=device), torch.rand(4, generator=g_ref, device=device)):
                raise GradingFailure(f"{what}: the generator was not left as one torch.multinomial(probs, num_samples=1, "
                                     f"generator=generator) for the batch leaves it: draw nothing else")
        # without a generator: PyTorch's global one
        B, V, kind, dtype, settings = GLOBAL_GENERATOR_CASE
        x = _logits(99, (B, V), kind, dtype).to(device)
        what = f"sample_next({_describe_input((B, V), kind, dtype)}, generator=None{_settings_text(settings)}) on {device}"
        torch.manual_seed(99)
        expected = ref.sample_next(x, None, **settings)
        after = torch.rand(4, device=device)
        manual_seed(99, near=fn)  # the global generator of the process the student's code runs in
        with reference_filters(), _no_shortcuts(_own("sample_next")):
            got = call_student(fn, x, None, **settings, what=what)
        compare(got, expected, B, what)
        if not torch.equal(beside(fn, torch.rand)(4, device=device), after):
            raise GradingFailure(f"{what}: PyTorch's global generator must advance as one torch.multinomial does")

    with single_thread():
        on_each_device(check)


# --- part 2: greedy_decode, beam_search, no_repeat_ngram_mask -------------------------------------

def random_gpt(sizes: tuple, seed: int, scale: float = 1.0, dropout: float = 0.0) -> nn.Module:
    """Unit 05's reference GPT(V, block_size, n_layer, n_head, n_embd) initialized from ``seed`` (without
    touching the global generator), its 2-D weights multiplied by ``scale`` (peaked distributions), in
    eval mode on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ref05.GPT(*sizes, dropout=dropout)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model.eval()


def randomized_gpt(sizes: tuple, seed: int, std: float = 0.3, dropout: float = 0.0) -> nn.Module:
    """Unit 05's reference GPT with every parameter N(0, std) (LayerNorms and biases included), in eval mode."""
    model = random_gpt(sizes, seed, dropout=dropout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _gpt_text(sizes) -> str:
    V, block, L, h, C = sizes
    return f"GPT(vocab_size={V}, block_size={block}, n_layer={L}, n_head={h}, n_embd={C})"


def _prompt(seed, shape, V, device) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(1000 + seed)).to(device)


def _check_ids(got, expected, prompt, what, hint):
    """Token ids (..., T + n) against the reference's, with the prompt first."""
    _check_tensor(got, shape=expected.shape, dtype=torch.int64, device=expected.device, what=what, name="the ids")
    got, expected = got.cpu(), expected.cpu()
    T = prompt.size(-1)
    if not torch.equal(got[..., :T], prompt.cpu()):
        raise GradingFailure(f"{what}: the output must start with the prompt {prompt.cpu().tolist()!s:.120}, got "
                             f"{got[..., :T].tolist()!s:.120}")
    if not torch.equal(got, expected):
        rows = got.reshape(-1, got.size(-1)), expected.reshape(-1, got.size(-1))
        r = int((rows[0] != rows[1]).any(dim=-1).nonzero()[0])
        t = int((rows[0][r] != rows[1][r]).nonzero()[0])
        raise GradingFailure(f"{what}: row {r} differs from the reference at new token {t - T} (position {t}): got "
                             f"{rows[0][r, T:].tolist()!s:.150}, expected {rows[1][r, T:].tolist()!s:.150} ({hint})")


GREEDY_CASES = [  # (GPT sizes (V, block_size, n_layer, n_head, n_embd), weight scale, B, prompt length, max_new_tokens)
    ((11, 8, 1, 2, 16), 20, 1, 1, 12),  # a length-1 prompt, decoding past the block size
    ((13, 16, 2, 2, 8), 10, 3, 5, 6),
    ((7, 6, 1, 1, 8), 20, 2, 9, 4),  # a prompt longer than the block size
    ((20, 32, 2, 4, 16), 10, 4, 3, 0),  # nothing to generate
    ((9, 12, 3, 2, 12), 30, 2, 12, 3),  # a prompt of exactly block_size tokens
]


def check_greedy_decode(ns):
    fn = student(ns, "greedy_decode")

    def check(device):
        for seed, (sizes, scale, B, T, n) in enumerate(GREEDY_CASES):
            model = random_gpt(sizes, seed, scale).to(device)
            prompt = _prompt(seed, (B, T), sizes[0], device)
            what = f"greedy_decode(a random {_gpt_text(sizes)}, a prompt ({B}, {T}), max_new_tokens={n}) on {device}"
            expected = ref.greedy_decode(model, prompt, n)
            with _no_reference(_own("greedy_decode")):
                got = call_student(fn, model, prompt, n, what=what)
            _check_ids(got, expected, prompt, what, "the argmax over the vocabulary of the logits at the last "
                       "position, the model run on the last block_size tokens ids[:, -model.block_size:]")

    with single_thread():
        on_each_device(check)


BEAM_CASES = [  # (GPT sizes, seed, weight scale, prompt length, beam_width, max_new_tokens, length_penalty, eos_id)
    ((6, 16, 2, 2, 16), 0, 20, 3, 3, 5, 1.0, 2),
    ((6, 16, 2, 2, 16), 1, 20, 1, 2, 6, 0.0, 0),
    ((8, 16, 1, 2, 16), 2, 30, 4, 4, 5, 2.0, 3),
    ((8, 16, 1, 2, 16), 3, 10, 2, 5, 4, -1.0, 1),
    ((5, 8, 2, 1, 8), 4, 20, 10, 3, 4, 0.5, 4),  # a prompt longer than the block size
    ((6, 16, 2, 2, 16), 5, 20, 2, 1, 6, 1.0, None),  # beam_width 1: greedy
    ((7, 16, 1, 2, 16), 6, 15, 3, 4, 5, 1.0, None),
    ((6, 16, 2, 2, 16), 7, 20, 2, 3, 1, 1.0, 5),  # one step
    ((5, 16, 1, 2, 8), 8, 10, 2, 3, 5, 0.0, 1),
    ((5, 16, 1, 2, 8), 9, 10, 1, 4, 5, 2.0, 0),
    # an eos candidate ranked below beam_width, above the last alive beam, would make the final list
    ((4, 16, 1, 2, 8), 83, 5, 2, 3, 5, 0.0, 0),
    ((7, 16, 1, 2, 8), 547, 8, 2, 4, 5, 0.5, 3),
    ((5, 16, 1, 2, 8), 529, 8, 2, 4, 5, -1.0, 4),
]
EXHAUSTIVE_CASES = [  # (V, seed, weight scale, prompt length, length_penalty, eos_id): 3 new tokens, width V ** 3
    (3, 0, 20, 2, 1.0, 2),
    (4, 1, 20, 1, 0.0, 0),
    (5, 2, 15, 3, 2.0, None),
    (4, 3, 25, 2, -1.0, 3),
    (3, 4, 10, 1, 0.5, None),
]
EXHAUSTIVE_NEW = 3


def exhaustive_search(model, prompt: torch.Tensor, max_new_tokens: int, length_penalty: float,
                      eos_id: int | None) -> list[tuple[list[int], float]]:
    """Every hypothesis of up to max_new_tokens new tokens (one ending at the first eos, or reaching the
    length), scored as beam_search scores them, best first: (ids, score)."""
    hypotheses = []
    frontier = [(prompt.tolist(), 0.0)]
    for step in range(1, max_new_tokens + 1):
        batch = torch.tensor([ids for ids, _ in frontier], device=prompt.device)[:, -model.block_size:]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(batch)[0][:, -1].double(), dim=-1).tolist()
        grown = []
        for (ids, total), row in zip(frontier, logprobs, strict=True):
            for token, lp in enumerate(row):
                if token == eos_id:
                    hypotheses.append((ids + [token], (total + lp) / step ** length_penalty))
                else:
                    grown.append((ids + [token], total + lp))
        frontier = grown
    hypotheses += [(ids, total / max_new_tokens ** length_penalty) for ids, total in frontier]
    return sorted(hypotheses, key=lambda h: h[1], reverse=True)


def _hypotheses(got, what) -> list[tuple[list[int], float]]:
    if not isinstance(got, (list, tuple)):
        raise GradingFailure(f"{what}: beam_search must return a list of (ids, score) pairs, got {type(got).__name__}")
    out = []
    for h in got:
        if not (isinstance(h, (list, tuple)) and len(h) == 2):
            raise GradingFailure(f"{what}: each hypothesis must be a pair (ids: a list of ints, score: a float), got "
                                 f"{h!r:.100}")
        ids, score = h
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        try:
            out.append(([int(i) for i in ids], float(score)))
        except (TypeError, ValueError) as err:
            raise GradingFailure(f"{what}: each hypothesis must be a pair (ids: a list of ints, score: a float), got "
                                 f"{h!r:.100}") from err
    return out


def _compare_hypotheses(got, expected, what, against):
    def shown(hypotheses) -> str:
        return "; ".join(f"{ids} ({score:.4f})" for ids, score in hypotheses[:6])

    if len(got) != len(expected):
        raise GradingFailure(f"{what}: you returned {len(got)} hypotheses, {against} {len(expected)}: got {shown(got)}; "
                             f"expected {shown(expected)}")
    for rank, ((ids, score), (e_ids, e_score)) in enumerate(zip(got, expected, strict=True)):
        if ids != e_ids:
            raise GradingFailure(f"{what}: hypothesis {rank} (best first) is {ids} (score {score:.6f}), {against} "
                                 f"{e_ids} (score {e_score:.6f}); got {shown(got)}; expected {shown(expected)}")
        assert_close(score, e_score, atol=1e-6, rtol=1e-5,
                     what=f"{what}: the score of hypothesis {rank} {ids} (the sum of the generated tokens' log-probs "
                          f"/ n ** length_penalty, n = the number of generated tokens, eos included)")


def check_beam_search(ns):
    fn = student(ns, "beam_search")

    def check(device):
        for sizes, seed, scale, T, width, n, lp, eos in BEAM_CASES:
            model = random_gpt(sizes, seed, scale).to(device)
            prompt = _prompt(seed, (T,), sizes[0], device)
            what = (f"beam_search(a random {_gpt_text(sizes)} (seed {seed}), a prompt of {T} tokens, beam_width={width}, "
                    f"max_new_tokens={n}, length_penalty={lp}, eos_id={eos}) on {device}")
            expected = ref.beam_search(model, prompt, width, n, lp, eos)
            with _no_reference(_own("beam_search")):
                got = _hypotheses(call_student(fn, model, prompt, width, n, length_penalty=lp, eos_id=eos, what=what),
                                  what)
            _compare_hypotheses(got, expected, what, "the reference returns")
        for V, seed, scale, T, lp, eos in EXHAUSTIVE_CASES:
            sizes = (V, 8, 1, 2, 8)
            model = random_gpt(sizes, 100 + seed, scale).to(device)
            prompt = _prompt(100 + seed, (T,), V, device)
            width = V ** EXHAUSTIVE_NEW
            what = (f"beam_search(a random {_gpt_text(sizes)}, a prompt of {T} tokens, beam_width={width} (the whole "
                    f"tree), max_new_tokens={EXHAUSTIVE_NEW}, length_penalty={lp}, eos_id={eos}) on {device}")
            expected = exhaustive_search(model, prompt, EXHAUSTIVE_NEW, lp, eos)
            with _no_reference(_own("beam_search")):
                got = _hypotheses(call_student(fn, model, prompt, width, EXHAUSTIVE_NEW, length_penalty=lp, eos_id=eos,
                                               what=what), what)
            _compare_hypotheses(got, expected[:width], what, "an exhaustive search finds")

    with single_thread():
        on_each_device(check)


NO_REPEAT_CASES = [  # (B, T, n, vocab_size, ids drawn from 0 .. high - 1)
    (1, 10, 2, 5, 3),
    (3, 20, 3, 6, 3),
    (4, 30, 4, 4, 2),
    (2, 8, 1, 10, 6),
    (5, 12, 2, 7, 7),
    (2, 2, 3, 5, 5),  # T = n - 1: no n-gram yet
    (3, 3, 3, 5, 2),  # T = n
    (1, 1, 2, 5, 5),
    (2, 1, 3, 5, 5),  # fewer than n - 1 tokens
    (3, 40, 5, 3, 2),
    (2, 16, 16, 4, 2),  # n = T
    (2, 6, 3, 50, 2),
    (4, 25, 2, 12, 12),
]


def check_no_repeat_ngram_mask(ns):
    fn = student(ns, "no_repeat_ngram_mask")
    lp = hf_processors()

    def check(device):
        for seed, (B, T, n, vocab, high) in enumerate(NO_REPEAT_CASES):
            ids = torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)
            what = f"no_repeat_ngram_mask(ids {ids.tolist()!s:.100} ({B}, {T}), n={n}, vocab_size={vocab}) on {device}"
            with _no_shortcuts(_own("no_repeat_ngram_mask")):
                got = call_student(fn, ids, n, vocab, what=what)
            _check_tensor(got, shape=(B, vocab), dtype=torch.bool, device=device, what=what, name="the mask")
            expected = [ref.no_repeat_ngram_mask(ids, n, vocab).cpu()]
            if lp is not None:
                scores = lp.NoRepeatNGramLogitsProcessor(n)(ids, torch.zeros(B, vocab, device=device))
                expected.append(torch.isfinite(scores).cpu())
            for mask, against in zip(expected, ("the reference", "HF's NoRepeatNGramLogitsProcessor"), strict=False):
                if not torch.equal(got.cpu(), mask):
                    r = int((got.cpu() != mask).any(dim=-1).nonzero()[0])
                    mine, theirs = ((~m[r]).nonzero().flatten().tolist() for m in (got.cpu(), mask))
                    raise GradingFailure(f"{what}: row {r} {ids[r].tolist()!s:.100}: you ban {mine}, "
                                         f"{against} bans {theirs} (a token x is banned when the last n - 1 "
                                         f"tokens followed by x already occur in the row; True = allowed)")

    with single_thread():
        on_each_device(check)


# --- part 3: forward_with_cache and generate ------------------------------------------------------

CACHE_CASES = [  # (GPT sizes, dropout (in eval mode), dtype, B, chunk sizes)
    ((11, 16, 1, 2, 16), 0.0, F32, 2, [1] * 10),  # one token at a time
    ((11, 16, 2, 4, 16), 0.1, F32, 3, [6, 1, 1, 1]),  # a prefill, then one token at a time
    ((13, 12, 3, 2, 12), 0.0, F32, 1, [3, 1, 4, 2, 2]),  # uneven chunks, up to the block size
    ((9, 10, 2, 1, 8), 0.0, F64, 2, [4, 3, 3]),
    ((7, 8, 1, 2, 8), 0.0, F32, 4, [8]),  # one chunk, the whole block, no cache
    ((11, 16, 2, 2, 16), 0.2, F64, 1, [1, 5, 1]),
]


def _cache_tol(dtype) -> float:
    return 2e-5 if dtype == F32 else 1e-10


def _check_cache(cache, expected, what, tol):
    if not isinstance(cache, (list, tuple)):
        raise GradingFailure(f"{what}: the cache must be a list with one (k, v) pair per block, got "
                             f"{type(cache).__name__}")
    if len(cache) != len(expected):
        raise GradingFailure(f"{what}: the cache has {len(cache)} entries, expected one (k, v) pair per block: "
                             f"{len(expected)}")
    for layer, (pair, (k, v)) in enumerate(zip(cache, expected, strict=True)):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise GradingFailure(f"{what}: cache[{layer}] must be a pair (k, v), got {type(pair).__name__}")
        for name, got, e in zip("kv", pair, (k, v), strict=True):
            where = f"{what}: cache[{layer}] {name} (B, n_head, P + T_new, head_dim), as the projection gives it"
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(e.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise GradingFailure(f"{where}: got {shape}, expected shape {tuple(e.shape)}")
            assert_close(got, e, atol=tol, rtol=tol, what=where)


def check_forward_with_cache(ns):
    fn = student(ns, "forward_with_cache")

    def check(device):
        for seed, (sizes, dropout, dtype, B, chunks) in enumerate(CACHE_CASES):
            model = randomized_gpt(sizes, seed, dropout=dropout).to(dtype).to(device)
            ids = _prompt(seed, (B, sum(chunks)), sizes[0], device)
            with torch.no_grad():
                full = model(ids)[0]
            tol = _cache_tol(dtype)
            name = (f"forward_with_cache on a random {_gpt_text(sizes)}{f' (dropout {dropout}, eval mode)' * bool(dropout)}, "
                    f"{_dtype_name(dtype)}, {B} sequence(s) of {sum(chunks)} tokens fed in chunks of {chunks}, on {device}")
            cache, ref_cache, past = None, None, 0
            for i, T in enumerate(chunks):
                chunk = ids[:, past:past + T]
                what = f"{name}: chunk {i} (tokens {past} .. {past + T - 1}, cache {'None' if cache is None else past})"
                with torch.no_grad():
                    _, ref_cache = ref.forward_with_cache(model, chunk, ref_cache)
                    with forbid(ref05.GPT, _own("forward_with_cache"),
                                reason="Run the model's modules yourself on the new tokens: calling the whole model "
                                       "(model(...)) and the course's reference are not allowed here."):
                        got = call_student(fn, model, chunk, cache, what=what)
                if not (isinstance(got, (tuple, list)) and len(got) == 2):
                    raise GradingFailure(f"{what}: forward_with_cache must return (logits, cache), got {got!r:.100}")
                logits, cache = got
                _check_tensor(logits, shape=(B, T, sizes[0]), dtype=dtype, device=device, what=what, name="the logits")
                assert_close(logits, full[:, past:past + T], atol=tol, rtol=tol,
                             what=f"{what}: the logits against model(all {sum(chunks)} tokens)[0][:, {past}:{past + T}] "
                                  f"(new tokens at positions P .. P + T_new - 1; query i sees the P cached keys and "
                                  f"the new keys 0 .. i)")
                _check_cache(cache, ref_cache, what, tol)
                past += T

    with single_thread():
        on_each_device(check)


GENERATE_CASES = [  # (GPT sizes, weight scale, B, prompt length, max_new_tokens, settings, use_cache)
    ((11, 40, 2, 2, 16), 20, 3, 5, 20, dict(greedy=True), True),
    ((11, 40, 2, 2, 16), 20, 3, 5, 20, dict(greedy=True), False),
    ((13, 24, 1, 2, 16), 10, 1, 1, 23, dict(temperature=0.8, top_k=5, top_p=0.9), True),  # up to the block size
    ((13, 24, 1, 2, 16), 10, 2, 4, 12, dict(temperature=1.3), True),
    ((13, 24, 1, 2, 16), 10, 2, 4, 12, dict(top_p=0.7), False),
    ((9, 8, 2, 1, 8), 20, 2, 11, 6, dict(), False),  # a prompt longer than the block size
    ((9, 8, 2, 1, 8), 20, 2, 3, 9, dict(greedy=True), False),  # past the block size
    ((20, 32, 2, 4, 16), 10, 4, 8, 10, dict(top_k=3), True),
    ((20, 32, 2, 4, 16), 3, 3, 2, 15, dict(temperature=0.7, top_p=0.8), True),
]
SPEEDUP = 3.0
TIMED_MODEL = (65, 288, 4, 4, 128)  # nanoGPT's CPU model size, with room for 256 new tokens
TIMED_NEW, TIMED_PROMPT = 256, 16


def _forward_with_cache_kept_here(model, idx, cache=None):
    """The reference forward_with_cache, whose cache stays on the grader's side of the wire (the
    student's generate only hands it back): a step sends the new token and gets its logits."""
    logits, cache = ref.forward_with_cache(model, idx, cache)
    return logits, by_handle(cache)


def _generate_student(ns, fn, *args, what, **kwargs):
    with swapped(ns, sample_next=ref.sample_next, forward_with_cache=_forward_with_cache_kept_here), \
            _no_reference(_own("generate")):
        return call_student(fn, *args, what=what, **kwargs)


def timed_model() -> tuple[nn.Module, torch.Tensor]:
    """The model and prompt of the speed test (its wte scaled up: no near-ties in the greedy tokens)."""
    model = random_gpt(TIMED_MODEL, 0)
    with torch.no_grad():
        model.wte.weight.mul_(10)
    return model, _prompt(0, (1, TIMED_PROMPT), TIMED_MODEL[0], "cpu")


def _timed_where_generate_runs(ns, fn, model, prompt):
    """How the student's generate is timed: (the model it gets, the swaps, the wire time to subtract
    per answered call). Where generate runs in the kernel and the student's own forward_with_cache
    is right on the timed model, a copy of the model is built in the kernel and generate runs there
    with the student's forward_with_cache, as in the notebook's own speed test: no round trips.
    Otherwise it calls the reference forward_with_cache here, and the round trips are subtracted."""
    swaps = {"sample_next": ref.sample_next}
    GPT = beside(fn, ref05.GPT)
    own = ns.get("forward_with_cache") if GPT is not ref05.GPT else None
    if own is not None:
        try:
            with torch.no_grad(), _no_reference(ref05.GPT, _own("forward_with_cache")):
                logits, cache = own(model, prompt, None)
                step, _ = own(model, prompt[:, -1:], cache)
            expected, ref_cache = ref.forward_with_cache(model, prompt, None)
            expected_step, _ = ref.forward_with_cache(model, prompt[:, -1:], ref_cache)
            own_is_right = all(isinstance(t, torch.Tensor) and t.shape == e.shape
                               and torch.allclose(t, e, atol=1e-4, rtol=1e-4)
                               for t, e in ((logits, expected), (step, expected_step)))
        except Exception:  # noqa: BLE001  (graded by check_forward_with_cache)
            own_is_right = False
        if own_is_right:
            kernel_model = load_weights(GPT(*TIMED_MODEL), model.state_dict()).eval()
            return kernel_model, swaps, 0.0
    swaps["forward_with_cache"] = _forward_with_cache_kept_here
    return model, swaps, round_trip_seconds(fn)


def cache_speedup(ns, fn, attempts: int = 2) -> tuple[float, str]:
    """(how many times faster the student's cached generate is than the reference's uncached one, the
    timings) on the CPU with one thread; tokens checked too. Re-timed (up to ``attempts`` runs in all)
    while below SPEEDUP: the best ratio counts."""
    model, prompt = timed_model()
    what = (f"generate({_gpt_text(TIMED_MODEL)}, a prompt (1, {TIMED_PROMPT}), {TIMED_NEW}, greedy=True, "
            f"use_cache=True) on the CPU")

    def student_run(n):
        with swapped(ns, **swaps), _no_reference(_own("generate")):
            return call_student(fn, timed, prompt, n, greedy=True, use_cache=True, what=what)

    with single_thread(), single_thread_where(fn):
        timed, swaps, round_trip = _timed_where_generate_runs(ns, fn, model, prompt)
        ref.generate(model, prompt, 4, greedy=True, use_cache=False)  # warm-up
        student_run(4)
        best, text = 0.0, ""
        for _ in range(attempts):
            start = time.perf_counter()
            expected = ref.generate(model, prompt, TIMED_NEW, greedy=True, use_cache=False)
            uncached = time.perf_counter() - start
            calls = served_calls(fn)
            start = time.perf_counter()
            got = student_run(TIMED_NEW)
            cached = time.perf_counter() - start
            cached = max(cached - (served_calls(fn) - calls) * round_trip, 1e-3)
            _check_ids(got, expected, prompt, what, "the same tokens as the reference's uncached run")
            ratio = uncached / cached
            if ratio > best:
                best, text = ratio, f"{cached:.2f} s against the reference's {uncached:.2f} s without the cache"
            if best >= SPEEDUP:
                break
    return best, text


def check_generate(ns):
    fn = student(ns, "generate")

    def check(device):
        for seed, (sizes, scale, B, T, n, settings, use_cache) in enumerate(GENERATE_CASES):
            model = random_gpt(sizes, seed, scale).to(device)
            prompt = _prompt(seed, (B, T), sizes[0], device)
            what = (f"generate(a random {_gpt_text(sizes)}, a prompt ({B}, {T}), {n}, a generator"
                    f"{_settings_text(settings)}, use_cache={use_cache}) on {device}, with the reference sample_next "
                    f"and forward_with_cache")
            g_ref, g_mine = (torch.Generator(device).manual_seed(seed) for _ in range(2))
            expected = ref.generate(model, prompt, n, g_ref, **settings, use_cache=use_cache)
            got = _generate_student(ns, fn, model, prompt, n, g_mine, **settings, use_cache=use_cache, what=what)
            hint = ("with the cache: forward_with_cache on the whole prompt once, then on the newest token only, "
                    "carrying the cache" if use_cache else
                    "without the cache: the model on the last block_size tokens ids[:, -model.block_size:]")
            pick = "the argmax" if settings.get("greedy") else "sample_next(logits, generator, temperature, top_k, top_p)"
            _check_ids(got, expected, prompt, what, f"{hint}; each step takes the logits at the LAST position, then "
                                                    f"{pick}")
            if not torch.equal(torch.rand(4, generator=g_mine, device=device), torch.rand(4, generator=g_ref, device=device)):
                raise GradingFailure(f"{what}: the generator was not left as the reference leaves it: one sample_next "
                                     f"per new token (none when greedy), nothing else drawn")

    with single_thread():
        on_each_device(check)
    ratio, timings = cache_speedup(ns, fn)
    if ratio < SPEEDUP:
        raise GradingFailure(f"generate({_gpt_text(TIMED_MODEL)}, {TIMED_NEW} new tokens, greedy=True, use_cache=True) "
                             f"on the CPU (one thread) must be at least {SPEEDUP:g}x faster than the reference's "
                             f"generate(..., use_cache=False); it is {ratio:.2f}x ({timings}). With the cache, run "
                             f"forward_with_cache on the prompt once, then on the ONE newest token per step")


# --- part 4: speculative decoding -------------------------------------------------------------------

SPEC_PAIRS = {  # name: (target GPT sizes, seed, scale), (draft GPT sizes, seed, scale) or None (the target itself)
    "a 2-layer target and a 1-layer draft of half its width": (((7, 16, 2, 2, 16), 0, 4), ((7, 16, 1, 2, 8), 1, 4)),
    "a target that is its own draft": (((7, 16, 2, 2, 16), 2, 4), None),
    "a target and a draft with a block size of 6": (((5, 6, 1, 2, 8), 3, 5), ((5, 6, 1, 1, 8), 4, 5)),
    "a peaked target and a flatter draft": (((6, 24, 1, 2, 16), 5, 10), ((6, 24, 1, 2, 8), 6, 2)),
}
SPEC_CASES = [  # (pair, prompt length, k, max_new_tokens); the generator is seeded with the case's index
    ("a 2-layer target and a 1-layer draft of half its width", 3, 4, 12),
    ("a 2-layer target and a 1-layer draft of half its width", 1, 2, 9),
    ("a 2-layer target and a 1-layer draft of half its width", 2, 1, 6),
    ("a 2-layer target and a 1-layer draft of half its width", 3, 0, 5),
    ("a 2-layer target and a 1-layer draft of half its width", 2, 4, 1),
    ("a 2-layer target and a 1-layer draft of half its width", 2, 2, 2),
    ("a target that is its own draft", 2, 4, 10),
    ("a target that is its own draft", 1, 1, 3),
    ("a target and a draft with a block size of 6", 8, 2, 7),  # a prompt longer than the block size
    ("a target and a draft with a block size of 6", 4, 4, 8),
    ("a peaked target and a flatter draft", 2, 2, 10),
    ("a peaked target and a flatter draft", 1, 4, 12),
    ("a peaked target and a flatter draft", 3, 1, 7),
]
SPEC_SAMPLES = 2000  # runs of the statistical test
SPEC_STAT_K, SPEC_STAT_NEW = 2, 3  # each run: k=2, 3 new tokens; the first two are tabulated
CHI2_ALPHA_Z = 3.090232  # the standard normal's 0.999 quantile: a test at the 0.1% level


# The statistical test's models are ``MarkovLM``s from the course package, so that they can be built
# where the student's speculative_decode runs (its 2000 runs then cost one round trip).
Markov = MarkovLM


# The statistical test's models: the draft disagrees strongly with the target, so that about half of the
# proposals are rejected, and resampling from the target instead of the residual is far off.
STAT_TARGET = [[0.50, 0.30, 0.15, 0.05],
               [0.10, 0.20, 0.30, 0.40],
               [0.25, 0.25, 0.25, 0.25],
               [0.60, 0.05, 0.05, 0.30]]
STAT_DRAFT = [[0.05, 0.15, 0.30, 0.50],
              [0.40, 0.30, 0.20, 0.10],
              [0.70, 0.10, 0.10, 0.10],
              [0.10, 0.60, 0.20, 0.10]]
STAT_PROMPT = [0]


def spec_models(name: str, device) -> tuple[nn.Module, nn.Module]:
    target_spec, draft_spec = SPEC_PAIRS[name]
    target = random_gpt(target_spec[0], target_spec[1], target_spec[2]).to(device)
    draft = target if draft_spec is None else random_gpt(draft_spec[0], draft_spec[1], draft_spec[2]).to(device)
    return target, draft


def _stats(got, what) -> dict:
    if not isinstance(got, dict) or set(got) != {"target_calls", "drafted", "accepted"}:
        keys = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise GradingFailure(f"{what}: the stats must be a dict with the keys 'target_calls', 'drafted' and "
                             f"'accepted', got {keys}")
    try:
        return {key: int(value) for key, value in got.items()}
    except (TypeError, ValueError) as err:
        raise GradingFailure(f"{what}: the stats must be counts, got {got!r:.100}") from err


def _spec_student(fn, *args, what):
    with _no_reference(_own("speculative_decode")):
        got = call_student(fn, *args, what=what)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise GradingFailure(f"{what}: speculative_decode must return (ids, stats), got {got!r:.100}")
    return got[0], _stats(got[1], what)


def two_token_distribution(target, prompt: torch.Tensor) -> dict[tuple[int, int], float]:
    """The target's exact probability of each first two new tokens (x1, x2), by enumeration."""
    with torch.no_grad():
        first = torch.softmax(target(prompt[None])[0][0, -1].double(), dim=-1)
        V = first.numel()
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V, device=prompt.device)[:, None]], dim=1)
        second = torch.softmax(target(seqs)[0][:, -1].double(), dim=-1)
    return {(a, b): float(first[a] * second[a, b]) for a in range(V) for b in range(V)}


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int, float]:
    """Pearson's statistic of the observed ``counts`` against ``probs`` (cells expecting fewer than 5 are
    pooled into one), its degrees of freedom and the critical value at the 0.1% level (Wilson-Hilferty)."""
    stat, bins, pooled_expected, pooled_seen = 0.0, 0, 0.0, 0
    for cell in sorted(probs, key=probs.get):
        expected, seen = n * probs[cell], counts.get(cell, 0)
        if expected < 5:
            pooled_expected, pooled_seen = pooled_expected + expected, pooled_seen + seen
            continue
        stat, bins = stat + (seen - expected) ** 2 / expected, bins + 1
    if pooled_expected > 0:
        stat, bins = stat + (pooled_seen - pooled_expected) ** 2 / pooled_expected, bins + 1
    df = max(bins - 1, 1)
    critical = df * (1 - 2 / (9 * df) + CHI2_ALPHA_Z * math.sqrt(2 / (9 * df))) ** 3
    return stat, df, critical


def speculative_counts(fn, device="cpu", samples: int = SPEC_SAMPLES) -> dict[tuple[int, int], int]:
    """How often each first two tokens come out of ``samples`` runs of ``fn`` on the statistical test's
    models (one generator, seeded once)."""
    here = beside(fn, MarkovLM)
    target, draft = here(STAT_TARGET).to(device), here(STAT_DRAFT).to(device)
    prompt = torch.tensor(STAT_PROMPT, device=device)
    generator = torch.Generator(device).manual_seed(2024)
    counts = {}
    what = (f"speculative_decode(target, draft, prompt {STAT_PROMPT}, k={SPEC_STAT_K}, max_new_tokens={SPEC_STAT_NEW}, "
            f"generator) with two Markov models over 4 tokens, {samples} runs")
    with _no_reference(_own("speculative_decode")):
        runs = call_student(beside(fn, repeated_calls), fn,
                            [target, draft, prompt, SPEC_STAT_K, SPEC_STAT_NEW, generator], samples, what=what)
        for got in runs:
            if not (isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], torch.Tensor)):
                raise GradingFailure(f"{what}: speculative_decode must return (ids, stats), got {got!r:.100}")
            ids = got[0].tolist()
            if len(ids) != len(STAT_PROMPT) + SPEC_STAT_NEW:
                raise GradingFailure(f"{what}: expected {len(STAT_PROMPT) + SPEC_STAT_NEW} ids, got {ids}")
            cell = tuple(ids[len(STAT_PROMPT):len(STAT_PROMPT) + 2])
            counts[cell] = counts.get(cell, 0) + 1
    return counts


def check_speculative_decode(ns):
    fn = student(ns, "speculative_decode")

    def check(device):
        models = {}
        for seed, (name, T, k, n) in enumerate(SPEC_CASES):
            if name not in models:
                models[name] = spec_models(name, device)
            target, draft = models[name]
            V = target.lm_head.out_features
            prompt = _prompt(seed, (T,), V, device)
            what = (f"speculative_decode({name} (random GPTs), a prompt of {T} tokens, k={k}, max_new_tokens={n}, a "
                    f"generator seeded with {seed}) on {device}")
            g_ref, g_mine = (torch.Generator(device).manual_seed(seed) for _ in range(2))
            expected, expected_stats = ref.speculative_decode(target, draft, prompt, k, n, g_ref)
            ids, stats = _spec_student(fn, target, draft, prompt, k, n, g_mine, what=what)
            _check_ids(ids, expected, prompt, what,
                       "per round, kr = min(k, r - 1) proposals, each one torch.multinomial from the draft's softmax; "
                       "ONE target call; per proposal one torch.rand(1, generator=generator, device=...), accepted if "
                       "u < p(x) / q(x); at the first rejection one draw from normalize(max(0, p - q)); if all were "
                       "accepted, a bonus draw from the target's last distribution")
            assert_equal(stats, expected_stats, what=f"{what}: the stats (totals over the rounds: one target call per "
                                                     f"round, drafted = the sum of kr, accepted proposals)")
            if not torch.equal(torch.rand(4, generator=g_mine, device=device), torch.rand(4, generator=g_ref, device=device)):
                raise GradingFailure(f"{what}: the generator was not left as the reference leaves it: draw exactly the "
                                     f"draft's proposals, one uniform per verified proposal and one last token per round")

    with single_thread():
        on_each_device(check)
        # The distribution: the first two tokens of many runs against the target's exact distribution.
        counts = speculative_counts(fn)
        probs = two_token_distribution(Markov(STAT_TARGET), torch.tensor(STAT_PROMPT))
        impossible = sorted(cell for cell in counts if probs.get(cell, 0.0) == 0.0)
        stat, df, critical = chi_square(counts, probs, SPEC_SAMPLES)
        if impossible or not stat <= critical:
            worst = sorted(probs, key=lambda c: -abs(counts.get(c, 0) - SPEC_SAMPLES * probs[c]))[:3]
            shown = ", ".join(f"{cell}: {counts.get(cell, 0)} times, expected {SPEC_SAMPLES * probs[cell]:.0f}"
                              for cell in worst)
            raise GradingFailure(
                f"speculative_decode (target and draft: two Markov models over 4 tokens with very different "
                f"distributions, prompt {STAT_PROMPT}, k={SPEC_STAT_K}, max_new_tokens={SPEC_STAT_NEW}, {SPEC_SAMPLES} "
                f"runs from one seeded generator): the first two tokens do not follow the target's distribution: "
                f"chi-square {stat:.1f} with {df} degrees of freedom, above the critical value {critical:.1f} (0.1% "
                f"level). The tokens drawn most off: {shown}. A rejected proposal must be replaced by a draw from the "
                f"residual normalize(max(0, p - q)), not from p; accept x when u < p(x) / q(x)")
