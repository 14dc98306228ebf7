"""Data: one loader for every corpus, and the text helpers that lectures and assignments share.

Every file is resolved in this order:

1. the mirror folder named by ``LLMCOURSE_DATA_DIR`` (offline clusters, CI),
2. the local cache (``LLMCOURSE_CACHE_DIR``, default ``~/.cache/llmcourse``),
3. a download from the canonical URL into the cache.

Each copy is checked against the published sha256, so a truncated download or an edited mirror
fails loudly instead of silently changing every number in the course.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dataset:
    """A corpus the course uses: where it comes from and what it must hash to."""

    filename: str
    url: str
    sha256: str
    size: int
    licence: str = ""


DATASETS: dict[str, Dataset] = {
    "tinyshakespeare": Dataset(
        filename="tinyshakespeare.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
    ),
    "names": Dataset(
        filename="names.txt",
        url="https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        sha256="0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
        size=228_145,
        licence="MIT",
    ),
}

DOWNLOAD_TIMEOUT_S = 30


class DataUnavailableError(RuntimeError):
    """The file is in no mirror, not cached, and could not be downloaded."""


class ChecksumError(RuntimeError):
    """A copy of a dataset does not hash to its published sha256."""


def cache_dir() -> Path:
    """The folder downloads are cached in (``LLMCOURSE_CACHE_DIR`` or ``~/.cache/llmcourse``)."""
    return Path(os.environ.get("LLMCOURSE_CACHE_DIR") or Path.home() / ".cache" / "llmcourse")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, ds: Dataset, where: str) -> Path:
    actual = sha256_of(path)
    if actual != ds.sha256:
        raise ChecksumError(
            f"{path} ({where}) has sha256 {actual}, expected {ds.sha256}. The file is corrupt or "
            f"a different version: delete it and fetch it again from {ds.url}."
        )
    return path


def data_path(name: str) -> Path:
    """Path to a verified local copy of dataset ``name`` (a key of ``DATASETS``).

    Looks in ``LLMCOURSE_DATA_DIR``, then the cache, then downloads into the cache.
    Raises ``DataUnavailableError`` with instructions when all three fail, and ``ChecksumError``
    when a copy exists but is not the published file.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    ds = DATASETS[name]

    mirror = os.environ.get("LLMCOURSE_DATA_DIR")
    if mirror:
        candidate = Path(mirror) / ds.filename
        if candidate.is_file():
            return _verified(candidate, ds, "from LLMCOURSE_DATA_DIR")

    cached = cache_dir() / ds.filename
    if cached.is_file():
        return _verified(cached, ds, "cached")

    try:
        _download(ds.url, cached)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        mirror_note = (
            f"LLMCOURSE_DATA_DIR={mirror} has no {ds.filename}"
            if mirror
            else "LLMCOURSE_DATA_DIR is not set"
        )
        raise DataUnavailableError(
            f"Cannot get dataset {name!r} ({ds.filename}): {mirror_note}, it is not cached in "
            f"{cache_dir()}, and downloading {ds.url} failed ({err}).\n"
            f"Fix it one of these ways:\n"
            f"  * connect to the internet and run again (it is cached after the first download);\n"
            f"  * download {ds.url} by hand and save it as {cached};\n"
            f"  * point LLMCOURSE_DATA_DIR at a folder that holds {ds.filename} "
            f"(an absolute path: notebooks run in other directories)."
        ) from err
    try:
        return _verified(cached, ds, f"downloaded from {ds.url}")
    except ChecksumError:
        cached.unlink(missing_ok=True)
        raise


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file first so an interrupted download never looks cached.
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
            shutil.copyfileobj(response, tmp)
    os.replace(tmp.name, dest)


def load_text(name: str) -> str:
    """The whole dataset as one UTF-8 string."""
    return data_path(name).read_text(encoding="utf-8")


# --- shared text processing -------------------------------------------------------------------

WORD_PATTERN = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,!?;:]")


def tokenize_words(line: str) -> list[str]:
    """Lower-cased words (with inner apostrophes) and punctuation marks, in order.

    >>> tokenize_words("First Citizen: We are accounted poor citizens, the patricians good.")
    ['first', 'citizen', ':', 'we', 'are', 'accounted', 'poor', 'citizens', ',', 'the', 'patricians', 'good', '.']
    """
    return WORD_PATTERN.findall(line.lower())


