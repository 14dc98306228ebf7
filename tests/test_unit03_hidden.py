"""Unit 03 (neural language models and RNNs): the reference against PyTorch's own modules, the
hidden cases doing what their checks claim, the training bar's margin, lazy stubs, and the
mistakes students really make, each of which must cost points exactly once. The tests every unit
gets (release stubs, notebook structure, visible tests, whole cells) come from ``unit_harness``.

Plain pytest, no Jupyter kernel: a notebook namespace is a dict of names, as the hidden tests
receive ``globals()`` from the grading kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from unit_harness import C, UnitUnderTest, common_tests

from autograder.hidden import unit03_rnns as hidden
from autograder.references import unit03_rnns as ref
from llmcourse.grading import GradingFailure

UNIT = "03_rnns"
GRADED_NAMES = ["rnn_cell", "RNNLM", "encode_names", "sequence_nll", "clip_grad_norm", "generate"]
# Which notebook names each part's cells use (visible and hidden tests): a mistake in a name can
# only fail the cells of the parts that use it. RNNLM calls rnn_cell (the hidden checks swap in
# the reference's; the visible ones are consistent with the student's own); the training check
# swaps in the reference's batching, loss and clipping.
PART_NAMES = {
    "cell": {"rnn_cell"},
    "rnnlm": {"RNNLM", "rnn_cell"},
    "encode": {"encode_names"},
    "nll": {"sequence_nll"},
    "clip": {"clip_grad_norm"},
    "training": {"RNNLM", "rnn_cell", "encode_names", "sequence_nll", "clip_grad_norm"},
    "generate": {"generate"},
}
CUDA = torch.cuda.is_available()


def part_of(check: str) -> str:
    name = check.removeprefix(C)
    if name == "rnnlm_training":
        return "training"
    for prefix, part in (("rnn_cell", "cell"), ("rnnlm", "rnnlm"), ("encode", "encode"), ("sequence_nll", "nll"),
                         ("clip", "clip"), ("generate", "generate")):
        if name.startswith(prefix):
            return part
    raise KeyError(check)


U = UnitUnderTest(UNIT, hidden, graded_names=GRADED_NAMES, part_names=PART_NAMES, part_of=part_of,
                  helper_cell_ids=("notebook-imports",))
run_check, reference_ns, make_ns = U.run_check, U.reference_ns, U.make_ns


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the reference against PyTorch --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_rnn_cell_matches_pytorch(dtype):
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for seed, (B, n_in, H) in enumerate([(1, 1, 1), (3, 4, 5), (7, 5, 5), (2, 16, 3), (32, 8, 64)]):
        torch.manual_seed(seed)
        cell = nn.RNNCell(n_in, H).to(dtype)
        x, h = torch.randn(B, n_in, dtype=dtype), torch.randn(B, H, dtype=dtype)
        with torch.no_grad():
            got = ref.rnn_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh)
            torch.testing.assert_close(got, cell(x, h), **tol)
            torch.testing.assert_close(got, torch.rnn_tanh_cell(x, h, cell.weight_ih, cell.weight_hh,
                                                                 cell.bias_ih, cell.bias_hh), **tol)


def _load_rnn(model, rnn):
    return model.load_state_dict({k.removesuffix("_l0"): v for k, v in rnn.state_dict().items()}, strict=False)


def test_reference_rnnlm_matches_nn_rnn():
    for seed, (V, E, H, B, T) in enumerate([(27, 8, 16, 4, 7), (5, 3, 3, 1, 1), (11, 6, 9, 1, 12), (3, 2, 5, 2, 20)]):
        torch.manual_seed(seed)
        model, rnn = ref.RNNLM(V, E, H), nn.RNN(E, H, batch_first=True)
        loaded = _load_rnn(model, rnn)
        assert loaded.unexpected_keys == [] and set(loaded.missing_keys) == {
            "embedding.weight", "output.weight", "output.bias"}
        idx, h0 = torch.randint(V, (B, T)), torch.randn(B, H)
        with torch.no_grad():
            for start in (None, h0):
                logits, h_last = model(idx, start)
                out, h_n = rnn(model.embedding(idx), None if start is None else start[None])
                torch.testing.assert_close(logits, model.output(out), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(h_last, h_n[0], atol=1e-6, rtol=1e-5)


def test_reference_rnnlm_copies_an_rnn_cell_and_continues_a_sequence():
    torch.manual_seed(0)
    model, cell = ref.RNNLM(7, 4, 6), nn.RNNCell(4, 6)
    loaded = model.load_state_dict(cell.state_dict(), strict=False)
    assert loaded.unexpected_keys == [] and torch.equal(model.weight_hh, cell.weight_hh)
    idx = torch.randint(7, (3, 10))
    with torch.no_grad():
        whole, h_whole = model(idx)
        for k in (1, 4, 9):
            first, h_k = model(idx[:, :k])
            second, h_end = model(idx[:, k:], h_k)
            torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
            torch.testing.assert_close(h_end, h_whole)


def test_reference_rnnlm_initializes_like_nn_rnncell():
    torch.manual_seed(0)
    model = ref.RNNLM(27, 8, 100)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        p = getattr(model, name)
        assert p.abs().max() <= 0.1 and p.abs().max() > 0.09, name


def test_reference_encode_names_by_definition():
    stoi = {".": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    words = ["emma", "a", "olivia", "bo"]
    inputs, targets = ref.encode_names(words, stoi)
    assert inputs.dtype == targets.dtype == torch.long and inputs.shape == targets.shape == (4, 7)
    for row, word in enumerate(words):
        ids = [stoi[c] for c in word]
        assert inputs[row].tolist() == [0] + ids + [0] * (6 - len(word))
        assert targets[row].tolist() == ids + [0] + [-100] * (6 - len(word))
        # Every real target is the input one position later (the alignment of teacher forcing).
        assert inputs[row, 1:len(word) + 1].tolist() == targets[row, :len(word)].tolist()


def test_reference_sequence_nll_matches_cross_entropy():
    for seed, (shape, dtype, scale, ignore_index) in enumerate(hidden.NLL_CASES):
        logits, targets = hidden._nll_inputs(shape, dtype, scale, ignore_index, seed, "cpu")
        V = shape[-1]
        expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)
        torch.testing.assert_close(ref.sequence_nll(logits, targets, ignore_index), expected)
    for _label, row, target in hidden._stability_cases():
        logits, targets = row.reshape(1, 1, -1), torch.tensor([[target]])
        got = ref.sequence_nll(logits, targets)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, F.cross_entropy(logits.reshape(1, -1), targets.reshape(1)), atol=1e-3,
                                   rtol=1e-6)
    # Every target ignored: nan (0 / 0), as PyTorch (documented, not graded).
    logits, targets = torch.randn(2, 3, 5), torch.full((2, 3), -100)
    assert torch.isnan(ref.sequence_nll(logits, targets))
    assert torch.isnan(F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1)))


def test_reference_clip_grad_norm_matches_pytorch():
    for seed, (shapes, dtype, scale, max_norm) in enumerate(hidden.CLIP_CASES):
        for none in ((), (0,)):
            params = hidden._params_with_grads(shapes, dtype, scale, seed, "cpu", none=none)
            theirs = hidden._clone_grads(params)
            for factor in (1.0, 1e4):  # clipping, and far below max_norm
                norm = ref.clip_grad_norm(iter(params), max_norm * factor)
                expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm * factor)
                torch.testing.assert_close(norm, expected)
                for p, t in zip(params, theirs, strict=True):
                    assert (p.grad is None) == (t.grad is None)
                    if p.grad is not None:
                        torch.testing.assert_close(p.grad, t.grad)
    # Below max_norm the gradients are untouched, bit for bit.
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([0.1, -0.2, 0.3])
    before = p.grad.clone()
    ref.clip_grad_norm([p], 1.0)
    assert torch.equal(p.grad, before)


def _generate_by_rerunning(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    """The definition: re-run the model on the whole prefix at every step."""
    sequence, new = list(start_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([sequence], device=next(model.parameters()).device))
            probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
            new.append(torch.multinomial(probs, num_samples=1, generator=generator).item())
            sequence.append(new[-1])
            if new[-1] == end_id:
                break
    return new


def test_reference_generate_draws_what_rerunning_the_prefix_draws():
    for case, (V, E, H, start_ids, max_new, temperature, end_id, end_bias) in enumerate(hidden.GENERATE_CASES):
        for dtype in (torch.float64, torch.float32):
            model = hidden._generate_model(V, E, H, end_id, end_bias, case, "cpu").to(dtype)
            for seed in range(3):
                kwargs = {"temperature": temperature, "end_id": end_id}
                got = ref.generate(model, start_ids, max_new, generator=torch.Generator().manual_seed(seed), **kwargs)
                assert got == _generate_by_rerunning(model, start_ids, max_new,
                                                     generator=torch.Generator().manual_seed(seed), **kwargs)
                assert all(isinstance(i, int) for i in got) and 1 <= len(got) <= max_new
                assert end_id not in got[:-1]


# --- the hidden cases exercise what their checks claim ---------------------------------------------

def test_clip_cases_always_clip_and_edge_cases_hide_the_norm():
    for seed, (shapes, dtype, scale, max_norm) in enumerate(hidden.CLIP_CASES):
        grads = [p.grad for p in hidden._params_with_grads(shapes, dtype, scale, seed, "cpu")]
        norm = torch.stack([g.norm() for g in grads]).norm()
        assert norm > 2 * max_norm, (shapes, float(norm))
        assert max(float(g.norm()) for g in grads) > max_norm  # per-tensor clipping would change something
    kinds = set()
    for label, shapes, nonzero, value, max_norm, none, as_generator in hidden.EDGE_CASES:
        params = hidden._unit_grads(shapes, "cpu", nonzero, value, none)
        flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        assert int((flat != 0).sum()) <= 1 and flat.abs().max() in (0.0, 1.0), label  # L1 = L2 = L2^2
        clips = flat.abs().max() > max_norm
        kinds.add(("clips" if clips else "below", bool(none), as_generator))
    assert {("clips", True, False), ("below", False, False), ("below", True, False), ("clips", False, True),
            ("below", False, True), ("clips", True, True)} <= kinds


def test_generate_cases_end_both_ways_and_argmax_differs():
    ends = max_hits = differ = 0
    for case, (V, E, H, start_ids, max_new, temperature, end_id, end_bias) in enumerate(hidden.GENERATE_CASES):
        model = hidden._generate_model(V, E, H, end_id, end_bias, case, "cpu")
        drawn = [ref.generate(model, start_ids, max_new, temperature, torch.Generator().manual_seed(s), end_id)
                 for s in range(3)]
        ends += sum(d[-1] == end_id for d in drawn)
        max_hits += sum(len(d) == max_new and d[-1] != end_id for d in drawn)
        differ += any(d != generate_argmax(model, start_ids, max_new, temperature, None, end_id) for d in drawn)
    assert ends >= 10 and max_hits >= 5 and differ >= 6


def test_stability_cases_break_the_naive_losses():
    for naive in (nll_log_of_softmax, nll_without_max_shift):
        wrong = 0
        for _label, row, target in hidden._stability_cases():
            logits, targets = row.reshape(1, 1, -1), torch.tensor([[target]])
            value = naive(logits, targets)
            wrong += not (torch.isfinite(value) and abs(float(value - ref.sequence_nll(logits, targets))) < 1e-3)
        assert wrong >= 3, naive.__name__


# --- the training outcome: the bar has a margin --------------------------------------------------------

def _training_loss(cls, seed):
    inputs, targets, V = hidden.training_batch()
    torch.manual_seed(seed)
    model = cls(V, *hidden.TRAINING_SIZES)
    return hidden.train_fixed_batch(model, inputs, targets)


class RNNLMNormalInit(ref.RNNLM):
    """Another sensible initialization: N(0, 0.1) weights, zero biases."""

    def __init__(self, vocab_size, embedding_dim, hidden_size):
        super().__init__(vocab_size, embedding_dim, hidden_size)
        with torch.no_grad():
            for p in (self.weight_ih, self.weight_hh):
                p.normal_(0.0, 0.1)
            self.bias_ih.zero_()
            self.bias_hh.zero_()


class RNNLMXavierInit(ref.RNNLM):
    """Xavier input weights, orthogonal recurrent weights, zero biases, small embeddings."""

    def __init__(self, vocab_size, embedding_dim, hidden_size):
        super().__init__(vocab_size, embedding_dim, hidden_size)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.weight_ih)
            nn.init.orthogonal_(self.weight_hh)
            self.bias_ih.zero_()
            self.bias_hh.zero_()
            self.embedding.weight.normal_(0.0, 0.1)


def test_training_bar_has_a_margin():
    """The reference (and other sensible initializations) end far below the bar for any seed; a model
    that does not carry its state ends far above it."""
    bar = hidden.LOSS_BAR
    for seed in range(3):
        for cls in (ref.RNNLM, RNNLMNormalInit, RNNLMXavierInit):
            assert _training_loss(cls, seed) < bar / 2, (cls.__name__, seed)
        assert _training_loss(RNNLMStateNotCarried, seed) > bar + 0.5, seed
    for seed in (1, 2):  # the check itself, with other seeds
        hidden.check_rnnlm_training(reference_ns(), seed=seed)
        with pytest.raises(GradingFailure, match="above the bar"):
            hidden.check_rnnlm_training(make_ns({"RNNLM": RNNLMStateNotCarried}), seed=seed)


def test_the_notebook_states_the_hidden_limits():
    """The notebook tells students the training test's budget and bar: keep them in sync."""
    text = " ".join("\n".join(c.source for c in U.nb.cells if c.cell_type == "markdown").split())
    E, H = hidden.TRAINING_SIZES
    for phrase in (f"`RNNLM(27, {E}, {H})`", "`torch.manual_seed(0)`", f"first **{hidden.TRAINING_NAMES} names**",
                   f"**{hidden.TRAINING_STEPS} Adam steps**", f"learning rate {hidden.TRAINING_LR:g}",
                   "clipped at norm 1", f"at most **{hidden.LOSS_BAR:g}**"):
        assert phrase in text, phrase


