"""Hidden tests of unit 02 (tokenization and embeddings: byte-level BPE and word2vec).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with the reference exported from the solution
notebook and raises ``GradingFailure`` with a message that says what was expected, on which
input, and what came back.

One mistake costs once:

- ``train_bpe`` is graded in seven cells, one behaviour each, on corpora built so that the
  other behaviours do not show: the *merges* checks are tie-agnostic (they recount the pairs
  naively after every merge and accept any most frequent pair), only the tie-breaking check
  compares merges one for one; corpora without whitespace, with one-character separators and
  with words of distinct letters show neither pre-tokenization nor overlapping-pair mistakes;
  only the special-token check has special tokens in the text; only the layout check looks at
  ``vocab``, the order of ``merges`` against ``vocab``, and the number of merges beyond the
  budget; only the speed check times.
- The two helpers of the notebook (``split_on_special_tokens``, ``merge_pair``) are swapped for
  the reference's wherever they are not what a check grades (but the speed check, which times
  the student's code alone).
- ``BPETokenizer`` is built from the reference's vocabularies; ``encode`` with special tokens
  uses merges whose order cannot matter; ``decode`` decodes the reference's ids.
- ``SkipGram`` runs with the reference ``sgns_loss`` inside.
"""

from __future__ import annotations

import gc
import random
import time
from collections import Counter

import regex
import torch
import torch.nn as nn

from autograder.references import unit02_tokenization as ref
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_gradients,
    beside,
    call_student,
    forbid,
    is_instance,
    on_each_device,
    student,
    swapped,
    type_name,
)
from llmcourse.runtime import single_thread

# The checks run in the grader's process; the student's names are reached over llmcourse.wire.
RUNS_OUTSIDE_THE_KERNEL = True

PATTERN = regex.compile(ref.GPT2_SPLIT_PATTERN)
# One-character pre-tokens between words: punctuation and digits (no whitespace, no apostrophe).
SEPARATORS = list(",.;:!?-+*/=%&#@~^()[]{}<>") + list("0123456789")
LETTERS = list("abcdefghijklmnop") + ["é", "ü", "ö", "ж", "λ", "π"]  # é ü ö share the byte c3
EOT = "<|endoftext|>"
SPEED_LIMIT = 6.0          # student time / reference time allowed by check_bpe_speed
SPEED_TEXT_CHARS = 150_000
SPEED_VOCAB_SIZE = 600


# --- calling student code -----------------------------------------------------------------------

def _helpers(ns, **keep):
    """Swap the notebook's BPE helpers for the reference's, except those named in keep."""
    swaps = {"merge_pair": ref.merge_pair, "split_on_special_tokens": ref.split_on_special_tokens}
    for name in keep:
        swaps.pop(name)
    return swapped(ns, **swaps)


def _short(text: str, limit: int = 120) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


# --- corpora ------------------------------------------------------------------------------------

def _distinct_word(rng: random.Random, letters, lo: int, hi: int) -> str:
    return "".join(rng.sample(letters, rng.randint(lo, hi)))


def _types(rng, n_types, letters=LETTERS, lo=2, hi=6) -> list[str]:
    types: list[str] = []
    while len(types) < n_types:
        w = _distinct_word(rng, letters, lo, hi)
        if w not in types:
            types.append(w)
    return types


def _join(rng: random.Random, tokens: list[str]) -> str:
    return tokens[0] + "".join(rng.choice(SEPARATORS) + t for t in tokens[1:]) if tokens else ""


def word_corpus(seed: int, n_types: int = 25, n_tokens: int = 300, zipf: float = 1.0,
                letters=LETTERS) -> str:
    """Words of distinct letters (so no pair repeats inside a pre-token), Zipf-distributed,
    joined by random one-character separators (so pairs across pre-tokens stay rare)."""
    rng = random.Random(seed)
    types = _types(rng, n_types, letters)
    weights = [1.0 / (rank + 1) ** zipf for rank in range(n_types)]
    return _join(rng, rng.choices(types, weights, k=n_tokens))


def tie_corpus(seed: int, n_types: int = 12, copies: int = 4) -> str:
    """Every word exactly `copies` times: the pair counts tie all the time."""
    rng = random.Random(seed)
    tokens = _types(rng, n_types, LETTERS[:12], 2, 4) * copies
    rng.shuffle(tokens)
    return _join(rng, tokens)


