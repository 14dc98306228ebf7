"""Hidden tests of unit 01 (n-gram language models).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with the reference exported from the solution
notebook, on small random corpora built from fixed seeds, and raises ``GradingFailure`` with a
message that says what was expected, on which input, and what came back.

One mistake costs once: a check grades one behaviour and swaps in the reference for the parts
that are graded elsewhere (``ngram_counts`` inside ``NGramLM``, ``NGramLM`` inside
``InterpolatedLM``, reference models for ``perplexity`` and ``sample_sentence``, the reference
model state for ``prob``, the reference ``prob`` for ``logprob``).
"""

from __future__ import annotations

import copy
import math
import random
from collections import Counter

import torch

from autograder.references import unit01_ngrams as ref
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    call_each,
    call_student,
    student,
    swapped,
)

# The checks run in the grader's process; the student's names are reached over llmcourse.wire.
RUNS_OUTSIDE_THE_KERNEL = True
# The reference models lent to student code (sample_sentence, perplexity, InterpolatedLM's parts)
# answer these queries from the grader; the kernel remembers an answer until the model changes.
PURE_METHODS = {cls: ("prob", "logprob", "vocab", "n") for cls in (ref.NGramLM, ref.InterpolatedLM, ref.KneserNeyLM)}

BOS, EOS, UNK = ref.BOS, ref.EOS, ref.UNK
WORDS = ["a", "b", "c", "d", "e", "f", "g"]
WEIGHTS = [9, 6, 4, 3, 2, 1, 1]   # skewed, so n-grams repeat and rare words exist
OOV = ["zz", "qq"]                 # never in any training corpus
ATOL, RTOL = 1e-12, 1e-9


# --- random corpora -----------------------------------------------------------------------------

def corpus(seed: int, size: int = 14, max_len: int = 6, min_len: int = 0) -> list[list[str]]:
    """A small random corpus over WORDS; with min_len 0 it holds an empty and a length-1 sentence."""
    rng = random.Random(seed)
    sentences = [rng.choices(WORDS, WEIGHTS, k=rng.randint(max(min_len, 1), max_len))
                 for _ in range(size)]
    if min_len == 0:
        empty, single = rng.sample(range(size), 2)
        sentences[empty], sentences[single] = [], [rng.choice(WORDS)]
    return sentences


def dev_corpus(seed: int, size: int = 8) -> list[list[str]]:
    """Held-out sentences: different seed, and some out-of-vocabulary words."""
    rng = random.Random(10_000 + seed)
    sentences = []
    for _ in range(size):
        s = rng.choices(WORDS + OOV, WEIGHTS + [1, 1], k=rng.randint(0, 6))
        sentences.append(s)
    return sentences


def name(seed: int, sentences=None) -> str:
    sentences = corpus(seed) if sentences is None else sentences
    lengths = sorted(len(s) for s in sentences)
    text = repr(sentences)
    if len(text) > 160:
        text = text[:150] + "...]"
    return (f"random corpus #{seed} ({len(sentences)} sentences of lengths {lengths[0]}-{lengths[-1]}"
            f" over words a-g: {text})")