def test_failure_messages_name_the_input():
    with pytest.raises(GradingFailure) as info:
        run_check(C + "clip_grad_norm", make_ns({"clip_grad_norm": clip_per_tensor}))
    message = str(info.value)
    assert "clip_grad_norm(a list of 3 parameters of shapes [(3, 4), (4,), (2, 2, 2)], max_norm=1.0)" in message
    assert "max abs error" in message and "one global factor" in message
    with pytest.raises(GradingFailure) as info:
        run_check(C + "encode_names", make_ns({"encode_names": encode_targets_equal_inputs}))
    assert "encode_names(['emma'], stoi)" in str(info.value) and "expected [5, 13, 13, 1, 0]" in str(info.value)
    with pytest.raises(GradingFailure, match="Forbidden call.*cross_entropy"):
        run_check(C + "sequence_nll", make_ns({"sequence_nll": nll_uses_cross_entropy}))
    with pytest.raises(GradingFailure, match="device=idx.device"):
        run_check(C + "rnnlm_forward", make_ns({"RNNLM": RNNLMStateOnCPU}))


# --- lazy stubs: constants a student might hope to get points with ----------------------------------

class LazyRNNLM(nn.Module):
    def __init__(self, vocab_size, embedding_dim, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.weight_ih = nn.Parameter(torch.zeros(hidden_size, embedding_dim))
        self.weight_hh = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.zeros(hidden_size))
        self.bias_hh = nn.Parameter(torch.zeros(hidden_size))
        self.output = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx, h0=None):
        B, T = idx.shape
        h = torch.zeros(B, self.weight_hh.shape[0], device=idx.device) if h0 is None else h0
        return self.output.bias.expand(B, T, -1) * 0, h