def run_corpus(seed: int, n_tokens: int = 200) -> str:
    """Words with repeated and overlapping pairs: aaaa, ababab, abcabc, aabaa, ..."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(10):
        x, y, z = rng.sample("abcdefgh", 3)
        shapes += [x * rng.randint(2, 6), (x + y) * rng.randint(2, 4), (x + y + z) * rng.randint(2, 3),
                   x * rng.randint(2, 3) + y + x * rng.randint(1, 3)]
    types = rng.sample(shapes, 14)
    weights = [1.0 / (rank + 1) for rank in range(len(types))]
    return _join(rng, rng.choices(types, weights, k=n_tokens))


def prose_corpus(seed: int, n_words: int = 300) -> str:
    """English-like text: spaces, capitals, punctuation, numbers, contractions, newlines, runs of
    spaces and tabs. Words have distinct letters, so no pair repeats inside a pre-token."""
    rng = random.Random(seed)
    types = _types(rng, 40, list("abcdefghijklmnopqrstuvwxyz"), 1, 6)
    weights = [1.0 / (rank + 1) for rank in range(len(types))]
    parts = []
    for i in range(n_words):
        word = rng.choices(types, weights)[0]
        r = rng.random()
        if r < 0.1:
            word = word.capitalize()
        elif r < 0.15:
            word = "".join(rng.sample("0123456789", rng.randint(1, 4)))
        before = rng.choices([" ", "\n", "  ", "\t", "\n\n", " \n"], [30, 3, 2, 1, 1, 1])[0] if i else ""
        after = rng.choices(["", ",", ".", "!", "?", ";", "'s", "'t", "'re", "'ll", "'ve", "'d"],
                            [40, 6, 6, 1, 1, 1, 2, 1, 1, 1, 1, 1])[0]
        parts.append(before + word + after)
    return "".join(parts)


SPECIAL_SETS = [
    [EOT],
    [EOT, "<pad>"],
    ["[MASK]", "<s>", "</s>"],
    ["<|im_start|>", "<|im_end|>", "a.b"],
]


def special_corpus(seed: int, specials: list[str], n_chunks: int = 120) -> str:
    """Short chunks (one pre-token, or a few joined by separators) between special tokens, which
    also sit at the start, at the end, next to each other, and inside words."""
    rng = random.Random(seed)
    types = _types(rng, 10, LETTERS[:14], 2, 4)
    weights = [1.0 / (rank + 1) for rank in range(len(types))]
    parts = [rng.choice(specials)] if seed % 2 else []
    for _ in range(n_chunks):
        k = rng.choices([1, 2, 3], [6, 2, 1])[0]
        parts.append(_join(rng, rng.choices(types, weights, k=k)))
        parts.append(rng.choice(specials) * rng.choices([1, 2], [5, 1])[0])
    return "".join(parts)


def random_unicode(rng: random.Random, n_pieces: int) -> str:
    """A random string with letters of several scripts, emoji (with modifiers and joiners),
    combining marks, digits, punctuation, contractions and whitespace runs."""
    pools = [
        [_distinct_word(rng, list("abcdefghijklmnopqrstuvwxyz"), 1, 7) for _ in range(8)] + ["the", "and", "thee"],
        list("ÉéèêëàâäôöûüçñßØøÅå"),
        list("αβγδεζηθικλμνξοπρστυφχψωΚαλημέρα"),
        list("абвгдежзийклмнопрстуфхцчшщъыьэюя"),
        list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年日本語"),
        ["👋", "👋🏽", "🎭", "❤️", "👨\u200d👩\u200d👧", "🇫🇷", "😀", "🤖", "🏳️\u200d🌈"],
        ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "\u0301", "\u200b"],
        [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\x0b", "    "],
        ["'s", "'t", "'re", "'ll", "'ve", "'d", "'m", "'S", "'"],
        list("0123456789") + ["1984", "3.14", "10,000"],
        list(",.;:!?-()[]{}<>|\"@#$%^&*_+=~`/\\") + ["...", "--", "?!", "\x00", "\x7f"],
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n_pieces))


# --- the naive checker: every merge must be a most frequent pair at its step ---------------------

def _pretoken_counts(text: str, specials: list[str]) -> Counter:
    """The checker's own pre-tokenization: cut at special tokens (longest first), then the pattern."""
    pieces = [text]
    if specials:
        alternation = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        pieces = regex.split(alternation, text)
    counts = Counter()
    for piece in pieces:
        counts.update(PATTERN.findall(piece))
    return counts


def _byte_words(text: str, specials: list[str]) -> dict[tuple[bytes, ...], int]:
    words: Counter = Counter()
    for pretoken, count in _pretoken_counts(text, specials).items():
        words[tuple(bytes([b]) for b in pretoken.encode("utf-8"))] += count
    return dict(words)


def _pair_counts(words: dict) -> Counter:
    counts = Counter()
    for word, count in words.items():
        for pair in zip(word, word[1:], strict=False):
            counts[pair] += count
    return counts


def _merged(words: dict, pair: tuple[bytes, bytes]) -> dict:
    out: Counter = Counter()
    for word, count in words.items():
        out[tuple(ref.merge_pair(list(word), pair))] += count
    return dict(out)


def _as_pairs(merges, what: str) -> list[tuple[bytes, bytes]]:
    """Merges as a list of (bytes, bytes); a list [a, b] is accepted here (the layout check is
    strict about tuples)."""
    if not isinstance(merges, (list, tuple)):
        raise GradingFailure(f"{what}: merges must be a list of (bytes, bytes) pairs, got {type(merges).__name__}")
    pairs = []
    for k, pair in enumerate(merges):
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(x, bytes) for x in pair)):
            raise GradingFailure(f"{what}: merges[{k}] is {pair!r}; every merge must be a pair of bytes "
                                 f"objects, e.g. (b'h', b'e')")
        pairs.append((pair[0], pair[1]))
    return pairs


def _most_frequent_failure(text, specials, vocab_size, merges) -> str | None:
    """None if each merge was a most frequent pair at its step and merging stopped at the right
    time; else what went wrong. Only the first vocab_size - 256 - len(specials) merges count."""
    budget = max(0, vocab_size - 256 - len(specials))
    words = _byte_words(text, specials)
    for step, pair in enumerate(merges[:budget]):
        counts = _pair_counts(words)
        if not counts:
            return (f"merge {step + 1} is {pair!r}, but after {step} merges no pair was left (every "
                    f"pre-token is a single token): stop when no pair is left")
        top = max(counts.values())
        got = counts.get(pair, 0)
        if got != top:
            best = max(p for p, c in counts.items() if c == top)
            return (f"merge {step + 1} is {pair!r}, which occurs {got} times at that step, but {best!r} "
                    f"occurs {top} times (your earlier merges were most frequent pairs). Counts are over "
                    f"the adjacent pairs inside each pre-token, times the pre-token's count")
        words = _merged(words, pair)
    if len(merges) < budget:
        counts = _pair_counts(words)
        if counts:
            top = max(counts.values())
            best = max(p for p, c in counts.items() if c == top)
            return (f"only {len(merges)} merges, but vocab_size={vocab_size} leaves room for {budget} and "
                    f"pairs are left ({best!r} occurs {top} times): stop at vocab_size or when no pair is left")
    return None


