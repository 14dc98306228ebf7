"""Unit 07 (sampling and decoding): the reference against Hugging Face's logits processors and an
exhaustive search, the statistics of the speculative-decoding check, lazy stubs, and the mistakes
students really make, each of which must cost points exactly once. The tests every unit gets (release
stubs, notebook structure, visible tests, whole cells) come from ``unit_harness``.

Plain pytest, no Jupyter kernel: a notebook namespace is a dict of names, as the hidden tests
receive ``globals()`` from the grading kernel.

Parts: each test cell's part is every graded name its visible tests can reach, directly or through the
student's own functions (``generate`` calls the student's ``sample_next`` and ``forward_with_cache``,
which calls the student's filters). The hidden checks read only the name they grade (the parts graded
elsewhere are swapped in: test_each_check_reads_only_its_own_name), so a mutant's hidden checks are
those of the names it overrides (``hidden_checks``); its other cells can fail only through their
visible tests, which the whole-cell test runs (``CASCADES``: the visible test cannot swap in the
reference). In the whole-cell test the visible speed test of ``generate`` (seconds) runs only for
mutants of ``generate`` and ``forward_with_cache``, the only names it calls.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from unit_harness import C, InNotebook, UnitUnderTest, common_tests

from autograder.hidden import unit07_decoding as hidden
from autograder.references import unit07_decoding as ref

UNIT = "07_decoding"
GRADED_NAMES = ["apply_temperature", "top_k_filter", "top_p_filter", "sample_next", "greedy_decode", "beam_search",
                "no_repeat_ngram_mask", "forward_with_cache", "generate", "speculative_decode"]
FILTERS = {"apply_temperature", "top_k_filter", "top_p_filter"}
SAMPLING = {"sample_next", *FILTERS}
PART_NAMES = {
    "apply_temperature": {"apply_temperature"},
    "top_k_filter": {"top_k_filter"},
    "top_p_filter": {"top_p_filter"},
    "sample_next": SAMPLING,  # the visible tests run the student's sample_next, hence their filters
    "greedy_decode": {"greedy_decode"},
    "beam_search": {"beam_search"},
    "no_repeat_ngram_mask": {"no_repeat_ngram_mask"},
    "forward_with_cache": {"forward_with_cache"},
    "generate": {"generate", "forward_with_cache", *SAMPLING},
    "speculative_decode": {"speculative_decode"},
}


def part_of(check: str) -> str:
    return check.removeprefix(C)


# The Bigram model of the beam-search cell is defined in the greedy cell: it runs before (on the reference).
U = UnitUnderTest(UNIT, hidden, graded_names=GRADED_NAMES, part_names=PART_NAMES, part_of=part_of,
                  helper_cell_ids=("notebook-imports", "test-greedy"))

pytestmark = pytest.mark.usefixtures("one_thread")

TEMP, TOPK, TOPP, SAMPLE = (C + n for n in ("apply_temperature", "top_k_filter", "top_p_filter", "sample_next"))
GREEDY, BEAM, NOREP = (C + n for n in ("greedy_decode", "beam_search", "no_repeat_ngram_mask"))
CACHE, GENERATE, SPEC = (C + n for n in ("forward_with_cache", "generate", "speculative_decode"))


def hidden_checks(overrides) -> set[str]:
    """The hidden checks a mutant can change: those of the names it overrides."""
    return {C + name for name in overrides}


# --- the reference against Hugging Face, an exhaustive search and the checks' cases --------------

def _hf():
    lp = hidden.hf_processors()
    if lp is None:
        pytest.skip("transformers is not installed")
    return lp


def _random_filter_case(seed):
    g = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=g))

    shape = (draw(1, 6), draw(1, 40)) if seed % 4 else (2, draw(1, 4), draw(1, 40))
    kind = ["normal", "sharp", "flat", "ties", "-inf"][seed % 5]
    x = hidden._logits(seed, shape, kind, [torch.float32, torch.float64, torch.bfloat16][seed % 3])
    k, p, m = draw(1, shape[-1] + 3), [1.0, 0.999, 0.9, 0.5, 0.1, 1e-4][seed % 6], draw(1, 4)
    return x, k, p, m, kind


def test_reference_filters_are_hugging_face_s():
    """Bitwise, on the hidden cases and 200 random ones (kinds, shapes, dtypes, k, p, min_tokens_to_keep)."""
    lp = _hf()
    flat = hidden._as_2d
    for seed, (shape, kind, dtype, t) in enumerate(hidden.TEMPERATURE_CASES):
        x = hidden._logits(seed, shape, kind, dtype)
        assert torch.equal(ref.apply_temperature(x, t), lp.TemperatureLogitsWarper(float(t))(None, flat(x)).reshape(shape))
    for seed, (shape, kind, dtype, k) in enumerate(hidden.TOP_K_CASES):
        x = hidden._logits(seed, shape, kind, dtype)
        assert torch.equal(ref.top_k_filter(x, k), lp.TopKLogitsWarper(k)(None, flat(x)).reshape(shape)), seed
    for seed, (shape, kind, dtype, p, m) in enumerate(hidden.TOP_P_CASES):
        x = hidden._logits(seed, shape, kind, dtype)
        hf = lp.TopPLogitsWarper(p, min_tokens_to_keep=m)(None, flat(x)).reshape(shape)
        assert torch.equal(ref.top_p_filter(x, p, m), hf), seed
    for seed in range(200):
        x, k, p, m, kind = _random_filter_case(seed)
        assert torch.equal(ref.top_k_filter(x, k), lp.TopKLogitsWarper(k)(None, flat(x)).reshape(x.shape)), seed
        hf = lp.TopPLogitsWarper(p, min_tokens_to_keep=m)(None, flat(x)).reshape(x.shape)
        assert torch.equal(ref.top_p_filter(x, p, m), hf), (seed, kind, p, m)


def test_reference_no_repeat_is_hugging_face_s():
    lp = _hf()
    cases = list(hidden.NO_REPEAT_CASES) + [(3, T, n, 6, high) for T in (1, 2, 5, 9, 30) for n in (1, 2, 3, 4, 6)
                                            for high in (2, 4)]
    for seed, (B, T, n, vocab, high) in enumerate(cases):
        ids = torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))
        hf = torch.isfinite(lp.NoRepeatNGramLogitsProcessor(n)(ids, torch.zeros(B, vocab)))
        assert torch.equal(ref.no_repeat_ngram_mask(ids, n, vocab), hf), (B, T, n, vocab)


def test_exhaustive_search_is_beam_search_at_full_width():
    """A beam as wide as the tree keeps every hypothesis: the reference returns exactly the enumeration."""
    for V, seed, scale, T, lp, eos in hidden.EXHAUSTIVE_CASES:
        model = hidden.random_gpt((V, 8, 1, 2, 8), seed, scale)
        prompt = hidden._prompt(seed, (T,), V, "cpu")
        expected = hidden.exhaustive_search(model, prompt, 3, lp, eos)
        got = ref.beam_search(model, prompt, V ** 3, 3, lp, eos)
        assert [ids for ids, _ in got] == [ids for ids, _ in expected]
        assert max(abs(a[1] - b[1]) for a, b in zip(got, expected, strict=True)) < 1e-12


def test_beam_cases_are_peaked():
    """No ranking near-ties: the candidates' summed log-probs are well apart, so rounding cannot reorder them."""
    for sizes, seed, scale, T, *_ in hidden.BEAM_CASES:
        model = hidden.random_gpt(sizes, seed, scale)
        prompt = hidden._prompt(seed, (T,), sizes[0], "cpu")
        with torch.no_grad():
            logprobs = torch.log_softmax(model(prompt[None, -model.block_size:])[0][0, -1].double(), -1)
        gaps = logprobs.sort().values.diff()
        assert gaps.min() > 1e-4, (seed, gaps.min())