def lazy_ns() -> dict:
    return {
        "rnn_cell": lambda x_t, h_prev, W_xh, W_hh, b_h: torch.zeros_like(h_prev),
        "RNNLM": LazyRNNLM,
        "encode_names": lambda words, stoi: (torch.zeros(len(words), 2, dtype=torch.long),
                                             torch.zeros(len(words), 2, dtype=torch.long)),
        "sequence_nll": lambda logits, targets, ignore_index=-100: torch.tensor(math.log(27.0)),
        "clip_grad_norm": lambda parameters, max_norm: torch.tensor(float(max_norm)),
        "generate": lambda model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0: [end_id],
    }


# --- mutants: the mistakes students make; each must cost points exactly once --------------------------

def cell_weights_swapped(x_t, h_prev, W_xh, W_hh, b_h):
    return torch.tanh(x_t @ W_hh.T + h_prev @ W_xh.T + b_h)


def cell_weights_not_transposed(x_t, h_prev, W_xh, W_hh, b_h):
    return torch.tanh(x_t @ W_xh + h_prev @ W_hh + b_h)


def cell_without_bias(x_t, h_prev, W_xh, W_hh, b_h):
    return torch.tanh(x_t @ W_xh.T + h_prev @ W_hh.T)


def cell_relu(x_t, h_prev, W_xh, W_hh, b_h):
    return torch.relu(x_t @ W_xh.T + h_prev @ W_hh.T + b_h)