def _creation_orders(vocab, merges: list) -> list[list]:
    """The merges as returned and, if vocab gives every merged token an id, ordered by those ids:
    checks other than the layout check accept either, so that a wrong order costs once."""
    orders = [merges]
    if isinstance(vocab, dict):
        ids = {}
        for i, token in vocab.items():
            if isinstance(token, bytes) and len(token) > 1 and isinstance(i, int):
                ids.setdefault(token, []).append(i)
        keys = [ids.get(a + b) for a, b in merges]
        if all(k is not None and len(k) == 1 for k in keys):
            by_id = [pair for _, pair in sorted(zip([k[0] for k in keys], merges, strict=True))]
            if by_id != merges:
                orders.append(by_id)
    return orders


def _train(fn, text, vocab_size, specials, what):
    result = call_student(fn, text, vocab_size, list(specials), what=what)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise GradingFailure(f"{what}: train_bpe must return a tuple (vocab, merges), got {type(result).__name__}")
    vocab, merges = result
    return vocab, _as_pairs(merges, what)


def _check_most_frequent(fn, text, vocab_size, specials, what, any_order=True):
    vocab, merges = _train(fn, text, vocab_size, specials, what)
    orders = _creation_orders(vocab, merges) if any_order else [merges]
    failures = [_most_frequent_failure(text, specials, vocab_size, m) for m in orders]
    if all(failures):
        raise GradingFailure(f"{what}: {failures[0]}")
    return vocab, merges


def _describe_corpus(kind: str, seed: int, text: str) -> str:
    return f"train_bpe on {kind} #{seed} ({len(text)} characters: {_short(text, 90)})"


# --- part 1: train_bpe --------------------------------------------------------------------------

def check_bpe_vocab(ns):
    fn = student(ns, "train_bpe")
    cases = [  # (seed, special tokens, merges allowed)
        (0, [], 20), (1, [EOT], 15), (2, [EOT, "<pad>", "[MASK]"], 20), (3, ["<s>"], 0), (4, [EOT], 1),
    ]
    with _helpers(ns):
        for seed, specials, n_merges in cases:
            text = word_corpus(seed, n_types=15, n_tokens=150)
            _check_layout(fn, text, 256 + len(specials) + n_merges, specials,
                          f"{_describe_corpus('random corpus', seed, text)}, vocab_size="
                          f"{256 + len(specials) + n_merges}, special_tokens={specials}")
        # Running out of pairs before vocab_size (one pre-token), and texts without pairs.
        for text, specials in (("xyzw", ["<|eot|>"]), ("", [EOT, "<pad>"]), ("x", [])):
            _check_layout(fn, text, 400, specials,
                          f"train_bpe({text!r}, vocab_size=400, special_tokens={specials})")


def _check_layout(fn, text, vocab_size, specials, what):
    result = call_student(fn, text, vocab_size, list(specials), what=what)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise GradingFailure(f"{what}: train_bpe must return a tuple (vocab, merges), got {type(result).__name__}")
    vocab, merges = result
    ref_vocab, ref_merges = ref.train_bpe(text, vocab_size, list(specials))
    if not isinstance(vocab, dict):
        raise GradingFailure(f"{what}: vocab must be a dict[int, bytes], got {type(vocab).__name__}")
    if not isinstance(merges, list) or not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, bytes) for x in p) for p in merges):
        raise GradingFailure(f"{what}: merges must be a list of tuples (bytes, bytes), got {merges!r:.200}")
    if not all(isinstance(v, bytes) for v in vocab.values()):
        bad = next(v for v in vocab.values() if not isinstance(v, bytes))
        raise GradingFailure(f"{what}: every value of vocab must be bytes, found {bad!r}")
    assert_equal(len(merges), len(ref_merges), what=f"{what}: the number of merges")
    assert_equal(sorted(vocab), list(range(len(ref_vocab))),
                 what=f"{what}: the ids of vocab (0 to 255 + {len(specials)} special tokens + {len(ref_merges)} merges)")
    assert_equal([vocab[i] for i in range(256)], [bytes([i]) for i in range(256)],
                 what=f"{what}: vocab[0..255] (the single bytes, vocab[i] == bytes([i]))")
    assert_equal([vocab[256 + j] for j in range(len(specials))], [s.encode("utf-8") for s in specials],
                 what=f"{what}: vocab[256 ...], the special tokens' bytes in the order of the list")
    first = 256 + len(specials)
    assert_equal([vocab[first + k] for k in range(len(merges))], [a + b for a, b in merges],
                 what=f"{what}: vocab[{first} + k] must be the token of merges[k] (creation order)")
    failure = _most_frequent_failure(text, specials, vocab_size, merges)
    if failure:
        raise GradingFailure(f"{what}: in the order of your merges list, {failure}")


def check_bpe_merges(ns):
    fn = student(ns, "train_bpe")
    # Budgets stay below the point where merges across pre-tokens could compete (that is graded
    # by check_bpe_pretokenization, with running out of pairs).
    cases = [  # (seed, n_types, n_tokens, zipf, merges allowed)
        (10, 20, 200, 1.0, 30), (11, 30, 400, 1.2, 25), (12, 15, 150, 0.5, 35),
        (13, 40, 600, 1.0, 40), (14, 8, 60, 1.0, 15), (15, 25, 300, 0.0, 50),
    ]
    with _helpers(ns):
        for seed, n_types, n_tokens, zipf, n_merges in cases:
            text = word_corpus(seed, n_types, n_tokens, zipf)
            what = _describe_corpus("random corpus", seed, text) + f", vocab_size={256 + n_merges}"
            _check_most_frequent(fn, text, 256 + n_merges, [], what)
        for text, n_merges in (("hug,hug;hug:pug.pun!bun?hugs", 3), ("λόγος;λόγος", 9)):
            _check_most_frequent(fn, text, 256 + n_merges, [],
                                 f"train_bpe({text!r}, vocab_size={256 + n_merges}, special_tokens=[])")