def test_hidden_cases_cover_the_edges():
    assert any(k == 1 for *_, k in hidden.TOP_K_CASES) and any(kind == "ties" and k > 1 for _, kind, _, k in hidden.TOP_K_CASES)
    assert any(k > shape[-1] for shape, *_, k in hidden.TOP_K_CASES) and any(k == shape[-1] for shape, *_, k in hidden.TOP_K_CASES)
    assert {len(shape) for shape, *_ in hidden.TOP_K_CASES} >= {1, 2, 3}
    assert {len(shape) for shape, *_ in hidden.TOP_P_CASES} >= {1, 2, 3}
    assert any(p == 1.0 for _, _, _, p, _ in hidden.TOP_P_CASES) and any(p < 1e-3 for _, _, _, p, _ in hidden.TOP_P_CASES)
    assert any(m > 1 for *_, m in hidden.TOP_P_CASES) and any(kind == "-inf" for _, kind, *_ in hidden.TOP_P_CASES)
    for cases in (hidden.TEMPERATURE_CASES, hidden.TOP_K_CASES, hidden.TOP_P_CASES):
        assert {dtype for _, _, dtype, *_ in cases} == {torch.float32, torch.float64, torch.bfloat16, torch.float16}
    assert any(T > sizes[1] for sizes, _, _, T, _ in hidden.GREEDY_CASES) and any(T == 1 for *_, T, _ in hidden.GREEDY_CASES)
    assert any(T > sizes[1] and not cached for sizes, _, _, T, _, _, cached in hidden.GENERATE_CASES)
    assert any(T == 1 and cached for _, _, _, T, _, _, cached in hidden.GENERATE_CASES)
    assert {cached for *_, cached in hidden.GENERATE_CASES} == {True, False}
    assert {bool(s.get("greedy")) for *_, s, _ in hidden.GENERATE_CASES} == {True, False}
    assert any(len(set(chunks)) > 2 for *_, chunks in hidden.CACHE_CASES) and any(c == [1] * len(c) for *_, c in hidden.CACHE_CASES)
    assert {sizes[2] for sizes, *_ in hidden.CACHE_CASES} == {1, 2, 3} and len({sizes[3] for sizes, *_ in hidden.CACHE_CASES}) >= 3
    assert {dtype for _, _, dtype, *_ in hidden.CACHE_CASES} == {torch.float32, torch.float64}
    assert {lp for *_, lp, _ in hidden.BEAM_CASES} >= {0.0, 1.0, 2.0, -1.0, 0.5}
    assert {k for _, _, k, _ in hidden.SPEC_CASES} >= {0, 1, 2, 4} and any(n == 1 for *_, n in hidden.SPEC_CASES)