def cell_uses_rnn_tanh_cell(x_t, h_prev, W_xh, W_hh, b_h):
    return torch.rnn_tanh_cell(x_t, h_prev, W_xh, W_hh, b_h)


def cell_detached(x_t, h_prev, W_xh, W_hh, b_h):
    with torch.no_grad():
        return torch.tanh(x_t @ W_xh.T + h_prev @ W_hh.T + b_h)


class _Unrolled(ref.RNNLM):
    """The reference's forward pass with one mistake switched on by a subclass."""

    bias = "both"             # "ih": bias_ih only; "none": no bias
    carry = True              # False: every step starts from h0 again (a bigram model)
    use_h0 = True             # False: h0 is ignored
    last = True               # False: returns the state after the first step
    state_on_input_device = True

    def forward(self, idx, h0=None):
        B, T = idx.shape
        x = self.embedding(idx)
        H = self.weight_hh.shape[0]
        if h0 is None or not self.use_h0:
            h0 = (torch.zeros(B, H, device=idx.device) if self.state_on_input_device else torch.zeros(B, H))
        bias = {"both": self.bias_ih + self.bias_hh, "ih": self.bias_ih, "none": torch.zeros_like(self.bias_ih)}[self.bias]
        h, states = h0, []
        for t in range(T):
            h = ref.rnn_cell(x[:, t], h if self.carry else h0, self.weight_ih, self.weight_hh, bias)
            states.append(h)
        return self.output(torch.stack(states, dim=1)), (h if self.last else states[0])