def check_bpe_tie_breaking(ns):
    fn = student(ns, "train_bpe")
    fixed = [("ab,cd", 1), ("za,ab", 1), ("ba,az", 1), ("xa,xb;xc", 2), ("ab,ba", 1), ("é,ü;ö", 1), ("ba,cb;ac", 1),
             ("zy;yx:xw", 1)]
    cases = [(text, 256 + n, f"train_bpe({text!r}, vocab_size={256 + n}, special_tokens=[])")
             for text, n in fixed]
    for seed in range(20, 26):
        text = tie_corpus(seed)
        cases.append((text, 256 + 20, _describe_corpus("corpus with ties", seed, text) + ", vocab_size=276"))
    with _helpers(ns):
        for text, vocab_size, what in cases:
            vocab, merges = _train(fn, text, vocab_size, [], what)
            expected = ref.train_bpe(text, vocab_size, [])[1]
            orders = [m[:len(expected)] for m in _creation_orders(vocab, merges)]
            if expected not in orders:
                assert_equal(orders[0], expected, what=what + " (when pairs tie, merge the lexicographically "
                             "greater pair: max over (count, pair))")


def check_bpe_overlapping_pairs(ns):
    fn = student(ns, "train_bpe")
    fixed = [("aaa", 2), ("aaaa,aaa;bb", 3), ("abab,ab", 2), ("aaaaa", 3), ("ababab;abab", 3), ("abcabc,abc", 3),
             ("aabaa;aab", 3), ("aaaa.aaaa!bbb", 4)]
    cases = [(text, 256 + n, f"train_bpe({text!r}, vocab_size={256 + n}, special_tokens=[])") for text, n in fixed]
    for seed in range(30, 36):
        text = run_corpus(seed)
        cases.append((text, 256 + 20, _describe_corpus("corpus of runs", seed, text) + ", vocab_size=276"))
    with _helpers(ns, merge_pair=True):  # merging left to right is graded here
        for text, vocab_size, what in cases:
            _check_most_frequent(fn, text, vocab_size, [], what)


def check_bpe_pretokenization(ns):
    fn = student(ns, "train_bpe")
    fixed = ["a,a,a,a", "dog dog dog", "it's it's it's", "the cat. the cat.", "a  b  c  d", "1 2 3 4",
             "Hello\n\nHello\n\nHello", "x!y!z!"]
    cases = [(text, 256 + 20, f"train_bpe({text!r}, vocab_size=276, special_tokens=[])") for text in fixed]
    for seed in range(40, 45):
        text = prose_corpus(seed)
        cases.append((text, 256 + 60, _describe_corpus("English-like text", seed, text) + ", vocab_size=316"))
    with _helpers(ns):
        for text, vocab_size, what in cases:
            _check_most_frequent(fn, text, vocab_size, [], what + " (pre-tokens: "
                                 f"{_short(str(PATTERN.findall(text)), 100)})")


def check_bpe_special_tokens(ns):
    fn = student(ns, "train_bpe")
    fixed = [("ab<|endoftext|>ab", [EOT]), ("ab<|endoftext|>cd<|endoftext|>ab<|endoftext|>cd", [EOT]),
             ("<|endoftext|>xy<|endoftext|><|endoftext|>yx<|endoftext|>", [EOT]),
             ("[MASK]ab[MASK]ba[MASK]", ["[MASK]"]), ("a.bxya.bzx", ["a.b"]), ("<pad><pad>", ["<pad>"])]
    cases = [(text, specials, 256 + len(specials) + 10,
              f"train_bpe({text!r}, vocab_size={256 + len(specials) + 10}, special_tokens={specials})")
             for text, specials in fixed]
    for seed in range(50, 56):
        specials = SPECIAL_SETS[seed % len(SPECIAL_SETS)]
        text = special_corpus(seed, specials)
        vocab_size = 256 + len(specials) + 15
        cases.append((text, specials, vocab_size, _describe_corpus("corpus with special tokens", seed, text)
                      + f", vocab_size={vocab_size}, special_tokens={specials}"))
    with _helpers(ns):
        for text, specials, vocab_size, what in cases:
            _check_most_frequent(fn, text, vocab_size, specials,
                                 what + " (special tokens are cut out of the text before training)")


def _timed(fn, *args):
    gc.collect()
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def speed_text() -> str:
    from llmcourse.data import load_text

    return load_text("tinyshakespeare")[:SPEED_TEXT_CHARS]


def check_bpe_speed(ns):
    fn = student(ns, "train_bpe")
    text, vocab_size, specials = speed_text(), SPEED_VOCAB_SIZE, [EOT]
    what = (f"train_bpe on the first {len(text):,} characters of tiny Shakespeare, "
            f"vocab_size={vocab_size}, special_tokens={specials}")
    # The student's own helpers, not the reference's: those would be lent over the wire, and a
    # round trip per merge would be timed. A wrong helper fails its own checks, not the speed gate.
    # A first look on 20 KB, so that a very slow train_bpe fails in seconds, not minutes.
    small = text[:20_000]
    ref.train_bpe(small, 400, specials)  # warm-up
    t_small_ref = _timed(ref.train_bpe, small, 400, specials)[0]
    t_small = _timed(lambda: _train(fn, small, 400, specials, what), )[0]
    if t_small > 5 * SPEED_LIMIT * t_small_ref and t_small > 0.5:
        _too_slow(what.replace(f"{len(text):,}", f"{len(small):,}").replace(f"={vocab_size}", "=400"),
                  t_small, t_small_ref)
    t_ref = _timed(ref.train_bpe, text, vocab_size, specials)[0]
    t_student, (vocab, merges) = _timed(lambda: _train(fn, text, vocab_size, specials, what))
    _speed_gate(merges, _reference_speed_merges(), what)
    if t_student > SPEED_LIMIT / 2 * t_ref:  # not clearly fast: time the reference once more
        t_ref = min(t_ref, _timed(ref.train_bpe, text, vocab_size, specials)[0])
    if SPEED_LIMIT < t_student / t_ref < 2 * SPEED_LIMIT:  # close: time yours again (noisy machines)
        t_student = min(t_student, _timed(fn, text, vocab_size, list(specials))[0])
    if t_student > SPEED_LIMIT * t_ref:
        _too_slow(what, t_student, t_ref)