def histories(model, n: int, limit: int = 60, seed: int = 0) -> tuple[list, list]:
    """(seen, unseen) histories of length n-1 over vocab + <s>, per the reference model."""
    if n == 1:
        return [()], []
    seen = sorted(model.context_counts)
    symbols = sorted(model.vocab | {BOS})
    rng = random.Random(seed)
    unseen = set()
    for _ in range(400):
        h = tuple(rng.choice(symbols) for _ in range(n - 1))
        if model.context_counts[h] == 0:
            unseen.add(h)
    unseen = sorted(unseen)
    rng.shuffle(seen)
    rng.shuffle(unseen)
    return sorted(seen[:limit]), sorted(unseen[:limit // 3])


def _fit(cls, args: dict, sentences, what: str, returns_self: bool = False):
    """A student's model fitted on a copy of sentences; with returns_self, fit must return it."""
    model = cls(**args)
    out = model.fit(copy.deepcopy(sentences))
    if returns_self and out is not model:
        raise GradingFailure(f"{what}: fit must return self (got {type(out).__name__})")
    return model


def _use_reference_state(model, reference) -> None:
    """Give a student's fitted model the reference's fitted state (same attribute names as the
    contract), so that prob is graded on its own and a mistake in fit costs only once."""
    model.vocab = set(reference.vocab)
    model.counts = Counter(reference.counts)
    model.context_counts = Counter(reference.context_counts)


def _number(value, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise GradingFailure(f"{what}: expected a Python float, got {type(value).__name__} {value!r}")
    return float(value)


# --- part 1: ngram_counts -----------------------------------------------------------------------

def _check_counts(fn, sentences, n, what):
    original = copy.deepcopy(sentences)
    got = call_student(fn, sentences, n, what=what)
    if sentences != original:
        raise GradingFailure(f"{what}: ngram_counts modified its input sentences")
    if not isinstance(got, Counter):
        raise GradingFailure(f"{what}: expected a collections.Counter, got {type(got).__name__}")
    for gram in got:
        if not isinstance(gram, tuple):
            raise GradingFailure(f"{what}: keys must be tuples of {n} strings, got the key {gram!r}")
    _same_counts(got, ref.ngram_counts(sentences, n), what)


def _same_counts(got: Counter, expected: Counter, what: str) -> None:
    """Compare two Counters; on failure, show a few n-grams with both counts."""
    differ = sorted({g for g in got.keys() | expected.keys() if got[g] != expected[g]}, key=repr)
    if differ:
        shown = "; ".join(f"{g!r}: got {got[g]}, expected {expected[g]}" for g in differ[:5])
        raise GradingFailure(f"{what}: {len(differ)} n-gram count(s) differ, e.g. {shown}")


def check_ngram_counts_basic(ns):
    fn = student(ns, "ngram_counts")
    for seed in range(4):
        sentences = corpus(seed, min_len=1)
        for n in (2, 3):
            _check_counts(fn, sentences, n, f"ngram_counts(sentences, n={n}) on {name(seed, sentences)}")


def check_ngram_counts_padding(ns):
    fn = student(ns, "ngram_counts")
    fixed = [([[]], 1), ([[]], 2), ([[]], 3), ([["a"]], 1), ([["a"]], 4), ([["a", "b"]], 5),
             ([[], ["a"], []], 3), ([], 2)]
    for sentences, n in fixed:
        _check_counts(fn, sentences, n, f"ngram_counts({sentences!r}, n={n})")
    for seed in range(4, 7):
        sentences = corpus(seed, max_len=3)
        for n in (1, 4):
            _check_counts(fn, sentences, n, f"ngram_counts(sentences, n={n}) on {name(seed, sentences)}")


# --- part 2: NGramLM ----------------------------------------------------------------------------

def _compare_probs(model, reference, contexts, words, what):
    queries = [(w, h) for h in contexts for w in words]
    answers = call_each(model.prob, queries, what=lambda w, h: f"{what}: prob({w!r}, {h!r})")
    for (w, h), answer in zip(queries, answers, strict=True):
        got = _number(answer, f"{what}: prob({w!r}, {h!r})")
        assert_close(got, reference.prob(w, h), atol=ATOL, rtol=RTOL, what=f"{what}: prob({w!r}, {h!r})")


def _compare_logprobs(model, reference, sentences, what: str) -> None:
    """model.logprob(s) equals reference.logprob(s) for every sentence."""
    for s in sentences:
        got = _number(call_student(model.logprob, list(s), what=f"{what}: logprob({s!r})"),
                      f"{what}: logprob({s!r})")
        assert_close(got, reference.logprob(s), atol=1e-9, rtol=1e-9, what=f"{what}: logprob({s!r})")


def _prob_cases(ns, cases, returns_self=False):
    """Fit student and reference models on the corpus of each (seed, n, k, min_count) case; give
    the student's model the reference's fitted state; yield (model, reference, description, seed).
    """
    cls = student(ns, "NGramLM")
    with swapped(ns, ngram_counts=ref.ngram_counts):
        for seed, n, k, min_count in cases:
            sentences = corpus(seed)
            args = dict(n=n, k=k, min_count=min_count)
            what = f"NGramLM({n}, k={k}, min_count={min_count}) fitted on {name(seed)}"
            model = _fit(cls, args, sentences, what, returns_self)
            reference = ref.NGramLM(**args).fit(sentences)
            _use_reference_state(model, reference)
            yield model, reference, what, seed


def check_ngramlm_mle(ns):
    cases = [(0, 1, 0, 1), (1, 2, 0, 1), (2, 3, 0, 1), (3, 2, 0, 1), (4, 3, 0, 1)]
    for model, reference, what, _seed in _prob_cases(ns, cases, returns_self=True):
        seen, _ = histories(reference, reference.n)
        words = sorted(reference.vocab)
        _compare_probs(model, reference, seen, words, what + " (seen histories)")
        # A longer context than n-1: only its last n-1 items count.
        longer = [("zz", "a", "b") + h for h in seen[:5]]
        _compare_probs(model, reference, longer, words, what + " (contexts longer than n-1)")


def check_ngramlm_add_k(ns):
    cases = [(5, 1, 1.0, 1), (6, 2, 1.0, 1), (7, 3, 0.1, 1), (8, 2, 0.1, 1), (9, 3, 1.0, 1),
             (10, 1, 0.1, 1)]
    for model, reference, what, _seed in _prob_cases(ns, cases):
        seen, _ = histories(reference, reference.n)
        _compare_probs(model, reference, seen, sorted(reference.vocab), what + " (seen histories)")


def check_ngramlm_vocab(ns):
    cls = student(ns, "NGramLM")
    cases = [(11, 1, 1.0, 1), (12, 1, 0.0, 3), (13, 2, 1.0, 2), (14, 3, 0.5, 2), (15, 2, 0.0, 1),
             (16, 3, 1.0, 3), (17, 1, 0.5, 2)]
    with swapped(ns, ngram_counts=ref.ngram_counts):
        for seed, n, k, min_count in cases:
            sentences = corpus(seed, size=18)
            args = dict(n=n, k=k, min_count=min_count)
            what = f"NGramLM({n}, k={k}, min_count={min_count}) fitted on {name(seed, sentences)}"
            model = _fit(cls, args, sentences, what)
            reference = ref.NGramLM(**args).fit(sentences)
            vocab = getattr(model, "vocab", None)
            if not isinstance(vocab, (set, frozenset)):
                raise GradingFailure(f"{what}: .vocab must be a set, got {type(vocab).__name__}")
            assert_equal(set(vocab), reference.vocab, what=f"{what}: .vocab")
            for attr in ("counts", "context_counts"):
                got = getattr(model, attr, None)
                if not isinstance(got, Counter):
                    raise GradingFailure(f"{what}: .{attr} must be a collections.Counter, "
                                         f"got {type(got).__name__}")
                _same_counts(got, getattr(reference, attr), f"{what}: .{attr}")
            # prob maps unknown words to <unk>, in the word and in the context: compared with the
            # model's own prob of <unk> (on the reference's fitted state), so that a mistake in the
            # formula is graded by the other tests, not here.
            _use_reference_state(model, reference)
            unknown = OOV + sorted(w for w in WORDS if w not in reference.vocab)
            seen, _ = histories(reference, n, limit=12)
            for i, h in enumerate(seen):
                u = unknown[i % len(unknown)]
                what_p = f"{what}: prob({u!r}, {h!r})"
                assert_close(call_student(model.prob, u, h, what=what_p), model.prob(UNK, h),
                             atol=ATOL, rtol=RTOL,
                             what=f"{what_p}: an unknown word must get your prob({UNK!r}, {h!r})")
                if UNK in h:
                    context = tuple(u if x == UNK else x for x in h)
                    for w in sorted(reference.vocab):
                        what_p = f"{what}: prob({w!r}, {context!r})"
                        assert_close(call_student(model.prob, w, context, what=what_p),
                                     model.prob(w, h), atol=ATOL, rtol=RTOL,
                                     what=f"{what_p}: a context with an unknown word must be read "
                                          f"as {h!r}, i.e. equal your prob({w!r}, {h!r})")


def check_ngramlm_unseen_history(ns):
    cases = [(17, 2, 0.0, 1), (18, 3, 0.1, 1), (19, 2, 1.0, 2), (20, 3, 0.0, 2), (21, 3, 1.0, 1)]
    for model, reference, what, _seed in _prob_cases(ns, cases):
        seen, unseen = histories(reference, reference.n)
        words = sorted(reference.vocab)
        unseen = unseen + [tuple([EOS] * (reference.n - 1)), tuple(["zz"] * (reference.n - 1))]
        unseen = [h for h in unseen if reference.context_counts[
            tuple(x if x in reference.vocab or x == BOS else UNK for x in h)] == 0]
        _compare_probs(model, reference, unseen, words, what + " (unseen histories: uniform)")
        for h in unseen[:3]:
            total = sum(model.prob(w, h) for w in words)
            assert_close(total, 1.0, atol=1e-9, what=f"{what}: sum over vocab of prob(w, {h!r})")
        # ... and only unseen ones: a seen history must not get the uniform distribution.
        uniform = 1.0 / len(words)
        for h in seen:
            if any(abs(reference.prob(w, h) - uniform) > 1e-9 for w in words):
                if all(abs(model.prob(w, h) - uniform) < 1e-12 for w in words):
                    raise GradingFailure(
                        f"{what}: prob(w, {h!r}) is 1/|V| for every word although the history "
                        f"{h!r} was seen in training; only unseen histories are uniform")
                break


def check_ngramlm_logprob(ns):
    cases = [(22, 1, 1.0, 1), (23, 2, 0.5, 1), (24, 3, 0.1, 2), (25, 2, 0.0, 1), (26, 3, 0.0, 1),
             (27, 3, 0.0, 2)]
    for model, reference, what, seed in _prob_cases(ns, cases):
        # Grade logprob alone: the model's prob is the reference's.
        model.prob = reference.prob
        # training sentences (finite even for k = 0), held-out ones (-inf for k = 0), the empty one
        sentences = corpus(seed)[:6] + dev_corpus(seed) + [[]]
        for s in sentences:
            expected = reference.logprob(s)
            got = _number(call_student(model.logprob, list(s), what=f"{what}: logprob({s!r})"),
                          f"{what}: logprob({s!r})")
            assert_close(got, expected, atol=1e-9, rtol=1e-9,
                         what=f"{what}: logprob({s!r}) (natural log, </s> included)")


# --- part 3: perplexity -------------------------------------------------------------------------

class _FixedLogprob:
    """A model whose logprob is -0.5 per word and -1 for </s> (so N must count </s>)."""

    n = 3

    def logprob(self, sentence):
        return -0.5 * len(sentence) - 1.0


def check_perplexity(ns):
    fn = student(ns, "perplexity")
    dev = dev_corpus(7, size=10)
    fixed = _FixedLogprob()
    expected = math.exp(sum(0.5 * len(s) + 1.0 for s in dev) / sum(len(s) + 1 for s in dev))
    got = _number(call_student(fn, fixed, dev, what="perplexity"), "perplexity")
    assert_close(got, expected, atol=1e-9, rtol=1e-9,
                 what="perplexity(model, sentences) for a model with logprob(s) = -0.5*len(s) - 1 "
                      f"on {len(dev)} sentences with {sum(map(len, dev))} words "
                      "(N must be the number of words plus one </s> per sentence)")
    cases = [(27, 1, 1.0, 1), (28, 2, 0.5, 2), (29, 3, 0.1, 1), (30, 2, 0.0, 2), (31, 3, 0.0, 1)]
    for seed, n, k, min_count in cases:
        reference = ref.NGramLM(n, k=k, min_count=min_count).fit(corpus(seed))
        for sentences in (dev_corpus(seed), corpus(seed), [["a"]], [[], []]):
            what = (f"perplexity(NGramLM({n}, k={k}, min_count={min_count}) fitted on {name(seed)}, "
                    f"sentences={sentences!r})")
            expected = ref.perplexity(reference, sentences)
            got = _number(call_student(fn, reference, copy.deepcopy(sentences), what=what), what)
            assert_close(got, expected, atol=1e-9, rtol=1e-9, what=what)


# --- part 4: InterpolatedLM ---------------------------------------------------------------------

def check_interpolated_prob(ns):
    cls = student(ns, "InterpolatedLM")
    cases = [(32, 1, None, 0.0, 1), (33, 2, (0.3, 0.7), 0.0, 1), (34, 3, (0.2, 0.3, 0.5), 0.0, 2),
             (35, 3, None, 0.5, 1), (36, 2, (0.9, 0.1), 1.0, 2), (37, 3, (0.1, 0.6, 0.3), 0.0, 1)]
    with swapped(ns, NGramLM=ref.NGramLM, ngram_counts=ref.ngram_counts):
        for seed, n, lambdas, k, min_count in cases:
            sentences = corpus(seed)
            args = dict(n=n, lambdas=lambdas, k=k, min_count=min_count)
            what = (f"InterpolatedLM({n}, lambdas={lambdas}, k={k}, min_count={min_count}) fitted "
                    f"on {name(seed)}")
            model = _fit(cls, args, sentences, what, returns_self=True)
            reference = ref.InterpolatedLM(**args).fit(sentences)
            models = getattr(model, "models", None)
            if not isinstance(models, (list, tuple)) or len(models) != n:
                raise GradingFailure(f"{what}: .models must be a list of {n} NGramLM (orders 1..{n}), "
                                     f"got {models!r}")
            assert_equal([(m.n, m.k, m.min_count) for m in models],
                         [(m.n, m.k, m.min_count) for m in reference.models],
                         what=f"{what}: (n, k, min_count) of .models")
            assert_equal(set(model.vocab), reference.vocab, what=f"{what}: .vocab")
            seen, unseen = histories(reference.models[-1], n, limit=15)
            contexts = seen + unseen[:4] + ([("zz",) * (n - 1)] if n > 1 else [])
            words = sorted(reference.vocab) + ["zz"]
            _compare_probs(model, reference, contexts, words, what)
            _compare_logprobs(model, reference, dev_corpus(seed) + [[]], what)


def _valid_lambdas(got, n, step, what):
    if isinstance(got, torch.Tensor):
        got = got.tolist()
    try:
        got = tuple(float(x) for x in got)
    except TypeError:
        raise GradingFailure(f"{what}: tune must return a tuple of {n} floats, got {got!r}") from None
    if len(got) != n:
        raise GradingFailure(f"{what}: tune must return {n} lambdas (order 1 first), got {got!r}")
    if any(abs(x / step - round(x / step)) > 1e-6 or x < -1e-12 for x in got):
        raise GradingFailure(f"{what}: every lambda must be a non-negative multiple of step={step}, "
                             f"got {got!r}")
    if abs(sum(got) - 1.0) > 1e-6:
        raise GradingFailure(f"{what}: the lambdas must sum to 1, got {got!r} (sum {sum(got)!r})")
    if got[0] < step / 2:
        raise GradingFailure(f"{what}: lambda_1 (the unigram weight) must be > 0, got {got!r}")
    return got


def check_interpolated_tune(ns):
    cls = student(ns, "InterpolatedLM")
    cases = [(38, 2, 0.1, 0.0, 2), (39, 3, 0.1, 0.0, 2), (40, 3, 0.25, 0.0, 1), (41, 2, 0.5, 0.1, 1),
             (42, 3, 0.2, 0.5, 2), (44, 3, 0.1, 0.1, 1)]
    with swapped(ns, NGramLM=ref.NGramLM, ngram_counts=ref.ngram_counts, perplexity=ref.perplexity):
        for seed, n, step, k, min_count in cases:
            train = corpus(seed, size=20)
            # seed 44 tunes on training sentences, where lambda_1 = 0 would be best: not allowed
            dev = train[:10] if seed == 44 else corpus(seed + 500, size=10)
            args = dict(n=n, k=k, min_count=min_count)
            what = (f"InterpolatedLM({n}, k={k}, min_count={min_count}).tune(dev, step={step}), "
                    f"fitted on {name(seed, train)}, dev = {dev!r}")
            model = _fit(cls, args, train, what)
            # Grade tune alone: the model's prob and logprob are the reference's (with its lambdas).
            model.prob = lambda w, c, model=model: ref.InterpolatedLM.prob(model, w, c)
            model.logprob = lambda s, model=model: ref.InterpolatedLM.logprob(model, s)
            reference = ref.InterpolatedLM(**args).fit(train)
            reference.tune(dev, step)
            best = ref.perplexity(reference, dev)
            got = _valid_lambdas(call_student(model.tune, copy.deepcopy(dev), step, what=what), n, step, what)
            assert_close(tuple(model.lambdas), got, atol=1e-12,
                         what=f"{what}: self.lambdas after tune (must be the returned lambdas)")
            reached = ref.perplexity(ref.InterpolatedLM(n, got, k, min_count).fit(train), dev)
            if not reached <= best * (1 + 1e-9):
                raise GradingFailure(
                    f"{what}: your lambdas {got} give dev perplexity {reached:.6g}, but the best grid "
                    f"point gives {best:.6g} (the reference found "
                    f"{tuple(round(x, 6) for x in reference.lambdas)})")


# --- part 5: sample_sentence --------------------------------------------------------------------

def _sampling_models():
    return [
        ("NGramLM(1, k=1.0)", ref.NGramLM(1, k=1.0).fit(corpus(43))),
        ("NGramLM(2, k=0.5, min_count=2)", ref.NGramLM(2, k=0.5, min_count=2).fit(corpus(44))),
        ("NGramLM(3, k=0.0)", ref.NGramLM(3, k=0.0).fit(corpus(45, size=30))),
        ("InterpolatedLM(3, (0.2, 0.3, 0.5), k=0.0, min_count=2)",
         ref.InterpolatedLM(3, (0.2, 0.3, 0.5), k=0.0, min_count=2).fit(corpus(46))),
        ("KneserNeyLM(2, d=0.75)", ref.KneserNeyLM(2, d=0.75).fit(corpus(47))),
    ]


def check_sample_sentence(ns):
    fn = student(ns, "sample_sentence")
    for label, model in _sampling_models():
        # max_words is left at its default (30), which these models rarely reach: stopping is
        # graded by check_sample_stops.
        for seed in (0, 1, 2):
            mine, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            for i in range(3):
                what = (f"sentence {i + 1} of 3 drawn in a row by sample_sentence(model, generator), "
                        f"model = reference {label} fitted on a random corpus, "
                        f"generator = torch.Generator().manual_seed({seed})")
                expected = ref.sample_sentence(model, theirs)
                got = call_student(fn, model, mine, what=what)
                if not isinstance(got, list):
                    raise GradingFailure(f"{what}: expected a list of words, got {type(got).__name__}")
                if got[-1:] == [EOS]:  # leaving </s> out is graded by check_sample_stops
                    got = got[:-1]
                assert_equal(got, expected, what=what + " (draw over sorted(model.vocab) with "
                             "torch.multinomial(probs, num_samples=1, generator=generator))")
            if not torch.equal(torch.rand(3, generator=mine), torch.rand(3, generator=theirs)):
                raise GradingFailure(f"after sampling from {label} with seed {seed}, the generator "
                                     "is in a different state than the reference's: draw exactly one "
                                     "torch.multinomial sample per word (and one for </s>)")


def check_sample_stops(ns):
    fn = student(ns, "sample_sentence")
    # Models that can say only one sentence (every probability is 0 or 1), so this check depends
    # on when sampling stops, not on how it draws.
    one = [["to", "be", "or", "not", "to", "go"]]
    long = [[f"w{i:02d}" for i in range(40)]]
    models = [
        ("NGramLM(3, k=0.0) fitted on " + repr(one), ref.NGramLM(3, k=0.0).fit(one)),
        ("NGramLM(2, k=0.0) fitted on [['x', 'y']]", ref.NGramLM(2, k=0.0).fit([["x", "y"]])),
        ("NGramLM(2, k=0.0) fitted on [['w00', 'w01', ..., 'w39']]", ref.NGramLM(2, k=0.0).fit(long)),
        ("NGramLM(4, k=0.0) fitted on [['w00', 'w01', ..., 'w39']]", ref.NGramLM(4, k=0.0).fit(long)),
    ]
    for label, model in models:
        for seed, max_words in ((0, 30), (1, 4), (2, 1), (3, 0), (4, 39), (5, 41)):
            what = (f"sample_sentence(model, torch.Generator().manual_seed({seed}), "
                    f"max_words={max_words}) with the reference {label}")
            expected = ref.sample_sentence(model, torch.Generator().manual_seed(seed), max_words)
            generator = torch.Generator().manual_seed(seed)
            got = (call_student(fn, model, generator, what=what) if max_words == 30  # the default
                   else call_student(fn, model, generator, max_words, what=what))
            if not isinstance(got, list):
                raise GradingFailure(f"{what}: expected a list of words, got {type(got).__name__}")
            assert_equal(got, expected, what=what + " (stop when </s> is drawn, without adding it, "
                         "or after max_words words)")


# --- bonus: KneserNeyLM -------------------------------------------------------------------------

def check_kneser_ney(ns):
    cls = student(ns, "KneserNeyLM")
    cases = [(48, 1, 0.75, 1), (49, 2, 0.75, 1), (50, 3, 0.75, 1), (51, 2, 0.5, 2), (52, 3, 0.9, 2),
             (53, 4, 0.75, 1)]
    with swapped(ns, ngram_counts=ref.ngram_counts, NGramLM=ref.NGramLM):
        for seed, n, d, min_count in cases:
            sentences = corpus(seed, size=20)
            args = dict(n=n, d=d, min_count=min_count)
            what = f"KneserNeyLM({n}, d={d}, min_count={min_count}) fitted on {name(seed, sentences)}"
            model = _fit(cls, args, sentences, what, returns_self=True)
            reference = ref.KneserNeyLM(**args).fit(sentences)
            assert_equal(set(model.vocab), reference.vocab, what=f"{what}: .vocab")
            counts = ref.NGramLM(n, 0.0, min_count).fit(sentences)
            seen, unseen = histories(counts, n, limit=24)
            # histories seen only at lower orders, and ones with unknown words, too
            contexts = seen + unseen[:6] + ([("zz",) * (n - 1)] if n > 1 else [])
            words = sorted(reference.vocab) + ["zz"]
            _compare_probs(model, reference, contexts, words, what)
            _compare_logprobs(model, reference, dev_corpus(seed) + [[]], what)