class RNNLMBiasIhOnly(_Unrolled):
    bias = "ih"


class RNNLMWithoutBias(_Unrolled):
    bias = "none"


class RNNLMStateNotCarried(_Unrolled):
    carry = False


class RNNLMIgnoresH0(_Unrolled):
    use_h0 = False


class RNNLMReturnsFirstState(_Unrolled):
    last = False


class RNNLMStateOnCPU(_Unrolled):
    state_on_input_device = False


class RNNLMWithNNRNN(nn.Module):
    """Uses PyTorch's nn.RNN inside (and so has its parameter names)."""

    def __init__(self, vocab_size, embedding_dim, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = nn.RNN(embedding_dim, hidden_size, batch_first=True)
        self.output = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx, h0=None):
        out, h_n = self.rnn(self.embedding(idx), None if h0 is None else h0[None])
        return self.output(out), h_n[0]


def encode_targets_equal_inputs(words, stoi):
    inputs, _ = ref.encode_names(words, stoi)
    return inputs, inputs.clone()


def encode_shifted_the_wrong_way(words, stoi):
    inputs, targets = ref.encode_names(words, stoi)
    wrong_inputs = torch.where(targets == -100, torch.zeros_like(targets), targets)
    wrong_targets = torch.where(targets == -100, targets, inputs)
    return wrong_inputs, wrong_targets


def encode_targets_padded_with_0(words, stoi):
    inputs, targets = ref.encode_names(words, stoi)
    return inputs, targets.masked_fill(targets == -100, 0)


def encode_ids_from_ord(words, stoi):
    return ref.encode_names(words, {".": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}})


def encode_without_start_token(words, stoi):
    longest = max(len(w) for w in words)
    inputs = torch.zeros(len(words), longest, dtype=torch.long)
    targets = torch.full((len(words), longest), -100, dtype=torch.long)
    for row, word in enumerate(words):
        ids = [stoi[c] for c in word]
        inputs[row, :len(ids)] = torch.tensor(ids)
        targets[row, :len(ids)] = torch.tensor(ids[1:] + [0])
    return inputs, targets


def _per_position(logits, targets, ignore_index):
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, safe[:, None])[:, 0]
    return nll, keep


def nll_mean_over_padding(logits, targets, ignore_index=-100):
    nll, keep = _per_position(logits, targets, ignore_index)
    return (nll * keep).sum() / targets.numel()