_SPEED_MERGES: list = []


def _reference_speed_merges() -> list:
    if not _SPEED_MERGES:
        _SPEED_MERGES.extend(ref.train_bpe(speed_text(), SPEED_VOCAB_SIZE, [EOT])[1])
    return _SPEED_MERGES


def _speed_gate(merges, ref_merges, what):
    """A fast answer must be a BPE: a fair share of the reference's merges (any tie-breaking or
    other single mistake keeps far more than a quarter), and merges that build on earlier ones."""
    shared = len(set(merges) & set(ref_merges))
    longer = sum(len(a + b) >= 3 for a, b in merges)
    if shared < len(ref_merges) // 4 or longer < len(merges) // 3:
        raise GradingFailure(
            f"{what}: only {shared} of your {len(merges)} merges are among the reference's "
            f"{len(ref_merges)}, and {longer} of them make tokens of 3 bytes or more: the speed test "
            f"needs a train_bpe that works (see the other tests of part 1)")


def _too_slow(what, t_student, t_ref):
    raise GradingFailure(
        f"{what}: took {t_student:.2f} s, {t_student / t_ref:.1f} times the reference's {t_ref:.2f} s on "
        f"this machine (allowed: {SPEED_LIMIT:g} times). Don't recount every pair of every pre-token after "
        f"each merge: update the pair counts of the pre-tokens that contain the merged pair only (an index "
        f"pair -> pre-tokens), and work with distinct pre-tokens and their counts")


# --- part 2: BPETokenizer -----------------------------------------------------------------------

_TOKENIZERS: dict = {}


def _bytes_vocab() -> dict[int, bytes]:
    return {i: bytes([i]) for i in range(256)}


def reference_tokenizers() -> list[tuple[str, dict, list, list]]:
    """(description, vocab, merges, special tokens) of the reference tokenizers the encode and
    decode checks use; trained once per kernel."""
    if not _TOKENIZERS:
        from llmcourse.data import load_text

        shakespeare = load_text("tinyshakespeare")
        rng = random.Random(60)
        unicode_text = "".join(random_unicode(rng, 6) + rng.choice(["  ", " ", "\n"]) for _ in range(600))
        rng = random.Random(61)
        runs = "".join(rng.choice(["a", "b", " ", "\n", "ab", "!", "1", "é"]) * rng.randint(1, 9)
                       for _ in range(2000))
        for label, text, vocab_size in (
                ("trained on 40 KB of Shakespeare, vocab_size=500", shakespeare[:40_000], 500),
                ("trained on random unicode text, vocab_size=600", unicode_text, 600),
                ("trained on runs of letters, spaces and digits, vocab_size=300", runs, 300)):
            vocab, merges = ref.train_bpe(text, vocab_size, [EOT])
            _TOKENIZERS[label] = (vocab, merges, [EOT])
    return [(label, *value) for label, value in _TOKENIZERS.items()]


def encode_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    fixed = ["", " ", "   ", "\n\n\n", "a", "Hello, world!", "  leading", "trailing  ", "👋🏽", "e\u0301",
             "aaaaaaa", "abababab", "      x", "It's 1984, isn't it?", "First Citizen:\nBefore we proceed"]
    runs = ["".join(rng.choices("ab \n", [4, 4, 1, 1], k=rng.randint(5, 40))) for _ in range(15)]
    return fixed + runs + [random_unicode(rng, rng.randint(1, 40)) for _ in range(40)]


