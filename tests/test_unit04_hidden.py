"""Unit 04 (LSTMs, seq2seq and Bahdanau attention): the reference against PyTorch's own modules,
the hidden cases doing what their checks claim, the training bar's margin, lazy stubs, and the
mistakes students really make, each of which must cost points exactly once. The tests every unit
gets (release stubs, notebook structure, visible tests, whole cells) come from ``unit_harness``.

Plain pytest, no Jupyter kernel: a notebook namespace is a dict of names, as the hidden tests
receive ``globals()`` from the grading kernel.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn
from notebook_testing import nbg
from unit_harness import C, UnitUnderTest, common_tests

from autograder.hidden import unit04_lstm_seq2seq as hidden
from autograder.references import unit04_lstm_seq2seq as ref
from llmcourse.grading import GradingFailure

UNIT = "04_lstm_seq2seq"
GRADED_NAMES = ["lstm_cell", "LSTM", "masked_softmax", "additive_attention", "Seq2Seq"]
PARTS = {"lstm_cell", "LSTM", "masked_softmax", "additive_attention"}  # what Seq2Seq is built from
# Which notebook names each part's cells use (visible and hidden tests): a mistake in a name can
# only fail the cells of the parts that use it. LSTM calls lstm_cell, additive_attention calls
# masked_softmax and Seq2Seq calls all four: the hidden checks swap in the reference's, and the
# visible tests check properties that hold whatever the parts do.
PART_NAMES = {
    "cell": {"lstm_cell"},
    "lstm": {"LSTM", "lstm_cell"},
    "softmax": {"masked_softmax"},
    "attention": {"additive_attention", "masked_softmax"},
    "seq2seq": {"Seq2Seq"} | PARTS,
}
CUDA = torch.cuda.is_available()
PAD, BOS, EOS = ref.PAD_ID, ref.BOS_ID, ref.EOS_ID


def part_of(check: str) -> str:
    name = check.removeprefix(C)
    return {"lstm_cell": "cell", "lstm_forward": "lstm", "lstm_state": "lstm", "masked_softmax": "softmax",
            "additive_attention": "attention"}.get(name, "seq2seq")


U = UnitUnderTest(UNIT, hidden, graded_names=GRADED_NAMES, part_names=PART_NAMES, part_of=part_of,
                  helper_cell_ids=("notebook-imports", "date-data"))
run_check, reference_ns, make_ns = U.run_check, U.reference_ns, U.make_ns


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the reference against PyTorch --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_lstm_cell_matches_pytorch(dtype):
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for seed, (B, D, H) in enumerate([(1, 1, 1), (3, 4, 5), (7, 5, 5), (2, 16, 3), (32, 8, 64)]):
        torch.manual_seed(seed)
        cell = nn.LSTMCell(D, H).to(dtype)
        x, h, c = (torch.randn(B, n, dtype=dtype) for n in (D, H, H))
        with torch.no_grad():
            got = ref.lstm_cell(x, (h, c), cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            torch.testing.assert_close(got, cell(x, (h, c)), **tol)
            torch.testing.assert_close(got, torch.lstm_cell(x, (h, c), cell.weight_ih, cell.weight_hh,
                                                            cell.bias_ih, cell.bias_hh), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_lstm_matches_nn_lstm_and_lstm_cell(dtype):
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for seed, (B, T, D, H, L) in enumerate([(1, 1, 1, 1, 1), (2, 5, 3, 4, 1), (3, 7, 4, 6, 2), (2, 4, 5, 5, 3)]):
        torch.manual_seed(seed)
        torch_lstm = nn.LSTM(D, H, num_layers=L, batch_first=True).to(dtype)
        mine = ref.LSTM(D, H, L).to(dtype)
        mine.load_state_dict(torch_lstm.state_dict())  # the names are nn.LSTM's
        x = torch.randn(B, T, D, dtype=dtype)
        state = (torch.randn(L, B, H, dtype=dtype), torch.randn(L, B, H, dtype=dtype))
        with torch.no_grad():
            for args in ((x,), (x, state)):
                out, (h_n, c_n) = mine(*args)
                expected, (eh, ec) = torch_lstm(*args)
                for a, b in ((out, expected), (h_n, eh), (c_n, ec)):
                    torch.testing.assert_close(a, b, **tol)
            if L == 1:  # and nn.LSTMCell, step by step
                cell = nn.LSTMCell(D, H).to(dtype)
                cell.load_state_dict({k.removesuffix("_l0"): v for k, v in torch_lstm.state_dict().items()})
                h, c = state[0][0], state[1][0]
                for t in range(T):
                    h, c = cell(x[:, t], (h, c))
                    torch.testing.assert_close(mine(x, state)[0][:, t], h, **tol)


def test_reference_lstm_default_initialization_is_pytorchs():
    torch.manual_seed(0)
    mine = ref.LSTM(3, 16, num_layers=2)
    bound = 1 / math.sqrt(16)
    for name, p in mine.named_parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound, name


def test_reference_masked_softmax_and_attention_match_a_loop():
    g = torch.Generator().manual_seed(0)
    B, S, Dq, Dk, Dv, A = 3, 5, 4, 3, 2, 6
    query, keys, values = torch.randn(B, Dq, generator=g), torch.randn(B, S, Dk, generator=g), torch.randn(B, S, Dv, generator=g)
    W_q, W_k, v = torch.randn(A, Dq, generator=g), torch.randn(A, Dk, generator=g), torch.randn(A, generator=g)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5, [True] * 5])
    context, weights = ref.additive_attention(query, keys, values, mask, W_q, W_k, v)
    for b in range(B):
        scores = [float(v @ torch.tanh(W_q @ query[b] + W_k @ keys[b, s])) for s in range(S)]
        kept = [s for s in range(S) if mask[b, s]]
        z = sum(math.exp(scores[s]) for s in kept)
        expected = [math.exp(scores[s]) / z if s in kept else 0.0 for s in range(S)]
        assert weights[b].tolist() == pytest.approx(expected, abs=1e-6)
        assert context[b].tolist() == pytest.approx((torch.tensor(expected) @ values[b]).tolist(), abs=1e-5)
    assert (weights[1] == 0).all() and (context[1] == 0).all()  # a fully masked row: zeros, no nan
    scores = torch.randn(4, 6, generator=g, requires_grad=True)
    full_mask = torch.zeros(4, 6, dtype=torch.bool)
    full_mask[1:, :3] = True
    ref.masked_softmax(scores, full_mask).sum().backward()
    assert torch.isfinite(scores.grad).all()  # no nan flows back from a fully masked row


def test_reference_seq2seq_teacher_forcing_equals_greedy_when_right():
    """Greedy decoding is teacher forcing on its own output (the greedy check's second path)."""
    for seed in range(len(hidden.GREEDY_CASES)):
        args, model, src, max_len = hidden.greedy_case(seed)
        ids = model.greedy_decode(src, max_len)
        tgt = torch.cat([torch.full((len(src), 1), BOS), ids], dim=1)
        with torch.no_grad():
            predictions = model(src, tgt).argmax(-1)
        for b, row in enumerate(ids.tolist()):
            end = row.index(EOS) + 1 if EOS in row else len(row)
            assert predictions[b, :end].tolist() == row[:end]
        assert hidden._agrees_with_own_forward(model, src, ids) is None
        assert hidden._greedy_rule_problems(ids, len(src), max_len, src.device) == []


# --- the hidden cases do what their checks claim ------------------------------------------------------

def test_greedy_cases_stop_at_different_steps():
    """Rows that stop early and late, and rows that never stop, in the reference's greedy output; the
    first step is not EOS for every row (a lazy all-EOS answer is wrong)."""
    stops, never, first_all_eos, varied = set(), 0, 0, 0
    for seed in range(len(hidden.GREEDY_CASES)):
        _, model, src, max_len = hidden.greedy_case(seed)
        ids = model.greedy_decode(src, max_len)
        first_all_eos += bool((ids[:, 0] == EOS).all())
        for row in ids.tolist():
            if EOS in row:
                stops.add(row.index(EOS))
            else:
                never += 1
        varied += len(set(ids[:, 0].tolist())) > 1
    assert first_all_eos == 0 and varied >= 3
    assert len(stops) >= 5 and never >= 3, (stops, never)
    # a case stops before max_len, and one runs to max_len with rows unfinished
    lengths = [(hidden.greedy_case(s)[1].greedy_decode(hidden.greedy_case(s)[2], hidden.greedy_case(s)[3]).shape[1],
                hidden.greedy_case(s)[3]) for s in range(len(hidden.GREEDY_CASES))]
    assert any(L < m for L, m in lengths) and any(L == m > 1 for L, m in lengths), lengths


def test_split_cases_can_run_a_layer_fed_x():
    assert all(D == H for _, _, D, H, L, _ in hidden.STATE_SPLIT_CASES if L > 1)
    assert any(D != H and L > 1 for _, _, D, H, L, _ in hidden.FORWARD_CASES)


def test_training_outcome_has_a_margin():
    """The reference clears the bar by a wide margin for several seeds; zero weights don't."""
    Vs, Vt, train, test = hidden.training_data()
    E, H, A = hidden.TRAIN_SIZES
    scores = []
    start = time.perf_counter()
    for seed in range(3):
        torch.manual_seed(seed)
        scores.append(hidden.train_and_score(ref.Seq2Seq(Vs, Vt, E, H, A), train, test, seed=seed)[1])
    seconds = (time.perf_counter() - start) / 3
    print(f"\nreference exact match {scores} (bar {hidden.ACCURACY_BAR}), {seconds:.1f} s per run")
    assert min(scores) >= hidden.ACCURACY_BAR + 0.1
    torch.manual_seed(0)
    assert hidden.train_and_score(ZeroInit(Vs, Vt, E, H, A), train, test)[1] < hidden.ACCURACY_BAR - 0.2


def test_the_notebook_states_the_hidden_limits():
    nb = U.nb
    text = " ".join(" ".join(c.source for c in nb.cells if c.cell_type == "markdown").split())
    assert f"**{hidden.TRAIN_STEPS} steps** on {hidden.TRAIN_PAIRS:,} dotted dates" in text
    assert f"**exact match of at least {hidden.ACCURACY_BAR:.0%}** on {hidden.TEST_PAIRS} held-out dates" in text
    assert f"learning rate of {hidden.TRAIN_LR:g} and batches of {hidden.TRAIN_BATCH}" in text
    E, H, A = hidden.TRAIN_SIZES
    assert hidden.TRAIN_FORMATS == ("dotted",)
    training_cell = next(c for c in nb.cells if nbg(c)["grade_id"] == "test_seq2seq_training")
    assert f"Seq2Seq(len(SRC_ITOS), len(TGT_ITOS), {E}, {H}, {A})" in training_cell.source


# --- the release stubs and lazy stubs -------------------------------------------------------------

def test_release_stubs_parse_and_raise():
    ns = U.release_ns()
    assert (ns["PAD_ID"], ns["BOS_ID"], ns["EOS_ID"]) == (0, 1, 2)
    x = torch.zeros(1, 2)
    calls = [lambda: ns["lstm_cell"](x, (x, x), torch.zeros(8, 2), torch.zeros(8, 2), torch.zeros(8), torch.zeros(8)),
             lambda: ns["LSTM"](2, 2), lambda: ns["masked_softmax"](x, None),
             lambda: ns["additive_attention"](x, x[None], x[None], None, x, x, x[0]),
             lambda: ns["Seq2Seq"](5, 5, 2, 2, 2)]
    for call in calls:
        with pytest.raises(NotImplementedError):
            call()


class LazyLSTM(ref.LSTM):
    def forward(self, x, state=None):
        zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        return x.new_zeros(x.shape[0], x.shape[1], self.hidden_size), (zeros, zeros)


class LazySeq2Seq(ref.Seq2Seq):
    def forward(self, src, tgt):
        return self.output.bias.expand(src.shape[0], tgt.shape[1] - 1, -1) * 0

    def greedy_decode(self, src, max_len, return_attention=False):
        ids = torch.full((src.shape[0], 1), EOS, dtype=torch.long, device=src.device)
        return (ids, None) if return_attention else ids


def lazy_ns() -> dict:
    def uniform(scores, mask):
        keep = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
        return keep / keep.sum(-1, keepdim=True).clamp_min(1)

    return {
        "lstm_cell": lambda x, state, W_ih, W_hh, b_ih, b_hh: state,
        "LSTM": LazyLSTM,
        "masked_softmax": uniform,
        "additive_attention": lambda q, k, m, mask, W_q, W_k, v: (m.mean(1), uniform(k[..., 0], mask)),
        "Seq2Seq": LazySeq2Seq,
    }


# --- mutants: the mistakes students make; each must cost points exactly once --------------------------

def make_cell(order="ifgo", candidate=torch.tanh, cell_out=torch.tanh, gate=torch.sigmoid, bias="both"):
    def lstm_cell(x, state, W_ih, W_hh, b_ih, b_hh):
        h_prev, c_prev = state
        b = b_ih + b_hh if bias == "both" else 2 * b_ih
        chunks = dict(zip(order, (x @ W_ih.T + h_prev @ W_hh.T + b).chunk(4, dim=-1), strict=True))
        c = gate(chunks["f"]) * c_prev + gate(chunks["i"]) * candidate(chunks["g"])
        return gate(chunks["o"]) * cell_out(c), c

    return lstm_cell


def cell_via_torch(x, state, W_ih, W_hh, b_ih, b_hh):
    return torch.lstm_cell(x, state, W_ih, W_hh, b_ih, b_hh)


def make_lstm(mode):
    """The reference LSTM with one mistake switched on."""

    class Mutant(ref.LSTM):
        def forward(self, x, state=None):
            B, T, _ = x.shape
            if state is None or mode == "state_ignored":
                if mode == "zeros_on_cpu":
                    zeros = torch.zeros(self.num_layers, B, self.hidden_size, dtype=x.dtype)
                else:
                    zeros = x.new_zeros(self.num_layers, B, self.hidden_size)
                state = (zeros, zeros)
            h0, c0 = state
            layer_input, h_n, c_n = x, [], []
            for layer in range(self.num_layers):
                w = [getattr(self, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                h, c = (h0[0], c0[0]) if mode == "every_layer_starts_from_state_0" else (h0[layer], c0[layer])
                source = x if mode == "layers_fed_x" else layer_input
                outputs = []
                for t in range(T):
                    if mode == "cell_state_not_carried":
                        h, _ = ref.lstm_cell(source[:, t], (h, c), *w)
                    else:
                        h, c = ref.lstm_cell(source[:, t], (h, c), *w)
                    outputs.append(h)
                    if t == 0 and mode == "final_state_of_step_0":
                        first = (h, c)
                layer_input = torch.stack(outputs, dim=1)
                if mode == "final_state_of_step_0":
                    h, c = first
                h_n.append(h)
                c_n.append(c)
            if mode == "h_n_top_layer_repeated":
                h_n = [layer_input[:, -1]] * self.num_layers
            if mode == "c_n_not_updated":
                c_n = list(c0)
            return layer_input, (torch.stack(h_n), torch.stack(c_n))

    Mutant.__name__ = f"LSTM_{mode}"
    return Mutant


class LSTMViaTorch(ref.LSTM):
    def forward(self, x, state=None):
        L, B, H = self.num_layers, x.shape[0], self.hidden_size
        state = state or (x.new_zeros(L, B, H), x.new_zeros(L, B, H))
        params = [getattr(self, f"{n}_l{layer}") for layer in range(L)
                  for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        out, h_n, c_n = torch.lstm(x, state, params, True, L, 0.0, False, False, True)
        return out, (h_n, c_n)


def softmax_not_masked(scores, mask):
    return torch.softmax(scores, dim=-1)


def softmax_mask_inverted(scores, mask):
    return ref.masked_softmax(scores, None if mask is None else ~mask)


def softmax_large_finite(scores, mask):
    return torch.softmax(scores if mask is None else scores.masked_fill(~mask, -1e9), dim=-1)


def softmax_wrong_axis(scores, mask):
    if mask is None:
        return torch.softmax(scores, dim=0)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=0).masked_fill(~mask, 0.0)


def softmax_nan_when_fully_masked(scores, mask):
    return torch.softmax(scores if mask is None else scores.masked_fill(~mask, float("-inf")), dim=-1)


def softmax_times_mask(scores, mask):
    return torch.softmax(scores, dim=-1) * (1 if mask is None else mask)


def softmax_unstable(scores, mask):
    e = scores.exp() * (1 if mask is None else mask)
    return e / e.sum(dim=-1, keepdim=True)


def make_attention(mode):
    def additive_attention(query, keys, values, mask, W_q, W_k, v):
        hidden_ = (query @ W_q.T).unsqueeze(1) + keys @ W_k.T
        scores = (hidden_ if mode == "no_tanh" else torch.tanh(hidden_)) @ v
        if mode == "softmax_over_batch":
            weights = ref.masked_softmax(scores.T, None if mask is None else mask.T).T
        else:
            weights = ref.masked_softmax(scores, None if mode == "ignores_mask" else mask)
        source = keys if mode == "context_from_keys" else values
        return (weights.unsqueeze(-1) * source).sum(dim=1), weights

    return additive_attention


class TeacherForcingPeeks(ref.Seq2Seq):
    """The decoder reads tgt[:, 1:]: logits[:, t] sees tgt[:, t + 1], the character it predicts."""

    def forward(self, src, tgt):
        encoder_outputs, src_mask, state = self.encode(src)
        summary, logits = state[0], []
        for t in range(tgt.shape[1] - 1):
            step, state, _ = self.decode_step(tgt[:, t + 1], state, encoder_outputs, src_mask, summary)
            logits.append(step)
        return torch.stack(logits, dim=1)


class LogitsMisaligned(ref.Seq2Seq):
    """Reads all of tgt and drops the first logits: logits[:, t] comes after reading tgt[:, t + 1]."""

    def forward(self, src, tgt):
        padded = torch.cat([tgt, tgt[:, -1:]], dim=1)
        return super().forward(src, padded)[:, 1:]


class OutputReadsContextThenH(ref.Seq2Seq):
    """The output layer reads [context; h]: a mistake in decode_step, which greedy_decode shares."""

    def decode_step(self, y_prev, state, encoder_outputs, src_mask, summary):
        logits, (h, c), weights = super().decode_step(y_prev, state, encoder_outputs, src_mask, summary)
        context = summary if weights is None else (weights.unsqueeze(-1) * encoder_outputs).sum(dim=1)
        return self.output(torch.cat([context, h], dim=-1)), (h, c), weights


class EncoderStateAfterPadding(ref.Seq2Seq):
    """One call of the encoder: its final state comes after the PADs of the shorter sources."""

    def encode(self, src):
        outputs, (h_n, c_n) = self.encoder(self.src_embedding(src))
        return outputs, src != PAD, (h_n[-1], c_n[-1])


class AttentionWithoutMask(ref.Seq2Seq):
    def encode(self, src):
        out, mask, state = super().encode(src)
        return out, None, state


class LogitsPreallocatedOnCPU(ref.Seq2Seq):
    def forward(self, src, tgt):
        encoder_outputs, src_mask, state = self.encode(src)
        summary = state[0]
        logits = torch.zeros(src.shape[0], tgt.shape[1] - 1, self.output.out_features, dtype=encoder_outputs.dtype)
        for t in range(tgt.shape[1] - 1):
            logits[:, t], state, _ = self.decode_step(tgt[:, t], state, encoder_outputs, src_mask, summary)
        return logits


class ZeroInit(ref.Seq2Seq):
    """The decoder's and the attention's weights start at zero (N(0, 1) weights still learn in time)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith(("decoder_", "attn_")):
                    p.zero_()


class EncoderIsNNLSTM(ref.Seq2Seq):
    def __init__(self, src_vocab_size, tgt_vocab_size, embedding_dim, hidden_size, attention_dim, use_attention=True):
        super().__init__(src_vocab_size, tgt_vocab_size, embedding_dim, hidden_size, attention_dim, use_attention)
        self.encoder = nn.LSTM(embedding_dim, hidden_size, batch_first=True)


def make_greedy(mode):
    class Mutant(ref.Seq2Seq):
        @torch.no_grad()
        def greedy_decode(self, src, max_len, return_attention=False):
            encoder_outputs, src_mask, state = self.encode(src)
            summary = state[0]
            B = src.shape[0]
            y = torch.full((B,), BOS, dtype=torch.long, device=None if mode == "bos_on_cpu" else src.device)
            finished = torch.zeros(B, dtype=torch.bool, device=src.device)
            ids, attention = [], []
            for _ in range(max_len):
                logits, state, weights = self.decode_step(y if mode != "feeds_bos" else y * 0 + BOS, state,
                                                          encoder_outputs, src_mask, summary)
                y = logits.argmax(dim=-1)
                if mode != "no_pad_after_eos":
                    y = y.masked_fill(finished, PAD)
                ids.append(y)
                if weights is not None:
                    attention.append(weights)
                finished = finished | (y == EOS)
                if mode == "stops_at_first_eos" and bool(finished.any()):
                    break
                if mode not in ("runs_to_max_len", "no_pad_after_eos") and bool(finished.all()):
                    break
            ids = torch.stack(ids, dim=1)
            if mode == "includes_bos":
                ids = torch.cat([torch.full((B, 1), BOS, dtype=torch.long, device=src.device), ids], dim=1)[:, :max_len]
            if not return_attention:
                return ids
            return ids, (torch.stack(attention, dim=1) if attention else None)

    Mutant.__name__ = f"Greedy_{mode}"
    return Mutant


class GreedyAttentionTransposed(ref.Seq2Seq):
    """Right ids, but the attention weights (S, L) per row instead of (L, S)."""

    @torch.no_grad()
    def greedy_decode(self, src, max_len, return_attention=False):
        result = super().greedy_decode(src, max_len, return_attention)
        if not return_attention or result[1] is None:
            return result
        return result[0], result[1].transpose(1, 2)


CELL, FORWARD, STATE = C + "lstm_cell", C + "lstm_forward", C + "lstm_state"
SOFTMAX, ATTENTION = C + "masked_softmax", C + "additive_attention"
S2S, GREEDY, TRAINING = C + "seq2seq_forward", C + "greedy_decode", C + "seq2seq_training"

MUTANTS = {
    # name: (namespace overrides, the checks it must fail: exactly these)
    "gates_i_f_o_g": ({"lstm_cell": make_cell(order="ifog")}, {CELL}),
    "gates_f_i_g_o": ({"lstm_cell": make_cell(order="figo")}, {CELL}),
    "gates_onnx_order_i_o_f_g": ({"lstm_cell": make_cell(order="iofg")}, {CELL}),
    "sigmoid_on_the_candidate": ({"lstm_cell": make_cell(candidate=torch.sigmoid)}, {CELL}),
    "sigmoid_on_the_cell_output": ({"lstm_cell": make_cell(cell_out=torch.sigmoid)}, {CELL}),
    "tanh_on_the_gates": ({"lstm_cell": make_cell(gate=torch.tanh)}, {CELL}),
    "bias_ih_twice": ({"lstm_cell": make_cell(bias="ih")}, {CELL}),
    "cell_uses_torch_lstm_cell": ({"lstm_cell": cell_via_torch}, {CELL}),
    "cell_state_not_carried": ({"LSTM": make_lstm("cell_state_not_carried")}, {FORWARD}),
    "layers_fed_x": ({"LSTM": make_lstm("layers_fed_x")}, {FORWARD}),
    "zero_state_on_cpu": ({"LSTM": make_lstm("zeros_on_cpu")}, {FORWARD}),
    "initial_state_ignored": ({"LSTM": make_lstm("state_ignored")}, {STATE}),
    "every_layer_starts_from_state_0": ({"LSTM": make_lstm("every_layer_starts_from_state_0")}, {STATE}),
    "final_state_of_step_0": ({"LSTM": make_lstm("final_state_of_step_0")}, {STATE}),
    "h_n_top_layer_repeated": ({"LSTM": make_lstm("h_n_top_layer_repeated")}, {STATE}),
    "c_n_not_updated": ({"LSTM": make_lstm("c_n_not_updated")}, {STATE}),
    "lstm_uses_torch_lstm": ({"LSTM": LSTMViaTorch}, {FORWARD, STATE}),
    "softmax_not_masked": ({"masked_softmax": softmax_not_masked}, {SOFTMAX}),
    "softmax_mask_inverted": ({"masked_softmax": softmax_mask_inverted}, {SOFTMAX}),
    "softmax_masked_with_minus_1e9": ({"masked_softmax": softmax_large_finite}, {SOFTMAX}),
    "softmax_over_the_wrong_axis": ({"masked_softmax": softmax_wrong_axis}, {SOFTMAX}),
    "softmax_nan_when_fully_masked": ({"masked_softmax": softmax_nan_when_fully_masked}, {SOFTMAX}),
    "softmax_times_mask_not_renormalized": ({"masked_softmax": softmax_times_mask}, {SOFTMAX}),
    "softmax_exp_without_max": ({"masked_softmax": softmax_unstable}, {SOFTMAX}),
    "attention_scores_without_tanh": ({"additive_attention": make_attention("no_tanh")}, {ATTENTION}),
    "attention_softmax_over_the_batch": ({"additive_attention": make_attention("softmax_over_batch")}, {ATTENTION}),
    "attention_ignores_the_mask": ({"additive_attention": make_attention("ignores_mask")}, {ATTENTION}),
    "attention_context_from_keys": ({"additive_attention": make_attention("context_from_keys")}, {ATTENTION}),
    "teacher_forcing_reads_tgt_1_on": ({"Seq2Seq": TeacherForcingPeeks}, {S2S}),
    "logits_misaligned_by_one": ({"Seq2Seq": LogitsMisaligned}, {S2S}),
    # a mistake in decode_step, which greedy_decode shares: its output agrees with its own forward
    "output_reads_context_then_h": ({"Seq2Seq": OutputReadsContextThenH}, {S2S}),
    "seq2seq_attention_without_mask": ({"Seq2Seq": AttentionWithoutMask}, {S2S}),
    "encoder_state_after_the_padding": ({"Seq2Seq": EncoderStateAfterPadding}, {S2S}),
    "logits_preallocated_on_cpu": ({"Seq2Seq": LogitsPreallocatedOnCPU}, {S2S}),
    "encoder_is_nn_lstm": ({"Seq2Seq": EncoderIsNNLSTM}, {S2S, GREEDY, TRAINING}),
    "decoder_and_attention_zero_init": ({"Seq2Seq": ZeroInit}, {TRAINING}),
    "greedy_feeds_bos_every_step": ({"Seq2Seq": make_greedy("feeds_bos")}, {GREEDY}),
    "greedy_no_pad_after_eos": ({"Seq2Seq": make_greedy("no_pad_after_eos")}, {GREEDY}),
    "greedy_runs_to_max_len": ({"Seq2Seq": make_greedy("runs_to_max_len")}, {GREEDY}),
    "greedy_stops_at_the_first_eos": ({"Seq2Seq": make_greedy("stops_at_first_eos")}, {GREEDY}),
    "greedy_includes_bos": ({"Seq2Seq": make_greedy("includes_bos")}, {GREEDY}),
    "greedy_attention_transposed": ({"Seq2Seq": GreedyAttentionTransposed}, {GREEDY}),
    "greedy_bos_on_cpu": ({"Seq2Seq": make_greedy("bos_on_cpu")}, {GREEDY} if CUDA else set()),
}

# Mutants of a part that Seq2Seq is built from run the Seq2Seq cells too (their visible tests use the
# student's parts). The training cell's hidden check swaps every part for the reference's, so for
# them it is the reference's own run: only these representatives repeat it in full.
TRAINING_REPRESENTATIVES = {"gates_i_f_o_g", "layers_fed_x", "softmax_over_the_wrong_axis",
                            "attention_scores_without_tanh"}


def _part_only(mutant: str) -> bool:
    return set(MUTANTS[mutant][0]) <= PARTS


def run_cell(u, check, visible, ns, mutant):
    exec(compile(visible, check, "exec"), ns)
    if check == TRAINING and _part_only(mutant) and mutant not in TRAINING_REPRESENTATIVES:
        return
    u.run_check(check, ns)


globals().update(common_tests(
    U, lazy_ns=lazy_ns, mutants=MUTANTS, cell_runner=run_cell, hidden_seconds=15.0,
    hidden_only_mutants=[m for m in MUTANTS if not _part_only(m) or m in TRAINING_REPRESENTATIVES]))


def test_failure_messages_say_what_and_where():
    with pytest.raises(GradingFailure) as info:
        run_check(CELL, make_ns({"lstm_cell": make_cell(order="ifog")}))
    message = str(info.value)
    assert "nn.LSTMCell" in message and "order i, f, g, o" in message and "max abs error" in message
    with pytest.raises(GradingFailure, match="Forbidden call"):
        run_check(FORWARD, make_ns({"LSTM": LSTMViaTorch}))
    with pytest.raises(GradingFailure, match="exactly 0"):
        run_check(SOFTMAX, make_ns({"masked_softmax": softmax_large_finite}))
    with pytest.raises(GradingFailure, match=r"tgt\[:, -1\]"):
        run_check(S2S, make_ns({"Seq2Seq": TeacherForcingPeeks}))
    with pytest.raises(GradingFailure, match="stop as soon as every row"):
        run_check(GREEDY, make_ns({"Seq2Seq": make_greedy("runs_to_max_len")}))
    device_bug = "on cuda.*device" if CUDA else "meta device.*device"  # found on the GPU, or on the meta device
    with pytest.raises(GradingFailure, match=device_bug):
        run_check(FORWARD, make_ns({"LSTM": make_lstm("zeros_on_cpu")}))
    with pytest.raises(GradingFailure, match=device_bug):
        run_check(S2S, make_ns({"Seq2Seq": LogitsPreallocatedOnCPU}))