def nll_sum(logits, targets, ignore_index=-100):
    nll, keep = _per_position(logits, targets, ignore_index)
    return (nll * keep).sum()


def nll_mean_of_rows(logits, targets, ignore_index=-100):
    """The mean per name (of the mean per character in each name), not per character."""
    if logits.dim() == 2:
        return nll_mean_of_rows(logits[None], targets[None], ignore_index)
    nll, keep = _per_position(logits, targets, ignore_index)
    nll, keep = nll.view(targets.shape), keep.view(targets.shape).float()
    rows = keep.sum(1) > 0
    return ((nll * keep).sum(1)[rows] / keep.sum(1)[rows]).mean()


def nll_hardcoded_ignore_index(logits, targets, ignore_index=-100):
    return ref.sequence_nll(logits, targets, -100)


def nll_log_of_softmax(logits, targets, ignore_index=-100):
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    probs = torch.softmax(logits[keep], dim=-1)
    return -torch.log(probs.gather(1, targets[keep][:, None])).mean()


def nll_without_max_shift(logits, targets, ignore_index=-100):
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    z, y = logits[keep], targets[keep]
    return (z.exp().sum(-1).log() - z.gather(1, y[:, None])[:, 0]).mean()


def nll_uses_cross_entropy(logits, targets, ignore_index=-100):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def nll_uses_log_softmax(logits, targets, ignore_index=-100):
    logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    return -logp[keep].gather(1, targets[keep][:, None]).mean()


def _grads(parameters):
    return [p.grad for p in parameters if p.grad is not None]


def clip_always_scales(parameters, max_norm):
    grads = _grads(parameters)
    norm = torch.stack([g.norm() for g in grads]).norm()
    for g in grads:
        g.mul_(max_norm / (norm + 1e-6))
    return norm


def clip_per_tensor(parameters, max_norm):
    grads = _grads(parameters)
    total = torch.stack([g.norm() for g in grads]).norm()
    for g in grads:
        g.mul_(torch.clamp(max_norm / (g.norm() + 1e-6), max=1.0))
    return total


def clip_without_sqrt(parameters, max_norm):
    grads = _grads(parameters)
    norm = sum(g.pow(2).sum() for g in grads)
    for g in grads:
        g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def clip_l1_norm(parameters, max_norm):
    grads = _grads(parameters)
    norm = sum(g.abs().sum() for g in grads)
    for g in grads:
        g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def clip_crashes_on_none(parameters, max_norm):
    params = list(parameters)
    norm = torch.stack([p.grad.norm() for p in params]).norm()
    for p in params:
        p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def clip_reads_parameters_twice(parameters, max_norm):
    norm = torch.stack([p.grad.norm() for p in parameters if p.grad is not None]).norm()
    for p in parameters:  # a generator is empty by now
        if p.grad is not None:
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def clip_returns_norm_after_clipping(parameters, max_norm):
    grads = _grads(parameters)
    norm = torch.stack([g.norm() for g in grads]).norm()
    for g in grads:
        g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return torch.stack([g.norm() for g in grads]).norm()


def clip_returns_float(parameters, max_norm):
    return float(ref.clip_grad_norm(parameters, max_norm))


def clip_without_epsilon(parameters, max_norm):
    grads = _grads(parameters)
    norm = torch.stack([g.norm() for g in grads]).norm()
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm


def clip_uses_pytorch(parameters, max_norm):
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def _device(model):
    return next(model.parameters()).device


def _draw(logits, temperature, generator):
    return torch.multinomial(torch.softmax(logits[0, -1] / temperature, dim=-1), 1, generator=generator).item()


@torch.no_grad()
def _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, *, pick=_draw, carry=True,
             stop=True, keep_end=True, with_prompt=False, on_cpu=False):
    device = torch.device("cpu") if on_cpu else _device(model)
    logits, h = model(torch.tensor([start_ids], device=device))
    new = []
    for _ in range(max_new_tokens):
        next_id = pick(logits, temperature, generator)
        if stop and next_id == end_id:
            if keep_end:
                new.append(next_id)
            break
        new.append(next_id)
        logits, h = model(torch.tensor([[next_id]], device=device), h if carry else None)
    return (list(start_ids) + new) if with_prompt else new


