"""The data loader: mirror, cache, download, checksum and the offline error. No network: the
"download" is served from a file:// URL, and the offline case from an unreachable one."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest

from llmcourse import data


def _fake_dataset(tmp_path, content: bytes = b"to be or not to be\n"):
    src = tmp_path / "origin" / "tiny.txt"
    src.parent.mkdir()
    src.write_bytes(content)
    return data.Dataset(filename="tiny.txt", url=src.as_uri(),
                        sha256=hashlib.sha256(content).hexdigest(), size=len(content))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache, no mirror, and a fake dataset registered as 'tiny'."""
    monkeypatch.setenv("LLMCOURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMCOURSE_DATA_DIR", raising=False)
    ds = _fake_dataset(tmp_path)
    monkeypatch.setitem(data.DATASETS, "tiny", ds)
    return tmp_path, ds


def test_download_then_cache(isolated, monkeypatch):
    tmp_path, ds = isolated
    path = data.data_path("tiny")
    assert path == tmp_path / "cache" / "tiny.txt" and path.read_bytes() == b"to be or not to be\n"

    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    assert data.load_text("tiny") == "to be or not to be\n"


def test_mirror_is_used_first(isolated, monkeypatch):
    tmp_path, ds = isolated
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tiny.txt").write_bytes(b"to be or not to be\n")
    monkeypatch.setenv("LLMCOURSE_DATA_DIR", str(mirror))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    assert data.data_path("tiny") == mirror / "tiny.txt"
    assert not (tmp_path / "cache" / "tiny.txt").exists()


def test_checksum_mismatch_in_mirror_is_an_error(isolated, monkeypatch):
    tmp_path, ds = isolated
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tiny.txt").write_bytes(b"to be or not to be?\n")
    monkeypatch.setenv("LLMCOURSE_DATA_DIR", str(mirror))
    with pytest.raises(data.ChecksumError, match="expected " + ds.sha256):
        data.data_path("tiny")


def test_corrupt_download_is_not_cached(isolated, monkeypatch):
    tmp_path, ds = isolated
    monkeypatch.setitem(data.DATASETS, "tiny", data.Dataset("tiny.txt", ds.url, "0" * 64, ds.size))
    with pytest.raises(data.ChecksumError):
        data.data_path("tiny")
    assert not (tmp_path / "cache" / "tiny.txt").exists()


def test_offline_error_says_what_to_do(isolated, monkeypatch):
    tmp_path, ds = isolated

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataUnavailableError) as err:
        data.data_path("tiny")
    message = str(err.value)
    assert "LLMCOURSE_DATA_DIR" in message and ds.url in message and "cache" in message
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_unknown_dataset():
    with pytest.raises(KeyError, match="tinyshakespeare"):
        data.data_path("wikipedia")


def test_course_corpora_match_the_blueprint():
    text = data.load_text("tinyshakespeare")
    assert len(text.encode()) == 1_115_394
    names = data.load_text("names").split()
    assert len(names) == 32_033


def test_word_helpers():
    assert data.tokenize_words("O Romeo, Romeo! wherefore art thou?") == \
        ["o", "romeo", ",", "romeo", "!", "wherefore", "art", "thou", "?"]
    assert data.word_sentences("A b.\n\n  \nC") == [["a", "b", "."], ["c"]]
    train, dev, test = data.split_dataset(list(range(100)), seed=1)
    assert (len(train), len(dev), len(test)) == (80, 10, 10)
    assert sorted(train + dev + test) == list(range(100))
    assert data.split_dataset(list(range(100)), seed=1) == (train, dev, test)