def test_speculative_cases_accept_and_reject():
    """The exact comparisons see rounds with a rejection (the residual), rounds where every proposal is
    accepted (the bonus token), and prompts longer than the block size."""
    rejected = all_accepted = longer = 0
    for seed, (name, T, k, n) in enumerate(hidden.SPEC_CASES):
        target, draft = hidden.spec_models(name, "cpu")
        prompt = hidden._prompt(seed, (T,), target.lm_head.out_features, "cpu")
        _, stats = ref.speculative_decode(target, draft, prompt, k, n, torch.Generator().manual_seed(seed))
        rejected += stats["drafted"] - stats["accepted"]
        all_accepted += stats["accepted"] == stats["drafted"] > 0
        longer += T > target.block_size
    assert rejected >= 10 and all_accepted >= 3 and longer >= 1


def test_speculative_statistics_have_power():
    """The target's distribution passes with a margin; resampling from the target instead of the residual
    fails by far. The critical values (Wilson-Hilferty) approximate the chi-square's quantiles."""
    probs = hidden.two_token_distribution(hidden.Markov(hidden.STAT_TARGET), torch.tensor(hidden.STAT_PROMPT))
    assert abs(sum(probs.values()) - 1) < 1e-9
    ns = U.reference_ns()
    stat, df, critical = hidden.chi_square(hidden.speculative_counts(ns["speculative_decode"]), probs, hidden.SPEC_SAMPLES)
    assert stat < 0.7 * critical, (stat, df, critical)
    # the resample-from-the-target mistake, exactly: min(p, q) + beta * p at a rejected position
    wrong = U.make_ns(MUTANTS["spec_resamples_from_the_target"][0])["speculative_decode"]
    stat, df, critical = hidden.chi_square(hidden.speculative_counts(wrong), probs, hidden.SPEC_SAMPLES)
    assert stat > 5 * critical, (stat, critical)
    for df, exact in ((1, 10.828), (5, 20.515), (15, 37.697), (30, 59.703)):  # chi-square 0.999 quantiles
        n = 10_000
        cells = {i: 1 / (df + 1) for i in range(df + 1)}
        assert hidden.chi_square({i: n / (df + 1) for i in cells}, cells, n)[1] == df
        approx = df * (1 - 2 / (9 * df) + hidden.CHI2_ALPHA_Z * (2 / (9 * df)) ** 0.5) ** 3
        assert abs(approx - exact) / exact < 0.05


def test_a_slow_cache_fails_the_speed_test():
    """Re-running forward_with_cache on the whole sequence at every step gives the right tokens, slowly."""
    ns = U.make_ns(MUTANTS[SLOW][0])
    ratio, timings = hidden.cache_speedup(ns, ns["generate"], attempts=1)
    print(f"\nre-feeding everything: {ratio:.2f}x ({timings})")
    assert ratio < 0.7 * hidden.SPEEDUP


def test_release_stubs_parse_and_raise():
    ns = U.release_ns()
    x = torch.zeros(2, 5)
    model = hidden.random_gpt((5, 8, 1, 1, 4), 0)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    calls = [lambda: ns["apply_temperature"](x, 1.0), lambda: ns["top_k_filter"](x, 2), lambda: ns["top_p_filter"](x, 0.5),
             lambda: ns["sample_next"](x), lambda: ns["greedy_decode"](model, prompt, 2),
             lambda: ns["beam_search"](model, prompt[0], 2, 2), lambda: ns["no_repeat_ngram_mask"](prompt, 2, 5),
             lambda: ns["forward_with_cache"](model, prompt), lambda: ns["generate"](model, prompt, 2),
             lambda: ns["speculative_decode"](model, model, prompt[0], 2, 2)]
    for call in calls:
        with pytest.raises(NotImplementedError):
            call()