def generate_argmax(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id,
                    pick=lambda logits, t, g: int(logits[0, -1].argmax()))


def generate_temperature_multiplies(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id,
                    pick=lambda logits, t, g: _draw(logits * t * t, t, g))


def generate_temperature_after_softmax(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    def pick(logits, t, g):
        return torch.multinomial(torch.softmax(logits[0, -1], dim=-1) / t, 1, generator=g).item()
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, pick=pick)


def generate_softmax_over_batch(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    def pick(logits, t, g):
        return torch.multinomial(torch.softmax(logits[:, -1] / t, dim=0)[0], 1, generator=g).item()
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, pick=pick)


def generate_multinomial_on_logits(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id,
                    pick=lambda logits, t, g: torch.multinomial(logits[0, -1] / t, 1, generator=g).item())


def generate_unnormalised_weights(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    """exp(logits / T) without the softmax's max-shift and sum: the same draws while exp() does not
    overflow, inf (and an error) at low temperatures."""
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id,
                    pick=lambda logits, t, g: torch.multinomial(torch.exp(logits[0, -1] / t), 1, generator=g).item())


def generate_without_generator(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, None, end_id)


def generate_does_not_stop(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, stop=False)


def generate_drops_the_end_token(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, keep_end=False)


def generate_state_not_carried(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    """Feeds only the new token, without the state: the model forgets the prefix."""
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, carry=False)


def generate_returns_the_prompt_too(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, with_prompt=True)