def _encode_check(tok, text, expected, what):
    got = call_student(tok.encode, text, what=f"{what}: encode({_short(text)})")
    if not isinstance(got, list):
        raise GradingFailure(f"{what}: encode must return a list of int, got {type(got).__name__}")
    if got != expected:
        vocab = tok.vocab
        shown = lambda ids: [vocab.get(i, "?") if isinstance(i, int) else i for i in ids[:20]]  # noqa: E731
        i = next((k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
        raise GradingFailure(
            f"{what}: encode({_short(text)}) differs from the reference at position {i}: you give "
            f"{len(got)} ids, tokens {shown(got[max(0, i - 2):])}..., the reference {len(expected)} ids, "
            f"tokens {shown(expected[max(0, i - 2):])}... (inside each pre-token, merge the adjacent pair "
            f"with the lowest rank first, repeatedly)")


def check_encode(ns):
    cls = student(ns, "BPETokenizer")
    from llmcourse.data import load_text

    val = load_text("tinyshakespeare")[-5_000:]
    with _helpers(ns):
        for k, (label, vocab, merges, _specials) in enumerate(reference_tokenizers()):
            for specials in (None, []):
                what = f"BPETokenizer(vocab, merges, special_tokens={specials}) {label}"
                tok = call_student(cls, dict(vocab), list(merges), specials and list(specials), what=what)
                reference = ref.BPETokenizer(vocab, merges, specials)
                for text in encode_texts(70 + k) + [val[i:i + 300] for i in range(0, 1500, 300)]:
                    _encode_check(tok, text, reference.encode(text), what)


def _special_tokenizer(specials: list[str]):
    """Bytes, the special tokens, and merges of disjoint pairs of letters (and of <, |), whose
    order cannot matter: encode is graded on special tokens only."""
    vocab = _bytes_vocab()
    for s in specials:
        vocab[len(vocab)] = s.encode("utf-8")
    merges = [(b"h", b"i"), (b"t", b"o"), (b"a", b"n"), (b"<", b"|"), (b"x", b"y"), (b" ", b"w")]
    for a, b in merges:
        vocab[len(vocab)] = a + b
    return vocab, merges


SPECIAL_ENCODE_SETS = [
    ["<|endoftext|>", "<|endoftext|><|endoftext|>"],
    ["<|eot|>", "<|eot|><|eot|>", "<|eot|><|eot|><|eot|>"],
    ["[MASK]", "[MASK]]", "a.b", "(x)", "$^+"],
    ["<s>", "<s>>", "</s>", "<|θ|>", "👋🏽"],
]


def special_texts(seed: int, specials: list[str]) -> list[str]:
    """Special tokens anywhere, between words of which each pre-token holds at most one pair that is
    a merge of _special_tokenizer: a wrong merge order changes nothing here."""
    rng = random.Random(seed)
    words = ["hi", "to", "an", "xy", " way", "hint", "tan", "axb", "<|", "|>", "<", "(", "[", "MASK", "\n",
             "<|endoftext", "endoftext|>", "eot", "θ", "👋", "🏽"]
    texts = ["".join(specials), "".join(reversed(specials)), specials[0] * 3, "hi" + specials[-1] + "to",
             specials[0][:-1], specials[0][1:], " " + specials[0] + " ", "h" + specials[0] + "i"]
    for _ in range(25):
        parts = []
        for _ in range(rng.randint(1, 12)):
            item = rng.choice(specials) if rng.random() < 0.4 else rng.choice(words)
            if parts and item not in specials and parts[-1] not in specials:
                parts.append(rng.choice([" ", ",", "\n", "1"]))  # never two words back to back
            parts.append(item)
        texts.append("".join(parts))
    return texts


def check_encode_special_tokens(ns):
    cls = student(ns, "BPETokenizer")
    with _helpers(ns, split_on_special_tokens=True):
        for k, specials in enumerate(SPECIAL_ENCODE_SETS):
            vocab, merges = _special_tokenizer(specials)
            for order in (specials, list(reversed(specials))):
                what = f"BPETokenizer(vocab, merges, special_tokens={order}) with merges {merges}"
                tok = call_student(cls, dict(vocab), list(merges), list(order), what=what)
                reference = ref.BPETokenizer(vocab, merges, list(order))
                for text in special_texts(80 + k, specials):
                    _encode_check(tok, text, reference.encode(text),
                                  what + " (a special token is one id; the longest one wins)")
        vocab, merges = _special_tokenizer(SPECIAL_ENCODE_SETS[0])
        tok = call_student(cls, dict(vocab), list(merges), None, what="BPETokenizer(vocab, merges) (no special tokens)")
        reference = ref.BPETokenizer(vocab, merges)
        for text in special_texts(85, SPECIAL_ENCODE_SETS[0]):
            _encode_check(tok, text, reference.encode(text),
                          "BPETokenizer(vocab, merges) without special tokens: they are ordinary text")


def check_decode(ns):
    cls = student(ns, "BPETokenizer")
    with _helpers(ns):
        for k, (label, vocab, merges, specials) in enumerate(reference_tokenizers()):
            what = f"BPETokenizer(vocab, merges, {specials}) {label}"
            tok = call_student(cls, dict(vocab), list(merges), specials and list(specials), what=what)
            reference = ref.BPETokenizer(vocab, merges, specials)
            rng = random.Random(90 + k)
            texts = encode_texts(95 + k) + [random_unicode(rng, 10) + EOT + random_unicode(rng, 5)]
            for text in texts:
                ids = reference.encode(text)
                got = call_student(tok.decode, list(ids), what=f"{what}: decode(the reference's ids of {_short(text)})")
                assert_equal(got, text, what=f"{what}: decode(encode({_short(text)})), with the reference's "
                             f"encode (the round trip must give the text back)")
                for cut in sorted({1, len(ids) // 2, max(0, len(ids) - 1)}):  # prefixes cut characters
                    prefix = ids[:cut]
                    got = call_student(tok.decode, list(prefix), what=f"{what}: decode({prefix[:12]}...)")
                    assert_equal(got, reference.decode(prefix), what=f"{what}: decode of the first {cut} ids "
                                 f"of encode({_short(text, 40)}) (invalid UTF-8 becomes U+FFFD)")
            ids_pool = sorted(vocab)
            for _ in range(30):
                ids = [rng.choice(ids_pool) for _ in range(rng.randint(0, 12))]
                if rng.random() < 0.5:
                    ids += [rng.choice([0xC3, 0xE2, 0xF0, 0x80, 0xBF, 0xFF])]
                got = call_student(tok.decode, list(ids), what=f"{what}: decode({ids})")
                assert_equal(got, reference.decode(ids), what=f"{what}: decode({ids}) (the joined bytes, "
                             f"decoded with errors='replace')")


# --- part 3: one_hot ----------------------------------------------------------------------------

ONE_HOT_CASES = [((), 5), ((7,), 3), ((2, 3), 10), ((2, 0), 4), ((0,), 1), ((2, 3, 4), 50), ((1,), 1),
                 ((4, 1, 2), 2), ((64,), 1000)]
NO_ONE_HOT = "Build the one-hot vectors yourself (compare with torch.arange, or scatter ones); F.one_hot is not allowed."
_DEVICE_ERRORS = ("same device", "expected device", "two devices", "different device")


def _meta_device_check(fn, args, what):
    """A meta tensor stands in for a GPU on machines without one: code that creates a tensor on the
    CPU inside the function returns a CPU tensor or fails with a device mismatch. Inconclusive
    (passes) when the code needs real data (``.item()``), which meta tensors don't have."""
    try:
        out = fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:
        if any(e in str(err).lower() for e in _DEVICE_ERRORS):
            raise GradingFailure(f"{what}: your code raised {type(err).__name__}: {err} (create every new "
                                 f"tensor on the device of the input, e.g. device=ids.device)") from err
        return
    if isinstance(out, torch.Tensor) and out.device.type != "meta":
        raise GradingFailure(f"{what}: for an input on another device (here 'meta') you returned a tensor on "
                             f"{out.device}: create new tensors on the input's device (device=ids.device)")


def check_one_hot(ns):
    fn = student(ns, "one_hot")

    def check(device):
        for seed, (shape, vocab_size) in enumerate(ONE_HOT_CASES):
            ids = torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(device)
            what = f"one_hot(ids, {vocab_size}) for ids of shape {shape} on {device}"
            with forbid("one_hot", reason=NO_ONE_HOT):
                got = call_student(fn, ids, vocab_size, what=what)
            expected = ref.one_hot(ids, vocab_size)
            if not isinstance(got, torch.Tensor):
                raise GradingFailure(f"{what}: expected a tensor, got {type(got).__name__}")
            if got.device != ids.device:
                raise GradingFailure(f"{what}: the result is on {got.device}, not on the device of ids")
            if got.dtype != torch.float32:
                raise GradingFailure(f"{what}: the result has dtype {got.dtype}, expected torch.float32")
            assert_close(got, expected, atol=0, rtol=0, what=what + " (shape (*ids.shape, vocab_size))")

    with single_thread():
        on_each_device(check)
    for shape, vocab_size in (((3, 4), 5), ((2, 0, 3), 4), ((5,), 7)):
        with forbid("one_hot", reason=NO_ONE_HOT):
            _meta_device_check(fn, (torch.empty(shape, dtype=torch.long, device="meta"), vocab_size),
                               f"one_hot(ids, {vocab_size}) for ids of shape {shape} on the meta device")


# --- part 4: word2vec ---------------------------------------------------------------------------

SGNS_CASES = [  # (B, K, d, dtype, scale of the vectors)
    (1, 1, 1, torch.float32, 1.0), (4, 3, 8, torch.float32, 1.0), (16, 5, 10, torch.float64, 1.0),
    (8, 4, 6, torch.float32, 0.01), (1, 7, 3, torch.float64, 3.0), (32, 10, 16, torch.float32, 0.5),
    (3, 2, 4, torch.float64, 30.0), (5, 3, 2, torch.float32, 25.0),
]


def _sgns_inputs(B, K, d, dtype, scale, seed, device):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*shape, generator=g, dtype=dtype) * scale for shape in ((B, d), (B, d), (B, K, d))]
    return [t.to(device) for t in tensors]


def _compare_sgns(fn, inputs, what, atol, rtol):
    mine = [t.detach().clone().requires_grad_(True) for t in inputs]
    theirs = [t.detach().clone().requires_grad_(True) for t in inputs]
    got = call_student(fn, *mine, what=what)
    expected = ref.sgns_loss(*theirs)
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        raise GradingFailure(f"{what}: sgns_loss must return a scalar (0-d) tensor, got "
                             f"{type(got).__name__} of shape {tuple(getattr(got, 'shape', ()))}")
    assert_close(got, expected, atol=atol, rtol=rtol, what=f"{what}: the loss (the mean over the batch "
                 f"of -[log sigma(u_o . v_c) + sum_k log sigma(-u_nk . v_c)])")
    if not got.requires_grad:
        raise GradingFailure(f"{what}: the loss has no gradient (don't detach, use torch operations)")
    call_student(got.backward, what=f"{what}: backward()")
    expected.backward()
    assert_gradients([(name, a, b.grad) for name, a, b in zip(("center", "context", "negatives"), mine, theirs,
                                                              strict=True)],
                     what=what, atol=atol, rtol=rtol, of="the loss")


def check_sgns_loss(ns):
    fn = student(ns, "sgns_loss")

    def check(device):
        for seed, (B, K, d, dtype, scale) in enumerate(SGNS_CASES):
            inputs = _sgns_inputs(B, K, d, dtype, scale, seed, device)
            tol = 1e-5 if dtype == torch.float32 else 1e-10
            _compare_sgns(fn, inputs, f"sgns_loss(center {tuple(inputs[0].shape)}, context, negatives "
                          f"{tuple(inputs[2].shape)}), {dtype}, vectors of scale {scale}, on {device}",
                          atol=tol, rtol=tol)
        # Dot products of +-1000 and +-2000: log sigma must not become -inf.
        center = torch.tensor([[1000.0, 0.0], [0.0, -1000.0]], device=device)
        context = torch.tensor([[-1.0, 0.0], [0.0, 2.0]], device=device)
        negatives = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, -1.0], [0.0, 1.0]]], device=device)
        _compare_sgns(fn, [center, context, negatives], "sgns_loss with dot products of +-1000 and -2000 "
                      f"(use F.logsigmoid, not log(sigmoid)), on {device}", atol=1e-3, rtol=1e-6)

    with single_thread():
        on_each_device(check)
    meta = [torch.empty(s, device="meta") for s in ((4, 3), (4, 3), (4, 2, 3))]
    _meta_device_check(fn, meta, "sgns_loss for inputs on the meta device")