def test_each_check_reads_only_its_own_name():
    """What ``hidden_checks`` relies on: a check reads its graded name from the namespace, and the
    reference of that name calls no other graded name but those the check swaps in."""
    swaps = {SAMPLE: FILTERS, GENERATE: {"sample_next", "forward_with_cache"}}
    for check in U.checks:
        src = inspect.getsource(getattr(hidden, check))
        assert set(re.findall(r'student\(ns, "(\w+)"\)', src)) == {check.removeprefix(C)}
        name = check.removeprefix(C)
        calls = set(hidden._own(name).__code__.co_names) & set(GRADED_NAMES)
        assert calls <= swaps.get(check, set()), (check, calls)
    for check, names in swaps.items():
        src = inspect.getsource(hidden) if check == GENERATE else inspect.getsource(getattr(hidden, check))
        assert all(re.search(rf"{n}=(ref\.{n}|_{n}_kept_here)\b", src) for n in names), check


# --- lazy stubs ---------------------------------------------------------------------------------

def lazy_ns() -> dict:
    def forward_with_cache(model, idx, cache=None):
        B, T = idx.shape
        return torch.zeros(B, T, model.lm_head.out_features, device=idx.device), cache or []

    def generate(model, prompt, max_new_tokens, generator=None, **settings):
        return torch.cat([prompt, prompt[:, -1:].expand(-1, max_new_tokens)], dim=1)

    def speculative_decode(target, draft, prompt, k, max_new_tokens, generator=None):
        ids = torch.cat([prompt, prompt[-1:].expand(max_new_tokens)])
        return ids, {"target_calls": max_new_tokens, "drafted": 0, "accepted": 0}

    return {
        "apply_temperature": lambda logits, temperature: logits.clone(),
        "top_k_filter": lambda logits, k: logits.clone(),
        "top_p_filter": lambda logits, p, min_tokens_to_keep=1: logits.clone(),
        "sample_next": lambda logits, generator=None, temperature=1.0, top_k=None, top_p=None: logits.argmax(-1),
        "greedy_decode": lambda model, prompt, max_new_tokens: generate(model, prompt, max_new_tokens),
        "beam_search": lambda model, prompt, beam_width, max_new_tokens, length_penalty=1.0, eos_id=None: [
            (prompt.tolist(), 0.0)],
        "no_repeat_ngram_mask": lambda ids, n, vocab_size: torch.ones(ids.size(0), vocab_size, dtype=torch.bool,
                                                                      device=ids.device),
        "forward_with_cache": forward_with_cache,
        "generate": generate,
        "speculative_decode": speculative_decode,
    }


# --- mutants: mistakes students really make -----------------------------------------------------

def mutant(name: str, *replacements, source: str | None = None) -> InNotebook:
    """The reference of ``name`` with ``(old, new)`` replacements (or a whole ``source``), defined in the
    notebook's namespace as a student's cell would be."""
    if source is None:
        head, doc, body = inspect.getsource(getattr(ref, name)).partition('"""\n')  # after the docstring
        for old, new in replacements:
            assert old in body, f"the mutant no longer applies: {old!r}"
            body = body.replace(old, new, 1)
        source = head + doc + body
    return InNotebook(name, source)


def applicable(name: str, *variants: list) -> list:
    """The first list of (old, new) replacements that applies to the reference of ``name``: a mutant that
    survives an equivalent rewrite of the solution (the score of beam_search inline or in a helper)."""
    body = inspect.getsource(getattr(ref, name)).partition('"""\n')[2]
    for replacements in variants:
        if all(old in body for old, _ in replacements):
            return replacements
    raise AssertionError(f"no variant of the mutant applies to the reference {name}")


def m(name, *replacements, source=None, fails=None):
    """A mutant entry: overrides and the hidden checks it fails (by default its own)."""
    return {name: mutant(name, *replacements, source=source)}, ({C + name} if fails is None else fails)


TOP_P_DESCENDING = '''
def top_p_filter(logits, p, min_tokens_to_keep=1):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative > p{shift}
    drop[..., :min_tokens_to_keep] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
'''
SHIFT = "\n    drop[..., 1:] = drop[..., :-1].clone()\n    drop[..., 0] = False"

SAMPLE_PER_ROW = '''
def sample_next(logits, generator=None, temperature=1.0, top_k=None, top_p=None):
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.cat([torch.multinomial(row, num_samples=1, generator=generator) for row in probs])
'''

NO_REPEAT_SIZE = '''
def _ngram_mask(ids, n, vocab_size):
    B, T = ids.shape
    allowed = torch.ones(B, vocab_size, dtype=torch.bool, device=ids.device)
    if T < n - 1:
        return allowed
    for b, row in enumerate(ids.tolist()):
        last = row[T - n + 1:]
        for start in range(T - n + 1):
            if row[start:start + n - 1] == last:
                allowed[b, row[start + n - 1]] = False
    return allowed


def no_repeat_ngram_mask(ids, n, vocab_size):
    return _ngram_mask(ids, n {sign} 1, vocab_size)
'''