def word_sentences(text: str) -> list[list[str]]:
    """One sentence per non-empty line of ``text``, tokenized with ``tokenize_words``.

    Returns a list of sentences, each a list of word strings (length >= 1).
    """
    sentences = (tokenize_words(line) for line in text.splitlines())
    return [s for s in sentences if s]


def split_dataset(items: list, fractions=(0.8, 0.1, 0.1), seed: int = 42) -> tuple[list, ...]:
    """Shuffle ``items`` with a fixed seed and cut them into consecutive parts.

    ``fractions`` must sum to 1; the last part takes the rounding remainder.
    Returns one list per fraction (e.g. train, dev, test).
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    parts, start = [], 0
    for i, frac in enumerate(fractions):
        end = len(shuffled) if i == len(fractions) - 1 else start + int(round(frac * len(shuffled)))
        parts.append(shuffled[start:end])
        start = end
    return tuple(parts)


def shakespeare_word_splits(seed: int = 42) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Tiny Shakespeare at word level, one sentence per line, split 80/10/10 (train, dev, test)."""
    return split_dataset(word_sentences(load_text("tinyshakespeare")), seed=seed)


NAMES_END = "."  # the one token that starts and ends every name, as in makemore


def names_splits(seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """names.txt, one lower-case name per line, split 80/10/10 (train, dev, test).

    With the default seed the parts are makemore's (``random.seed(42)``, shuffle, cut at 80% and 90%).
    """
    names = load_text("names").split()
    return split_dataset(names, seed=seed)


def char_vocab(texts, first: str | None = NAMES_END) -> tuple[dict[str, int], list[str]]:
    """Character vocabulary of ``texts``: ``first`` (if given) gets id 0, the rest sorted after it.

    ``texts`` is a list of strings, or one string (a whole corpus). Returns ``(stoi, itos)`` with
    ``itos[stoi[c]] == c``.
    """
    if isinstance(texts, str):
        texts = [texts]  # one set of a million characters, not a million sets of one
    chars = sorted(set().union(*map(set, texts)) - {first})
    itos = ([first] if first is not None else []) + chars
    return {c: i for i, c in enumerate(itos)}, itos


# --- a toy translation task: dates as people write them -> ISO 8601 -----------------------------

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2 in a seq2seq vocabulary
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


DATE_FORMATS = {
    # name: how a date is written (each unambiguous: day-first wherever digits stand for both)
    "ordinal": lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1]} {d.year}",
    "day_month_year": lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
    "month_day_year": lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    "short_month": lambda d: f"{_MONTHS[d.month - 1][:3].lower()} {d.day} {d.year}",
    "weekday": lambda d: f"{_WEEKDAYS[d.weekday()].lower()}, {d.day} {_MONTHS[d.month - 1].lower()} {d.year}",
    "dotted": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    "slashed": lambda d: f"{d.day}/{d.month}/{d.year}",
}


def date_pairs(n: int, seed: int = 0, formats=None) -> list[tuple[str, str]]:
    """``n`` (human-written date, ISO date) pairs, e.g. ("the 3rd of March 2019", "2019-03-03").

    Dates are uniform over 1950-01-01 .. 2049-12-31 and formats uniform over ``formats`` (names
    from ``DATE_FORMATS``, default all); the same ``seed`` gives the same pairs on every machine.
    """
    import datetime

    rng = random.Random(seed)
    names = sorted(DATE_FORMATS) if formats is None else list(formats)
    first, span = datetime.date(1950, 1, 1).toordinal(), 365 * 100 + 25
    pairs = []
    for _ in range(n):
        date = datetime.date.fromordinal(first + rng.randrange(span))
        pairs.append((DATE_FORMATS[rng.choice(names)](date), date.isoformat()))
    return pairs


def seq2seq_vocab(texts) -> tuple[dict[str, int], list[str]]:
    """Character vocabulary with ``PAD``, ``BOS``, ``EOS`` as ids 0, 1, 2, then the sorted characters.

    Returns ``(stoi, itos)``.
    """
    itos = [PAD, BOS, EOS] + sorted(set().union(*map(set, texts)))
    return {c: i for i, c in enumerate(itos)}, itos