def _check_embeddings(model, vocab_size, dim, what):
    if not is_instance(model, nn.Module):
        raise GradingFailure(f"{what}: SkipGram must be an nn.Module")
    for name in ("in_embed", "out_embed"):
        emb = getattr(model, name, None)
        if not is_instance(emb, nn.Embedding):
            raise GradingFailure(f"{what}: .{name} must be an nn.Embedding, got {type_name(emb)}")
        if tuple(emb.weight.shape) != (vocab_size, dim):
            raise GradingFailure(f"{what}: .{name}.weight has shape {tuple(emb.weight.shape)}, "
                                 f"expected {(vocab_size, dim)}")
    if model.in_embed is model.out_embed or len(list(model.parameters())) < 2:  # parameters() lists a shared one once
        raise GradingFailure(f"{what}: in_embed and out_embed must be two different embeddings")


def check_skipgram(ns):
    cls = student(ns, "SkipGram")

    def check(device):
        for seed, (V, d, B, K) in enumerate([(10, 4, 2, 3), (50, 8, 16, 5), (7, 3, 1, 1), (100, 16, 32, 10)]):
            what = f"SkipGram({V}, {d}) with random weights, a batch of {B} pairs with {K} negatives, on {device}"
            torch.manual_seed(seed)
            model = call_student(cls, V, d, what=what)
            _check_embeddings(model, V, d, what)
            reference = ref.SkipGram(V, d)
            g = torch.Generator().manual_seed(100 + seed)
            w_in, w_out = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
            for m in (model, reference):
                m.load_state_dict({"in_embed.weight": w_in, "out_embed.weight": w_out}, strict=False)
            model.to(device)
            reference.to(device)
            ids = [torch.randint(V, shape, generator=g).to(device) for shape in ((B,), (B,), (B, K))]
            loss = call_student(model, *ids, what=what)
            expected = reference(*ids)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise GradingFailure(f"{what}: forward must return the scalar loss, got {loss!r:.100}")
            assert_close(loss, expected, atol=1e-5, rtol=1e-5, what=f"{what}: the loss (center vectors from "
                         f"in_embed, context and negative vectors from out_embed)")
            call_student(loss.backward, what=f"{what}: backward()")
            expected.backward()
            for name in ("in_embed", "out_embed"):
                got_grad = getattr(model, name).weight.grad
                if got_grad is None:
                    raise GradingFailure(f"{what}: {name}.weight got no gradient")
                assert_close(got_grad, getattr(reference, name).weight.grad, atol=1e-5, rtol=1e-5,
                             what=f"{what}: the gradient of {name}.weight")

    with swapped(ns, sgns_loss=ref.sgns_loss), single_thread():
        on_each_device(check)