CACHE_OF_NORMALIZED_X = '''
def forward_with_cache(model, idx, cache=None):
    """Caches each block's ln_1 output (B, P, C) and recomputes the keys and values from it."""
    B, T = idx.shape
    past = 0 if cache is None else cache[0][0].size(1)
    x = model.drop(model.wte(idx) + model.wpe(torch.arange(past, past + T, device=idx.device)))
    C = x.size(-1)
    mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(diagonal=past)
    new_cache = []
    for layer, block in enumerate(model.blocks):
        attn, h = block.attn, block.attn.n_heads
        a = block.ln_1(x)
        seen = a if cache is None else torch.cat([cache[layer][0], a], dim=1)
        new_cache.append((seen, seen))
        q = attn.q_proj(a).view(B, T, h, C // h).transpose(1, 2)
        k, v = (proj(seen).view(B, past + T, h, C // h).transpose(1, 2) for proj in (attn.k_proj, attn.v_proj))
        y = scaled_dot_product_attention(q, k, v, mask)
        x = x + block.dropout(attn.out_proj(y.transpose(1, 2).reshape(B, T, C)))
        x = x + block.dropout(block.mlp_proj(F.gelu(block.mlp_fc(block.ln_2(x)), approximate="tanh")))
    return model.lm_head(model.ln_f(x)), new_cache
'''

RESIDUAL = ("residual = (p[i] - q[i]).clamp(min=0)\n"
            "            last = torch.multinomial(residual / residual.sum(), num_samples=1, generator=generator)")
CONCAT = ("        if cache is not None:\n            k = torch.cat([cache[layer][0], k], dim=2)"
          "                    # (B, h, past + T, d)\n            v = torch.cat([cache[layer][1], v], dim=2)\n")