def generate_tensors_on_cpu(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _sampler(model, start_ids, max_new_tokens, temperature, generator, end_id, on_cpu=True)


def generate_by_rerunning_the_prefix(model, start_ids, max_new_tokens, temperature=1.0, generator=None, end_id=0):
    return _generate_by_rerunning(model, start_ids, max_new_tokens, temperature, generator, end_id)


def _checks(*names: str) -> set[str]:
    return {C + name for name in names}


MUTANTS = {
    # rnn_cell: graded in part 1 only (the other checks swap in the reference's; the visible tests
    # of RNNLM use E = H and the student's own rnn_cell, so a wrong cell cannot fail them).
    "cell_weights_swapped": ({"rnn_cell": cell_weights_swapped}, _checks("rnn_cell")),
    "cell_weights_not_transposed": ({"rnn_cell": cell_weights_not_transposed}, _checks("rnn_cell")),
    "cell_without_bias": ({"rnn_cell": cell_without_bias}, _checks("rnn_cell")),
    "cell_relu": ({"rnn_cell": cell_relu}, _checks("rnn_cell")),
    "cell_uses_torch_rnn_tanh_cell": ({"rnn_cell": cell_uses_rnn_tanh_cell}, _checks("rnn_cell")),
    "cell_without_gradient": ({"rnn_cell": cell_detached}, _checks("rnn_cell")),
    # RNNLM
    "rnnlm_bias_ih_only": ({"RNNLM": RNNLMBiasIhOnly}, _checks("rnnlm_forward")),
    "rnnlm_without_bias": ({"RNNLM": RNNLMWithoutBias}, _checks("rnnlm_forward")),
    "rnnlm_state_not_carried": ({"RNNLM": RNNLMStateNotCarried}, _checks("rnnlm_forward", "rnnlm_training")),
    "rnnlm_ignores_h0": ({"RNNLM": RNNLMIgnoresH0}, _checks("rnnlm_hidden_state")),
    "rnnlm_returns_first_state": ({"RNNLM": RNNLMReturnsFirstState}, _checks("rnnlm_hidden_state")),
    "rnnlm_state_created_on_cpu": ({"RNNLM": RNNLMStateOnCPU}, _checks("rnnlm_forward")),
    "rnnlm_uses_nn_rnn": ({"RNNLM": RNNLMWithNNRNN}, _checks("rnnlm_forward", "rnnlm_hidden_state")),
    # encode_names
    "encode_targets_equal_inputs": ({"encode_names": encode_targets_equal_inputs}, _checks("encode_names")),
    "encode_shifted_the_wrong_way": ({"encode_names": encode_shifted_the_wrong_way}, _checks("encode_names")),
    "encode_targets_padded_with_0": ({"encode_names": encode_targets_padded_with_0}, _checks("encode_names")),
    "encode_ids_from_ord": ({"encode_names": encode_ids_from_ord}, _checks("encode_names")),
    "encode_without_start_token": ({"encode_names": encode_without_start_token}, _checks("encode_names")),
    # sequence_nll
    "nll_mean_over_padding": ({"sequence_nll": nll_mean_over_padding}, _checks("sequence_nll")),
    "nll_sum": ({"sequence_nll": nll_sum}, _checks("sequence_nll")),
    "nll_mean_of_rows": ({"sequence_nll": nll_mean_of_rows}, _checks("sequence_nll")),
    "nll_hardcoded_ignore_index": ({"sequence_nll": nll_hardcoded_ignore_index}, _checks("sequence_nll")),
    "nll_log_of_softmax": ({"sequence_nll": nll_log_of_softmax}, _checks("sequence_nll_stability")),
    "nll_without_max_shift": ({"sequence_nll": nll_without_max_shift}, _checks("sequence_nll_stability")),
    "nll_uses_cross_entropy": ({"sequence_nll": nll_uses_cross_entropy},
                               _checks("sequence_nll", "sequence_nll_stability")),
    "nll_uses_log_softmax": ({"sequence_nll": nll_uses_log_softmax}, _checks("sequence_nll", "sequence_nll_stability")),
    # clip_grad_norm
    "clip_always_scales": ({"clip_grad_norm": clip_always_scales}, _checks("clip_grad_norm_edge_cases")),
    "clip_per_tensor": ({"clip_grad_norm": clip_per_tensor}, _checks("clip_grad_norm")),
    "clip_without_sqrt": ({"clip_grad_norm": clip_without_sqrt}, _checks("clip_grad_norm")),
    "clip_l1_norm": ({"clip_grad_norm": clip_l1_norm}, _checks("clip_grad_norm")),
    "clip_crashes_on_none": ({"clip_grad_norm": clip_crashes_on_none}, _checks("clip_grad_norm_edge_cases")),
    "clip_reads_parameters_twice": ({"clip_grad_norm": clip_reads_parameters_twice},
                                    _checks("clip_grad_norm_edge_cases")),
    "clip_returns_norm_after_clipping": ({"clip_grad_norm": clip_returns_norm_after_clipping}, _checks("clip_grad_norm")),
    "clip_returns_float": ({"clip_grad_norm": clip_returns_float}, _checks("clip_grad_norm")),
    "clip_uses_pytorch": ({"clip_grad_norm": clip_uses_pytorch}, _checks("clip_grad_norm", "clip_grad_norm_edge_cases")),
    "clip_without_epsilon": ({"clip_grad_norm": clip_without_epsilon}, set()),  # accepted: 1e-6 is within tolerance
    # generate
    "generate_argmax": ({"generate": generate_argmax}, _checks("generate")),
    "generate_temperature_multiplies": ({"generate": generate_temperature_multiplies}, _checks("generate")),
    "generate_temperature_after_softmax": ({"generate": generate_temperature_after_softmax}, _checks("generate")),
    "generate_softmax_over_the_batch_axis": ({"generate": generate_softmax_over_batch}, _checks("generate")),
    "generate_multinomial_on_logits": ({"generate": generate_multinomial_on_logits}, _checks("generate")),
    "generate_without_generator": ({"generate": generate_without_generator}, _checks("generate")),
    "generate_does_not_stop": ({"generate": generate_does_not_stop}, _checks("generate")),
    "generate_drops_the_end_token": ({"generate": generate_drops_the_end_token}, _checks("generate")),
    "generate_state_not_carried": ({"generate": generate_state_not_carried}, _checks("generate")),
    "generate_returns_the_prompt_too": ({"generate": generate_returns_the_prompt_too}, _checks("generate")),
    # A device bug that only a GPU shows (multinomial needs real numbers, so no meta-device check).
    "generate_tensors_on_cpu": ({"generate": generate_tensors_on_cpu}, _checks("generate") if CUDA else set()),
    "generate_unnormalised_weights": ({"generate": generate_unnormalised_weights}, _checks("generate")),
    # Accepted: the same draws, only slower.
    "generate_by_rerunning_the_prefix": ({"generate": generate_by_rerunning_the_prefix}, set()),
}


globals().update(common_tests(U, lazy_ns=lazy_ns, mutants=MUTANTS, hidden_seconds=15.0))
