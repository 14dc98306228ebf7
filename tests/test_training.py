"""The shared training utilities (llmcourse.training) and the names data they feed on."""

from __future__ import annotations

import math

import pytest
import torch

from llmcourse.data import (
    BOS,
    DATE_FORMATS,
    EOS,
    PAD,
    char_vocab,
    date_pairs,
    load_text,
    names_splits,
    seq2seq_vocab,
)
from llmcourse.training import (
    History,
    char_gpt,
    context_windows,
    fit,
    mean_loss,
    pad_sequences,
    random_chunks,
    random_rows,
)


def test_names_splits_are_makemores():
    train_words, dev, test = names_splits()
    assert (len(train_words), len(dev), len(test)) == (25626, 3203, 3204)
    assert train_words[:3] == ["yuheng", "diondre", "xavien"]  # makemore's shuffle with seed 42
    assert sorted(train_words + dev + test) == sorted(names_splits(seed=1)[0] + names_splits(seed=1)[1]
                                                       + names_splits(seed=1)[2])


def test_char_vocab_puts_the_end_token_first():
    stoi, itos = char_vocab(["emma", "ava"])
    assert itos == [".", "a", "e", "m", "v"] and stoi == {c: i for i, c in enumerate(itos)}
    assert char_vocab(["ba"], first=None)[1] == ["a", "b"]


def test_context_windows():
    stoi, _ = char_vocab(["emma"])
    X, Y = context_windows(["emma"], stoi, 3)
    assert X.dtype == Y.dtype == torch.long and X.shape == (5, 3) and Y.shape == (5,)
    e, m, a = stoi["e"], stoi["m"], stoi["a"]
    assert X.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, m], [m, m, a]]
    assert Y.tolist() == [e, m, m, a, 0]


def test_random_chunks_targets_are_the_next_ids():
    data = torch.arange(100)
    x, y = random_chunks(data, 8, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1) and int(y.max()) <= 99
    rows = random_rows(10, 64, torch.Generator().manual_seed(0))
    assert rows.shape == (64,) and 0 <= int(rows.min()) and int(rows.max()) < 10


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return x, y


def test_train_fits_evaluates_and_clips():
    torch.manual_seed(0)
    x, y = _regression()
    model = torch.nn.Linear(4, 1)
    clips, evals = [], []

    def clip(parameters, max_norm):
        clips.append(max_norm)
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    history = fit(model, lambda step: ((model(x).squeeze(-1) - y) ** 2).mean(), 200,
                    torch.optim.SGD(model.parameters(), lr=0.1), clip=clip, max_norm=5.0,
                    evaluate=lambda: {"mse": ((model(x).squeeze(-1) - y) ** 2).mean()}, eval_every=50,
                    on_eval=evals.append, progress=False)
    assert len(history.train) == 200 and len(clips) == 200 and clips[0] == 5.0
    assert history.eval_steps == [0, 50, 100, 150, 199] == evals
    assert history.evals["mse"][-1] < 1e-3 < history.evals["mse"][0]
    assert not model.training  # left in eval mode, ready to sample
    assert len(history.smoothed(50)) == 4 and history.smoothed(50)[-1] < history.smoothed(50)[0]


def test_train_stops_when_the_loss_is_not_finite(capsys):
    model = torch.nn.Linear(1, 1)
    history = fit(model, lambda step: model.weight.sum() * (math.inf if step == 3 else 1.0), 10,
                    torch.optim.SGD(model.parameters(), lr=0.0), progress=False)
    assert len(history.train) == 3 and "stopping" in capsys.readouterr().out


def test_mean_loss_weights_by_predictions():
    # Two batches of rows: means 1.0 over 3 predictions and 4.0 over 1 prediction.
    means = {0: (1.0, 3), 2: (4.0, 1)}
    assert mean_loss(lambda rows: means[int(rows[0])], 4, batch_size=2) == pytest.approx(7 / 4)
    assert History().smoothed() == []


def test_date_pairs_are_deterministic_and_correct():
    import datetime

    pairs = date_pairs(2000, seed=3)
    assert pairs == date_pairs(2000, seed=3) and pairs != date_pairs(2000, seed=4)
    assert pairs[:2] == [("sep 12 1992", "1992-09-12"), ("26.08.2047", "2047-08-26")]
    for text, iso in pairs:
        date = datetime.date.fromisoformat(iso)
        assert datetime.date(1950, 1, 1) <= date <= datetime.date(2049, 12, 31)
        assert str(date.year) in text and (str(date.day) in text or f"{date.day:02d}" in text)
    assert {DATE_FORMATS["ordinal"](datetime.date(2019, 3, d)) for d in (1, 2, 3, 11, 12, 13, 21, 22, 23)} == {
        f"the {o} of March 2019" for o in ("1st", "2nd", "3rd", "11th", "12th", "13th", "21st", "22nd", "23rd")}
    assert {text.split()[0] for text, _ in date_pairs(500, formats=["weekday"])} >= {"monday,", "sunday,"}
    assert DATE_FORMATS["weekday"](datetime.date(2019, 3, 3)) == "sunday, 3 march 2019"


def test_seq2seq_vocab_and_padding():
    stoi, itos = seq2seq_vocab(["ba", "2019"])
    assert itos[:3] == [PAD, BOS, EOS] and itos[3:] == ["0", "1", "2", "9", "a", "b"]
    assert pad_sequences([[5, 6, 7], [8]], pad=0).tolist() == [[5, 6, 7], [8, 0, 0]]
    assert pad_sequences([[5, 6, 7], [8], []], pad=1, side="left").tolist() == [[5, 6, 7], [1, 1, 8], [1, 1, 1]]
    assert pad_sequences([[]]).shape == (1, 0) and pad_sequences([]).shape == (0, 0)


def test_char_gpt_trains_once_then_loads_the_same_weights(tmp_path, monkeypatch):
    """Units 07-09 decode and fine-tune a trained GPT: the first call trains it deterministically with
    unit 06's reference, later calls load the cached weights, and a changed trainer retrains."""
    from llmcourse.grading import reference
    from llmcourse.runtime import single_thread

    monkeypatch.setenv("LLMCOURSE_CACHE_DIR", str(tmp_path))
    trainer = reference("06_training")
    with single_thread():
        model, stoi, itos = char_gpt("draft", trainer)
    assert not model.training and len(itos) == 65 and stoi["a"] == itos.index("a")
    (cached,) = (tmp_path / "models").glob("char-gpt-draft-*.pt")
    written = cached.stat().st_mtime_ns
    again, _, _ = char_gpt("draft", trainer)
    assert cached.stat().st_mtime_ns == written and len(list((tmp_path / "models").iterdir())) == 1
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    calls = []

    def edited_train(model, data, config):  # another source: another cache key
        calls.append(config.max_iters)

    monkeypatch.setattr(trainer, "train", edited_train)
    char_gpt("draft", trainer)
    assert calls == [400] and len(list((tmp_path / "models").glob("char-gpt-draft-*.pt"))) == 2
    monkeypatch.undo()
    # trained, not just initialized: well under the uniform distribution's loss, ln 65 = 4.17
    text = load_text("tinyshakespeare")
    val = torch.tensor([stoi[c] for c in text[int(0.9 * len(text)):]])
    with torch.no_grad():
        x = torch.stack([val[i:i + 64] for i in range(0, 6400, 64)])
        _, loss = model(x[:, :-1], x[:, 1:])
    assert loss.item() < 2.7, loss.item()