SLOW = "generate_refeeds_everything_without_the_cache"
MUTANTS = {
    # apply_temperature
    "temperature_multiplies": m("apply_temperature", ("return logits / temperature", "return logits * temperature")),
    "temperature_in_place": m("apply_temperature", ("return logits / temperature", "return logits.div_(temperature)")),
    "temperature_returns_probabilities": m("apply_temperature", (
        "return logits / temperature", "return torch.softmax(logits / temperature, dim=-1)")),
    "temperature_is_the_reference": ({"apply_temperature": ref.apply_temperature}, {TEMP}),
    # top_k_filter
    "top_k_drops_ties": m("top_k_filter", (
        '    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)\n'
        '    return logits.masked_fill(logits < kth_largest, float("-inf"))',
        '    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, torch.topk(logits, k, dim=-1).indices, True)\n'
        '    return logits.masked_fill(~keep, float("-inf"))')),
    "top_k_drops_the_kth": m("top_k_filter", ("logits < kth_largest", "logits <= kth_largest")),
    "top_k_no_clamp": m("top_k_filter", ("    k = min(k, logits.size(-1))\n", "")),
    "top_k_in_place": m("top_k_filter", ("logits.masked_fill(", "logits.masked_fill_(")),
    "top_k_large_negative": m("top_k_filter", ('float("-inf")', "-1e9")),
    "top_k_two_dimensional_only": m("top_k_filter", ("torch.topk(logits, k, dim=-1).values[..., -1:]",
                                                     "torch.topk(logits, k, dim=1).values[:, -1:]")),
    "top_k_is_the_reference": ({"top_k_filter": ref.top_k_filter}, {TOPK}),
    # top_p_filter
    "top_p_drops_the_crossing_token": m("top_p_filter", source=TOP_P_DESCENDING.format(shift="")),
    # The classic descending formulation: the same set in exact arithmetic, but its sums round differently:
    # at p = 1.0 it drops tokens of tiny nonzero probability, and in bfloat16 it disagrees with HF (the
    # notebook asks for HF's ascending formulation "to agree on the boundary").
    "top_p_descending_and_shifted": m("top_p_filter", source=TOP_P_DESCENDING.format(shift=SHIFT)),
    "top_p_ignores_min_tokens": m("top_p_filter", ("    drop[..., -min_tokens_to_keep:] = False\n", "")),
    "top_p_min_tokens_at_the_wrong_end": m("top_p_filter", ("drop[..., -min_tokens_to_keep:] = False",
                                                            "drop[..., :min_tokens_to_keep] = False")),
    "top_p_forgets_to_unsort": m("top_p_filter", ("drop.scatter(-1, order, drop)", "drop")),
    "top_p_softmax_over_the_batch": m("top_p_filter", ("torch.softmax(sorted_logits, dim=-1)",
                                                       "torch.softmax(sorted_logits, dim=0)")),
    "top_p_in_place": m("top_p_filter", ("logits.masked_fill(", "logits.masked_fill_(")),
    "top_p_is_the_reference": ({"top_p_filter": ref.top_p_filter}, {TOPP}),
    # sample_next
    "sample_temperature_after_the_filters": m("sample_next", (
        "    logits = apply_temperature(logits, temperature)\n", ""), (
        "    probs = torch.softmax(logits, dim=-1)", "    probs = torch.softmax(apply_temperature(logits, temperature), dim=-1)")),
    "sample_top_p_before_top_k": m("sample_next", (
        "    if top_k is not None:\n        logits = top_k_filter(logits, top_k)\n"
        "    if top_p is not None:\n        logits = top_p_filter(logits, top_p)\n",
        "    if top_p is not None:\n        logits = top_p_filter(logits, top_p)\n"
        "    if top_k is not None:\n        logits = top_k_filter(logits, top_k)\n")),
    "sample_softmax_over_the_batch": m("sample_next", ("torch.softmax(logits, dim=-1)", "torch.softmax(logits, dim=0)")),
    "sample_ignores_the_generator": m("sample_next", ("num_samples=1, generator=generator)", "num_samples=1)")),
    "sample_argmax": m("sample_next", (
        "return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)", "return probs.argmax(dim=-1)")),
    "sample_returns_a_column": m("sample_next", ("generator=generator).squeeze(-1)", "generator=generator)")),
    "sample_one_row_at_a_time": m("sample_next", source=SAMPLE_PER_ROW, fails=set()),  # the same draws: accepted
    "sample_is_the_reference": ({"sample_next": ref.sample_next}, {SAMPLE}),
    # greedy_decode
    "greedy_argmax_over_the_batch": m("greedy_decode", ("logits[:, -1].argmax(dim=-1, keepdim=True)",
                                                        "logits[:, -1].argmax(dim=0)[None]")),
    "greedy_first_position": m("greedy_decode", ("logits[:, -1]", "logits[:, 0]")),
    "greedy_no_crop": m("greedy_decode", ("model(ids[:, -model.block_size:])", "model(ids)")),
    "greedy_crops_one_short": m("greedy_decode", ("ids[:, -model.block_size:]", "ids[:, -(model.block_size - 1):]")),
    "greedy_samples": m("greedy_decode", ("logits[:, -1].argmax(dim=-1, keepdim=True)",
                                          "torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1)")),
    "greedy_is_the_reference": ({"greedy_decode": ref.greedy_decode}, {GREEDY}),
    # beam_search
    "beam_finished_beams_keep_growing": m("beam_search", ("            else:\n                alive.append(",
                                                          "            if True:\n                alive.append(")),
    "beam_length_penalty_wrong_sign": m("beam_search", *applicable(
        "beam_search", [("return logprob / n ** length_penalty", "return logprob * n ** length_penalty")],
        [("total / step ** length_penalty", "total * step ** length_penalty"),
         ("total / max_new_tokens ** length_penalty", "total * max_new_tokens ** length_penalty")])),
    "beam_normalizes_by_the_total_length": m("beam_search", *applicable(
        "beam_search", [("final_score(total, step)", "final_score(total, step + prompt.numel())"),
                        ("final_score(total, max_new_tokens)", "final_score(total, max_new_tokens + prompt.numel())")],
        [("total / step ** length_penalty", "total / (step + prompt.numel()) ** length_penalty"),
         ("total / max_new_tokens ** length_penalty", "total / (max_new_tokens + prompt.numel()) ** length_penalty")])),
    "beam_finishes_low_ranked_eos": m("beam_search", ("if rank < beam_width:", "if True:")),
    "beam_forgets_the_alive_beams": m("beam_search", ("    else:\n        finished += [", "    if False:\n        finished += [")),
    "beam_keeps_beam_width_candidates": m("beam_search", ("min(2 * beam_width,", "min(beam_width,")),
    "beam_no_crop": m("beam_search", ("model(seqs[:, -model.block_size:])", "model(seqs)")),
    "beam_float32_logprobs": m("beam_search", ("logits[:, -1].double()", "logits[:, -1]"), fails=set()),  # accepted
    "beam_is_the_reference": ({"beam_search": ref.beam_search}, {BEAM}),
    # no_repeat_ngram_mask
    "no_repeat_ngrams_one_too_long": m("no_repeat_ngram_mask", source=NO_REPEAT_SIZE.format(sign="+")),
    "no_repeat_ngrams_one_too_short": m("no_repeat_ngram_mask", source=NO_REPEAT_SIZE.format(sign="-")),
    "no_repeat_misses_the_last_window": m("no_repeat_ngram_mask", ("range(T - n + 1)", "range(T - n)")),
    "no_repeat_inverted": m("no_repeat_ngram_mask", ("                allowed[b, row[start + n - 1]] = False\n    return allowed",
                                                     "                allowed[b, row[start + n - 1]] = False\n    return ~allowed")),
    "no_repeat_first_row_only": m("no_repeat_ngram_mask", ("enumerate(ids.tolist())", "enumerate(ids.tolist()[:1])")),
    "no_repeat_long_mask": m("no_repeat_ngram_mask", ("dtype=torch.bool", "dtype=torch.long"), ("= False", "= 0")),
    "no_repeat_is_the_reference": ({"no_repeat_ngram_mask": ref.no_repeat_ngram_mask}, {NOREP}),
    # forward_with_cache
    "cache_positions_one_ahead": m("forward_with_cache", ("torch.arange(past, past + T,", "torch.arange(past + 1, past + T + 1,")),
    "cache_positions_from_zero": m("forward_with_cache", ("torch.arange(past, past + T,", "torch.arange(0, T,")),
    "cache_mask_diagonal_off_by_one": m("forward_with_cache", ("tril(diagonal=past)", "tril(diagonal=past - 1)")),
    "cache_mask_of_the_new_tokens_only": m("forward_with_cache", (
        "torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(diagonal=past)",
        "torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()")),
    "cache_of_the_normalized_x": m("forward_with_cache", source=CACHE_OF_NORMALIZED_X),
    "cache_keeps_only_the_new_keys": m("forward_with_cache", (CONCAT + "        new_cache.append((k, v))\n",
                                                              "        new_cache.append((k, v))\n" + CONCAT)),
    "cache_without_dropout": m("forward_with_cache", ("x = model.drop(model.wte(idx) + model.wpe(positions))",
                                                      "x = model.wte(idx) + model.wpe(positions)"), (
        "x = x + block.dropout(attn.out_proj(", "x = x + (attn.out_proj("), (
        "x = x + block.dropout(block.mlp_proj(", "x = x + (block.mlp_proj("), fails=set()),  # eval mode: accepted
    "cache_calls_the_model_for_the_prefill": m("forward_with_cache", (
        "    B, T = idx.shape\n", "    B, T = idx.shape\n    if cache is None:\n        model(idx)\n")),
    "cache_is_the_reference": ({"forward_with_cache": ref.forward_with_cache}, {CACHE}),
    # generate
    SLOW: m("generate", ("forward_with_cache(model, ids if cache is None else ids[:, -1:], cache)",
                         "forward_with_cache(model, ids)")),
    "generate_refeeds_everything_with_the_cache": m("generate", (
        "forward_with_cache(model, ids if cache is None else ids[:, -1:], cache)", "forward_with_cache(model, ids, cache)")),
    "generate_feeds_the_last_two": m("generate", ("ids[:, -1:], cache)", "ids[:, -2:], cache)")),
    "generate_samples_from_the_first_position": m("generate", ("last = logits[:, -1]", "last = logits[:, 0]")),
    "generate_no_crop": m("generate", ("model(ids[:, -model.block_size:])", "model(ids)")),
    "generate_ignores_the_filters": m("generate", ("sample_next(last, generator, temperature, top_k, top_p)",
                                                   "sample_next(last, generator)")),
    "generate_is_the_reference": ({"generate": ref.generate}, {GENERATE}),
    # speculative_decode
    "spec_resamples_from_the_target": m("speculative_decode", (
        RESIDUAL, "last = torch.multinomial(p[i], num_samples=1, generator=generator)")),
    "spec_inverted_ratio": m("speculative_decode", ("if u < p[i, x] / q[i][x]:", "if u < q[i][x] / p[i, x]:")),
    "spec_no_bonus_token": m("speculative_decode", (
        "last = torch.multinomial(p[kr], num_samples=1, generator=generator)",
        "last = torch.multinomial(p[kr], num_samples=1, generator=generator) if kr == 0 else seq[:0]")),
    "spec_no_crop": m("speculative_decode", ("draft(seq[-draft.block_size:][None])", "draft(seq[None])"), (
        "target(seq[-target.block_size:][None])", "target(seq[None])")),
    "spec_overshoots": m("speculative_decode", ("kr = min(k, max_new_tokens - (ids.numel() - prompt.numel()) - 1)",
                                                "kr = k")),
    "spec_accepts_when_u_equals_the_ratio": m("speculative_decode", ("if u < p[i, x] / q[i][x]:",
                                                                     "if u <= p[i, x] / q[i][x]:"), fails=set()),
    "spec_unnormalized_residual": m("speculative_decode", ("residual / residual.sum()", "residual"), fails=set()),
    "spec_is_the_reference": ({"speculative_decode": ref.speculative_decode}, {SPEC}),
}