CLASSES = {
    "royal": ["king", "queen", "prince"], "army": ["army", "guards", "knights"],
    "hunter": ["cat", "dog", "fox"], "prey": ["mouse", "bird", "frog"],
    "drink": ["wine", "ale", "tea"], "food": ["bread", "cheese", "honey"],
    "colour": ["red", "blue", "green"], "garment": ["dress", "cloak", "hat"],
}
TEMPLATES = ["the {royal} commands his {army} .", "my {hunter} chases a small {prey} .",
             "we drink {drink} with {food} daily .", "she wore a {colour} {garment} today ."]


def synthetic_language(seed: int, n_sentences: int = 2000) -> list[str]:
    """Sentences in which the words of each class are interchangeable: they share all contexts."""
    rng = random.Random(seed)
    words = []
    for _ in range(n_sentences):
        template = rng.choice(TEMPLATES)
        words += template.format(**{c: rng.choice(ws) for c, ws in CLASSES.items()}).split()
    return words


def train_skipgram(model, words: list[str], vocab: list[str], steps=400, batch_size=256, k=5, lr=0.03,
                   seed=0, window=2):
    """The hidden test's own training loop (the notebook's may have been edited)."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([index[w] for w in words])
    centers = torch.cat([ids[:-o] for o in range(1, window + 1)] + [ids[o:] for o in range(1, window + 1)])
    contexts = torch.cat([ids[o:] for o in range(1, window + 1)] + [ids[:-o] for o in range(1, window + 1)])
    noise = torch.bincount(ids, minlength=len(vocab)).double() ** 0.75
    noise /= noise.sum()
    g = torch.Generator().manual_seed(seed)
    optimizer = beside(model, torch.optim.Adam)(model.parameters(), lr=lr)  # steps the student's weights
    for _ in range(steps):
        batch = torch.randint(len(centers), (batch_size,), generator=g)
        negatives = torch.multinomial(noise, batch_size * k, replacement=True, generator=g).view(batch_size, k)
        loss = model(centers[batch], contexts[batch], negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def neighbour_report(model, vocab: list[str]) -> tuple[int, int, dict]:
    """(class words whose nearest neighbour is in their class, class words, wrong ones)."""
    vectors = torch.nn.functional.normalize(model.in_embed.weight.detach().float().cpu(), dim=-1)
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2.0)
    class_of = {w: c for c, ws in CLASSES.items() for w in ws}
    right, wrong = 0, {}
    for w in class_of:
        nearest = vocab[int(similarity[vocab.index(w)].argmax())]
        if class_of.get(nearest) == class_of[w]:
            right += 1
        else:
            wrong[w] = nearest
    return right, len(class_of), wrong


NEIGHBOURS_REQUIRED = 22  # of the 24 class words (the reference gets all 24 for any seed)


def check_skipgram_training(ns):
    cls = student(ns, "SkipGram")
    words = synthetic_language(7)
    vocab = sorted(set(words))
    what = (f"SkipGram({len(vocab)}, 24) trained for 400 steps (Adam, lr 0.03, batch 256, 5 negatives, "
            f"window 2) on a synthetic language in which {', '.join('/'.join(ws) for ws in CLASSES.values())} "
            f"are interchangeable, e.g. {' '.join(words[:12])!r}")
    with swapped(ns, sgns_loss=ref.sgns_loss), single_thread():
        beside(cls, torch.manual_seed)(0)
        model = call_student(cls, len(vocab), 24, what=what)
        _check_embeddings(model, len(vocab), 24, what)
        call_student(train_skipgram, model, words, vocab, what=what)
    right, total, wrong = neighbour_report(model, vocab)
    if right < NEIGHBOURS_REQUIRED:
        raise GradingFailure(
            f"{what}: only {right} of {total} words have a word of their own class as nearest neighbour "
            f"(cosine similarity of in_embed), at least {NEIGHBOURS_REQUIRED} needed; wrong: {wrong}. Check "
            f"the initialization (in_embed uniform in [-0.5/dim, 0.5/dim], out_embed zeros) and that both "
            f"embeddings are trained")