# Visible tests that run the student's own parts (they cannot swap in the reference) fail too:
# - sample_next's "top_k=1 is greedy" and "temperature=10, top_p=0.35 draws {2, 3}" run the student's filters;
# - generate's "greedy = greedy_decode" runs the student's greedy_decode, "cached = uncached" their
#   forward_with_cache, and "sampled = sample_next step by step" needs a sample_next returning (B,) ids
#   drawn from the generator;
# - beam_search's "beam_width=1 is greedy" compares with the student's greedy_decode;
# - speculative_decode's "k=0 is generate" runs the student's generate, hence their sample_next.
CASCADES: dict[str, set[str]] = {
    "temperature_multiplies": {SAMPLE},
    "top_k_drops_the_kth": {SAMPLE},  # top_k=1 removes every token: NaN probabilities
    "top_p_drops_the_crossing_token": {SAMPLE},
    "top_p_min_tokens_at_the_wrong_end": {SAMPLE},
    "top_p_softmax_over_the_batch": {SAMPLE},
    "sample_ignores_the_generator": {GENERATE},
    "sample_returns_a_column": {GENERATE},
    "sample_softmax_over_the_batch": {GENERATE},
    "cache_positions_one_ahead": {GENERATE},
    "cache_positions_from_zero": {GENERATE},
    "cache_keeps_only_the_new_keys": {GENERATE},
}


def test_every_listed_mistake_has_a_mutant():
    for name in ("top_p_drops_the_crossing_token", "top_k_drops_ties", "sample_temperature_after_the_filters",
                 "beam_finished_beams_keep_growing", "beam_length_penalty_wrong_sign", "cache_positions_one_ahead",
                 "cache_positions_from_zero", "spec_resamples_from_the_target", "beam_normalizes_by_the_total_length",
                 "beam_finishes_low_ranked_eos", "beam_forgets_the_alive_beams", "cache_mask_diagonal_off_by_one",
                 "cache_mask_of_the_new_tokens_only", "cache_of_the_normalized_x", SLOW, "generate_feeds_the_last_two",
                 "generate_samples_from_the_first_position", "generate_no_crop", "spec_inverted_ratio",
                 "spec_no_bonus_token", "sample_softmax_over_the_batch", "greedy_argmax_over_the_batch",
                 "no_repeat_ngrams_one_too_short", "no_repeat_ngrams_one_too_long"):
        assert name in MUTANTS


# The hidden checks of a mutant are those of the names it overrides; the common test runs the hidden
# checks of every affected part, which here is the same set only for beam_search and no_repeat_ngram_mask.
HIDDEN_ONLY = [name for name, (overrides, _) in MUTANTS.items()
               if set(U.affected_checks(overrides)) == hidden_checks(overrides)]


@pytest.mark.parametrize("mutant_name", sorted(set(MUTANTS) - set(HIDDEN_ONLY)))
def test_mutant_fails_its_own_hidden_checks_only(mutant_name):
    overrides, expected = MUTANTS[mutant_name]
    checks = sorted(hidden_checks(overrides) - ({GENERATE} if mutant_name == SLOW else set()))
    failed = U.failing_checks(lambda: U.make_ns(overrides), checks)
    expected = expected - ({GENERATE} if mutant_name == SLOW else set())
    assert failed == expected, f"{mutant_name}: failed {sorted(failed)}, expected {sorted(expected)}"


TIMING_START, TIMING_END = "seed_everything(0)\ntimed = ", "assert ratio >= 3"


def without_timing(visible: str) -> str:
    """The generate cell's visible source without its speed test (which calls only generate, greedy, on
    the student's forward_with_cache)."""
    start = visible.index(TIMING_START)
    end = visible.index("\n", visible.index(TIMING_END)) + 1
    return visible[:start] + visible[end:]


def test_the_speed_test_calls_only_generate():
    visible = dict(U.graded_cells)[GENERATE]
    timing = visible[visible.index(TIMING_START):visible.index("\n", visible.index(TIMING_END))]
    assert {n for n in GRADED_NAMES if re.search(rf"\b{n}\b", timing)} == {"generate"}
    assert "greedy=True" in timing and "print(" in without_timing(visible)


# forward_with_cache mutants that run the reference's operations (values aside), or fewer, or one more
# forward pass of the prompt: the visible speed test (seconds) is not rerun for each of them.
SAME_COST = {"cache_mask_diagonal_off_by_one", "cache_mask_of_the_new_tokens_only", "cache_without_dropout",
             "cache_calls_the_model_for_the_prefill", "cache_is_the_reference"}


def cell_runner(u, check, visible, ns, mutant_name):
    """nbgrader's cell (visible asserts, then the hidden check), except that the hidden check runs first
    (a failing cell fails either way) and only when the mutant overrides its name (else it is the
    reference's run, which test_reference_passes covers); and the generate cell's speed test runs only
    for mutants of generate and forward_with_cache (but SAME_COST)."""
    overrides = MUTANTS[mutant_name][0]
    if check == GENERATE and (not {"generate", "forward_with_cache"} & set(overrides) or mutant_name in SAME_COST):
        visible = without_timing(visible)
    if check in hidden_checks(overrides):
        u.run_check(check, ns)
    exec(compile(visible, check, "exec"), ns)


globals().update(common_tests(U, lazy_ns=lazy_ns, mutants=MUTANTS, cascades=CASCADES, cell_runner=cell_runner,
                              slow_mutants=[SLOW], slow_check=GENERATE, hidden_seconds=30.0,
                              hidden_only_mutants=HIDDEN_ONLY))
