"""Hidden tests of unit 04 (LSTMs, seq2seq and Bahdanau attention: dates to ISO 8601).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with the reference exported from the solution
notebook, and with PyTorch's own modules where PyTorch has them (``nn.LSTMCell``, ``nn.LSTM``), on
several seeds, shapes and dtypes, on every device present, and raises ``GradingFailure`` with a
message that says what was expected, on which input, and how far off the answer was.

One mistake costs once:

- ``lstm_cell`` is graded by ``check_lstm_cell`` only: every other check swaps in the reference's.
- ``LSTM`` is graded in two checks that see different mistakes. ``check_lstm_forward`` compares the
  output from a zero state (``state=None``) with ``nn.LSTM``'s: the recurrence, the cell state
  carried from step to step, the stacking of layers, the parameter names, and a zero state
  created on the wrong device (a meta-device run finds it on machines without a GPU too).
  ``check_lstm_state`` compares one step from a given ``(h0, c0)`` with ``nn.LSTM``, one layer
  (so neither the cell state's carrying nor the stacking shows), and checks what the final state
  must satisfy whatever the recurrence inside: ``h_n[-1] == output[:, -1]``, and running a
  sequence in two pieces, the second from the state the first returned, gives the same outputs
  and final state (input size == hidden size when there are several layers, so a layer fed ``x`` instead of the
  outputs below runs without error).
- ``masked_softmax`` is graded by ``check_masked_softmax`` only; ``check_additive_attention``
  swaps in the reference's.
- ``Seq2Seq``: ``check_seq2seq_forward`` loads the reference's weights and compares logits (also
  with extra PAD columns after the sources) and gradients; ``check_greedy_decode`` accepts either the reference's output for the same weights
  or an output that follows the decoding rules and agrees with the student's own ``forward``
  (so a mistake in a step shared by both costs in ``forward`` only); ``check_seq2seq_training``
  trains the student's class with the hidden test's own loss and batches and measures exact match
  with teacher forcing, which for a correct model equals greedy decoding's (so a greedy mistake
  does not cost here). All three run with the reference ``lstm_cell``, ``LSTM``,
  ``masked_softmax`` and ``additive_attention`` swapped in.

Using a forbidden library RNN fails every check of the name that uses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder.references import unit04_lstm_seq2seq as ref
from llmcourse.data import date_pairs, seq2seq_vocab
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_gradients,
    beside,
    call_student,
    forbid,
    is_instance,
    load_weights,
    manual_seed,
    on_each_device,
    student,
    swapped,
)
from llmcourse.runtime import single_thread
from llmcourse.training import pad_sequences

# The checks run in the grader's process; the student's names are reached over llmcourse.wire.
RUNS_OUTSIDE_THE_KERNEL = True

PAD_ID, BOS_ID, EOS_ID = ref.PAD_ID, ref.BOS_ID, ref.EOS_ID

# The training outcome (stated in the notebook): Seq2Seq(V_src, V_tgt, *TRAIN_SIZES) after
# torch.manual_seed(0), TRAIN_STEPS Adam steps at TRAIN_LR on batches of TRAIN_BATCH of
# TRAIN_PAIRS dates in TRAIN_FORMATS, gradients clipped at norm 1; then an exact match (teacher
# forcing) of at least ACCURACY_BAR on TEST_PAIRS held-out dates.
TRAIN_FORMATS = ("dotted",)
TRAIN_SIZES = (16, 32, 32)  # embedding_dim, hidden_size, attention_dim
TRAIN_PAIRS, TEST_PAIRS = 2000, 500
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 80, 64, 0.03
ACCURACY_BAR = 0.80

NO_LIBRARY_RNN = ("Implement the LSTM from tensor operations and your lstm_cell: nn.LSTM, nn.LSTMCell, "
                  "nn.RNN, nn.GRU and their functional versions are not allowed here.")
RNN_MODULES = (nn.LSTM, nn.LSTMCell, nn.RNN, nn.RNNCell, nn.GRU, nn.GRUCell)
FORBIDDEN_RNNS = (*RNN_MODULES, "lstm", "lstm_cell",
                  "_thnn_fused_lstm_cell", "gru", "gru_cell", "_thnn_fused_gru_cell", "rnn_tanh", "rnn_relu",
                  "rnn_tanh_cell", "rnn_relu_cell", "_cudnn_rnn", "miopen_rnn", "mkldnn_rnn_layer")
_DEVICE_ERRORS = ("same device", "expected device", "two devices", "different device", "copy out of meta")
F32, F64 = torch.float32, torch.float64


def _no_rnns():
    return forbid(*FORBIDDEN_RNNS, reason=NO_LIBRARY_RNN)


def _no_rnn_modules():
    """For building a student's module: the library RNN classes only, no torch-function mode (creating
    an nn.Parameter under one imports torch._dynamo, seconds the first time)."""
    return forbid(*RNN_MODULES, reason=NO_LIBRARY_RNN)


def _tol(dtype) -> float:
    return 1e-5 if dtype == F32 else 1e-10


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _meta_device_check(call, what: str) -> None:
    """A meta tensor stands in for a GPU on machines without one: code that creates a tensor on the
    CPU inside the function fails with a device mismatch or returns a CPU tensor. Inconclusive (it
    passes) when the code needs real data (``.item()``), which meta tensors don't have."""
    try:
        out = call()
    except Exception as err:
        text = str(err).lower()
        if any(e in text for e in _DEVICE_ERRORS):
            raise GradingFailure(f"{what}: your code raised {type(err).__name__}: {err} (create every new "
                                 f"tensor on the device of the input, e.g. x.new_zeros(...) or "
                                 f"torch.zeros(..., device=x.device))") from err
        if isinstance(err, NotImplementedError) and "meta" not in text:
            raise  # an unfinished stub
        return
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if _is_tensor(first) and first.device.type != "meta":
        raise GradingFailure(f"{what}: for an input on another device (here 'meta') you returned a tensor on "
                             f"{first.device}: create new tensors on the input's device (x.new_zeros(...), "
                             f"device=x.device)")


def _randn(g, *shape, dtype=F32, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


# --- part 1: lstm_cell --------------------------------------------------------------------------

CELL_CASES = [  # (B, D, H, dtype): D the input size
    (1, 1, 1, F32), (3, 4, 5, F32), (2, 6, 3, F64), (5, 3, 8, F32), (1, 7, 7, F64), (16, 10, 12, F32),
]


def _cell_pair(result, what):
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(_is_tensor(t) for t in result)):
        raise GradingFailure(f"{what}: lstm_cell must return a pair of tensors (h, c), got {result!r:.150}")
    return result


def check_lstm_cell(ns):
    fn = student(ns, "lstm_cell")

    def check(device):
        for seed, (B, D, H, dtype) in enumerate(CELL_CASES):
            g = torch.Generator().manual_seed(seed)
            x, h0, c0 = _randn(g, B, D, dtype=dtype), _randn(g, B, H, dtype=dtype), _randn(g, B, H, dtype=dtype, scale=2.0)
            cell = nn.LSTMCell(D, H, dtype=dtype)
            with torch.no_grad():
                for p in cell.parameters():
                    p.copy_(_randn(g, *p.shape, dtype=dtype, scale=0.8))
            cell.to(device)
            upstream_h, upstream_c = _randn(g, B, H, dtype=dtype).to(device), _randn(g, B, H, dtype=dtype).to(device)
            what = (f"lstm_cell(x ({B}, {D}), (h_prev, c_prev) ({B}, {H}) each, nn.LSTMCell({D}, {H})'s weights), "
                    f"{dtype}, on {device}")
            inputs = [t.to(device).requires_grad_(True) for t in (x, h0, c0)]
            expected_h, expected_c = cell(inputs[0], (inputs[1], inputs[2]))
            ((expected_h * upstream_h).sum() + (expected_c * upstream_c).sum()).backward()
            expected_grads = [t.grad for t in inputs] + [p.grad for p in
                                                         (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
            mine = [t.detach().clone().requires_grad_(True) for t in inputs]
            weights = [p.detach().clone().requires_grad_(True) for p in
                       (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
            with _no_rnns():
                h, c = _cell_pair(call_student(fn, mine[0], (mine[1], mine[2]), *weights, what=what), what)
            tol = _tol(dtype)
            hint = " (the gates are stacked in PyTorch's order i, f, g, o; sigmoid on i, f, o, tanh on g and on c)"
            assert_close(h, expected_h, atol=tol, rtol=tol, what=f"{what}: h{hint}")
            assert_close(c, expected_c, atol=tol, rtol=tol, what=f"{what}: c{hint}")
            if not (h.requires_grad and c.requires_grad):
                raise GradingFailure(f"{what}: h and c must be differentiable (don't detach, use torch operations)")
            loss = (h * upstream_h).sum() + (c * upstream_c).sum()
            call_student(loss.backward, what=f"{what}: backward()")
            names = ["x", "h_prev", "c_prev", "W_ih", "W_hh", "b_ih", "b_hh"]
            assert_gradients(zip(names, mine + weights, expected_grads, strict=True), what=what,
                             atol=10 * tol, rtol=10 * tol, of="(h, c)")

    with single_thread():
        on_each_device(check)


# --- part 2: LSTM -------------------------------------------------------------------------------

FORWARD_CASES = [  # (B, T, D, H, num_layers, dtype)
    (1, 1, 1, 1, 1, F32), (2, 5, 3, 4, 1, F32), (3, 7, 4, 6, 2, F32), (1, 9, 5, 3, 2, F64),
    (4, 4, 6, 6, 2, F64), (2, 6, 3, 5, 3, F32), (8, 12, 10, 16, 1, F32), (3, 3, 2, 2, 3, F64),
]
STATE_STEP_CASES = [(1, 1, 1, F32), (2, 3, 4, F32), (3, 5, 2, F64), (4, 6, 6, F32)]  # (B, D, H, dtype)
STATE_SPLIT_CASES = [  # (B, T, D, H, num_layers, dtype); D == H when there are several layers
    (2, 6, 3, 4, 1, F32), (3, 5, 4, 4, 2, F64), (1, 4, 3, 3, 3, F32), (2, 7, 5, 5, 2, F32),
]


def _torch_lstm(D, H, L, dtype, seed):
    torch.manual_seed(seed)
    return nn.LSTM(D, H, num_layers=L, batch_first=True, dtype=dtype)


def _student_lstm(cls, D, H, L, dtype, weights, what):
    """The student's LSTM(D, H, L) holding ``weights`` (an nn.LSTM's state_dict), in dtype."""
    with _no_rnn_modules():
        model = call_student(cls, D, H, L, what=what)
    if not is_instance(model, nn.Module):
        raise GradingFailure(f"{what}: LSTM must be an nn.Module")
    model = model.to(dtype)
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise GradingFailure(f"{what}: your parameters are named {sorted(params)}, nn.LSTM's are {sorted(weights)}; "
                             f"register them under nn.LSTM's names (setattr(self, f'weight_ih_l{{l}}', nn.Parameter(...)))")
    for name, w in weights.items():
        if tuple(params[name].shape) != tuple(w.shape):
            raise GradingFailure(f"{what}: {name} has shape {tuple(params[name].shape)}, nn.LSTM's has {tuple(w.shape)}")
    load_weights(model, weights)
    return model


def _lstm_result(result, what):
    """(output, (h_n, c_n)), as nn.LSTM returns them."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and _is_tensor(result[0])
            and isinstance(result[1], (tuple, list)) and len(result[1]) == 2
            and all(_is_tensor(t) for t in result[1])):
        raise GradingFailure(f"{what}: LSTM.forward must return (output, (h_n, c_n)) as nn.LSTM does, got "
                             f"{result!r:.150}")
    return result[0], tuple(result[1])


def check_lstm_forward(ns):
    cls = student(ns, "LSTM")

    def check(device):
        for seed, (B, T, D, H, L, dtype) in enumerate(FORWARD_CASES):
            what = f"LSTM({D}, {H}, num_layers={L}) with nn.LSTM's weights, x of shape ({B}, {T}, {D}), {dtype}, on {device}"
            torch_lstm = _torch_lstm(D, H, L, dtype, seed)
            model = _student_lstm(cls, D, H, L, dtype, torch_lstm.state_dict(), what).to(device)
            g = torch.Generator().manual_seed(100 + seed)
            x, upstream = _randn(g, B, T, D, dtype=dtype), _randn(g, B, T, H, dtype=dtype)
            x_ref = x.clone().requires_grad_(True)  # nn.LSTM on the CPU: cuDNN's runs in TF32
            expected, _ = torch_lstm(x_ref)
            (expected * upstream).sum().backward()
            expected, expected_grad = expected.detach().to(device), x_ref.grad.to(device)
            x, upstream = x.to(device), upstream.to(device)
            x_mine = x.clone().requires_grad_(True)
            with _no_rnns():
                output, _ = _lstm_result(call_student(model, x_mine, what=what), what)
            tol = _tol(dtype)
            assert_close(output, expected, atol=tol, rtol=tol,
                         what=f"{what}: the output (the top layer's h at every step, from a zero state; layer l + 1 "
                              f"reads layer l's outputs, and (h, c) are carried from step to step)")
            if not output.requires_grad:
                raise GradingFailure(f"{what}: the output must be differentiable (don't detach)")
            call_student((output * upstream).sum().backward, what=f"{what}: backward()")
            if x_mine.grad is None:
                raise GradingFailure(f"{what}: the output does not depend on x")
            assert_close(x_mine.grad, expected_grad, atol=10 * tol, rtol=10 * tol,
                         what=f"{what}: the gradient of the output with respect to x")

    with swapped(ns, lstm_cell=ref.lstm_cell), single_thread():
        on_each_device(check)
        for B, T, D, H, L in [(2, 3, 3, 4, 1), (2, 3, 4, 4, 2)]:
            what = f"LSTM({D}, {H}, num_layers={L}) on the meta device, x of shape ({B}, {T}, {D}), state=None"
            model = _student_lstm(cls, D, H, L, F32, _torch_lstm(D, H, L, F32, 0).state_dict(), what).to("meta")
            x = torch.empty(B, T, D, device="meta")

            def run(model=model, x=x):
                with _no_rnns():
                    return model(x)

            _meta_device_check(run, what + " (the zero initial state must be created on x's device)")


def check_lstm_state(ns):
    cls = student(ns, "LSTM")

    def check(device):
        # One step from a given state, one layer: the initial state is used and the final state returned.
        for seed, (B, D, H, dtype) in enumerate(STATE_STEP_CASES):
            what = (f"LSTM({D}, {H}) with nn.LSTM's weights, x of shape ({B}, 1, {D}) and a random state (h0, c0) "
                    f"of shape (1, {B}, {H}) each, {dtype}, on {device}")
            torch_lstm = _torch_lstm(D, H, 1, dtype, 50 + seed)
            model = _student_lstm(cls, D, H, 1, dtype, torch_lstm.state_dict(), what).to(device)
            g = torch.Generator().manual_seed(200 + seed)
            x = _randn(g, B, 1, D, dtype=dtype)
            state = (_randn(g, 1, B, H, dtype=dtype), _randn(g, 1, B, H, dtype=dtype, scale=2.0))
            with torch.no_grad():  # nn.LSTM on the CPU: cuDNN's runs in TF32
                expected, (expected_h, _) = torch_lstm(x, state)
            expected, expected_h = expected.to(device), expected_h.to(device)
            x, state = x.to(device), (state[0].to(device), state[1].to(device))
            with _no_rnns():
                output, (h_n, c_n) = _lstm_result(call_student(model, x, state, what=what), what)
            assert_equal((tuple(h_n.shape), tuple(c_n.shape)), ((1, B, H), (1, B, H)),
                         what=f"{what}: the shapes of h_n and c_n, (num_layers, B, H)")
            tol = _tol(dtype)
            assert_close(output, expected, atol=tol, rtol=tol,
                         what=f"{what}: the output of one step from the given state (layer l starts from (h0[l], c0[l]))")
            assert_close(h_n, expected_h, atol=tol, rtol=tol, what=f"{what}: h_n, the state after the last step")
        # Several steps and layers: what the final state must satisfy, whatever the recurrence.
        for seed, (B, T, D, H, L, dtype) in enumerate(STATE_SPLIT_CASES):
            what = (f"LSTM({D}, {H}, num_layers={L}), x of shape ({B}, {T}, {D}) and a random state of shape "
                    f"({L}, {B}, {H}) each, {dtype}, on {device}")
            model = _student_lstm(cls, D, H, L, dtype, _torch_lstm(D, H, L, dtype, 70 + seed).state_dict(),
                                  what).to(device)
            g = torch.Generator().manual_seed(300 + seed)
            x = _randn(g, B, T, D, dtype=dtype).to(device)
            state = (_randn(g, L, B, H, dtype=dtype).to(device), _randn(g, L, B, H, dtype=dtype).to(device))
            tol = _tol(dtype)
            with torch.no_grad(), _no_rnns():
                output, (h_n, c_n) = _lstm_result(call_student(model, x, state, what=what), what)
                assert_equal((tuple(h_n.shape), tuple(c_n.shape)), ((L, B, H), (L, B, H)),
                             what=f"{what}: the shapes of h_n and c_n, (num_layers, B, H)")
                assert_close(h_n[-1], output[:, -1], atol=tol, rtol=tol,
                             what=f"{what}: h_n[-1] (the top layer's state after the last step) against output[:, -1]")
                for k in range(1, T):
                    piece = f"{what}: x[:, :{k}] then x[:, {k}:] from the state returned after x[:, :{k}], against x whole"
                    first, middle = _lstm_result(call_student(model, x[:, :k], state, what=piece), piece)
                    second, (h_end, c_end) = _lstm_result(call_student(model, x[:, k:], middle, what=piece), piece)
                    assert_close(torch.cat([first, second], dim=1), output, atol=tol, rtol=tol,
                                 what=f"{piece}: the outputs (h_n and c_n must be every layer's state after the last "
                                      f"step, and each layer must start from its own initial state)")
                    assert_close(h_end, h_n, atol=tol, rtol=tol, what=f"{piece}: h_n")
                    assert_close(c_end, c_n, atol=tol, rtol=tol, what=f"{piece}: c_n")

    with swapped(ns, lstm_cell=ref.lstm_cell), single_thread():
        on_each_device(check)


# --- part 3: attention --------------------------------------------------------------------------

SOFTMAX_CASES = [  # (shape of the scores, dtype, scale, mask: None, "all" or "random")
    ((1, 1), F32, 1.0, "all"), ((4, 6), F32, 1.0, "random"), ((3, 5), F64, 30.0, "random"),
    ((2, 3, 7), F32, 5.0, "random"), ((6,), F64, 1.0, "random"), ((5, 8), F32, 1000.0, "random"),
    ((2, 2, 2, 4), F64, 2.0, "random"), ((4, 5), F32, 1.0, None), ((3, 1), F32, 3.0, "random"),
]


def _random_mask(g, shape, device):
    """Random True/False; the first row fully masked, the last fully attended (when there are two rows)."""
    mask = torch.rand(*shape, generator=g) < 0.6
    rows = mask.view(-1, shape[-1])
    if rows.shape[0] >= 2:
        rows[0] = False
        rows[-1] = True
    else:
        rows[0, 0] = True
    return mask.to(device)


def _mask_name(mask):
    return "no mask" if mask is None else f"a mask with {int((~mask).sum())} of {mask.numel()} positions masked"


def check_masked_softmax(ns):
    fn = student(ns, "masked_softmax")

    def check(device):
        for seed, (shape, dtype, scale, kind) in enumerate(SOFTMAX_CASES):
            g = torch.Generator().manual_seed(400 + seed)
            scores = _randn(g, *shape, dtype=dtype, scale=scale).to(device)
            mask = None if kind is None else (torch.ones(shape, dtype=torch.bool, device=device) if kind == "all"
                                              else _random_mask(g, shape, device))
            upstream = _randn(g, *shape, dtype=dtype).to(device)
            what = f"masked_softmax(scores of shape {shape} and scale {scale:g}, {_mask_name(mask)}), {dtype}, on {device}"
            theirs = scores.clone().requires_grad_(True)
            expected = ref.masked_softmax(theirs, mask)
            (expected * upstream).sum().backward()
            mine = scores.clone().requires_grad_(True)
            got = call_student(fn, mine, mask, what=what)
            if not _is_tensor(got):
                raise GradingFailure(f"{what}: masked_softmax must return a tensor, got {got!r:.100}")
            assert_equal(tuple(got.shape), tuple(shape), what=f"{what}: the shape of the weights (the shape of scores)")
            if got.dtype != dtype:
                raise GradingFailure(f"{what}: the weights must have the dtype of scores ({dtype}), got {got.dtype}")
            if bool(torch.isnan(got).any()):
                where = torch.isnan(got).nonzero()[0].tolist()
                raise GradingFailure(f"{what}: the weights contain nan (e.g. at {where}); a fully masked row must give "
                                     f"zeros, not 0/0")
            if mask is not None and bool((got[~mask] != 0).any()):
                leak = float(got.detach()[~mask].abs().max())
                raise GradingFailure(f"{what}: masked positions must get a weight of exactly 0, found {leak:.3g} (set "
                                     f"their scores to -inf before the softmax, and give fully masked rows zeros)")
            tol = _tol(dtype)
            assert_close(got, expected, atol=tol, rtol=tol,
                         what=f"{what}: the weights (a softmax over the last axis, over the attended positions)")
            if got.requires_grad:
                call_student((got * upstream).sum().backward, what=f"{what}: backward()")
            assert_gradients([("the scores", mine, theirs.grad)], what=what, atol=10 * tol, rtol=10 * tol,
                             of="the weights")

    with single_thread():
        on_each_device(check)


ATTENTION_CASES = [  # (B, S, Dq, Dk, Dv, A, dtype, mask)
    (1, 1, 1, 1, 1, 1, F32, None), (2, 5, 3, 4, 6, 7, F32, None), (3, 4, 5, 5, 5, 8, F64, "random"),
    (4, 6, 3, 2, 5, 4, F32, "random"), (1, 7, 4, 6, 3, 5, F64, "all"), (5, 3, 6, 4, 2, 3, F32, "random"),
    (2, 9, 8, 8, 8, 16, F64, None),
]


def check_additive_attention(ns):
    fn = student(ns, "additive_attention")
    names = ("query", "keys", "values", "W_q", "W_k", "v")

    def check(device):
        for seed, (B, S, Dq, Dk, Dv, A, dtype, kind) in enumerate(ATTENTION_CASES):
            g = torch.Generator().manual_seed(500 + seed)
            tensors = [_randn(g, B, Dq, dtype=dtype), _randn(g, B, S, Dk, dtype=dtype), _randn(g, B, S, Dv, dtype=dtype),
                       _randn(g, A, Dq, dtype=dtype, scale=0.7), _randn(g, A, Dk, dtype=dtype, scale=0.7),
                       _randn(g, A, dtype=dtype, scale=1.5)]
            tensors = [t.to(device) for t in tensors]
            mask = None if kind is None else (torch.ones(B, S, dtype=torch.bool, device=device) if kind == "all"
                                              else _random_mask(g, (B, S), device))
            up_context, up_weights = _randn(g, B, Dv, dtype=dtype).to(device), _randn(g, B, S, dtype=dtype).to(device)
            what = (f"additive_attention(query ({B}, {Dq}), keys ({B}, {S}, {Dk}), values ({B}, {S}, {Dv}), "
                    f"{_mask_name(mask)}, W_q ({A}, {Dq}), W_k ({A}, {Dk}), v ({A},)), {dtype}, on {device}")
            theirs = [t.clone().requires_grad_(True) for t in tensors]
            expected_context, expected_weights = ref.additive_attention(*theirs[:3], mask, *theirs[3:])
            ((expected_context * up_context).sum() + (expected_weights * up_weights).sum()).backward()
            mine = [t.clone().requires_grad_(True) for t in tensors]
            result = call_student(fn, *mine[:3], mask, *mine[3:], what=what)
            if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(_is_tensor(t) for t in result)):
                raise GradingFailure(f"{what}: additive_attention must return (context, weights), got {result!r:.150}")
            context, weights = result
            assert_equal((tuple(context.shape), tuple(weights.shape)), ((B, Dv), (B, S)),
                         what=f"{what}: the shapes of (context, weights)")
            tol = _tol(dtype)
            assert_close(weights, expected_weights, atol=tol, rtol=tol,
                         what=f"{what}: the weights (masked_softmax over the S positions of v . tanh(W_q q + W_k k_s))")
            assert_close(context, expected_context, atol=tol, rtol=tol,
                         what=f"{what}: the context (the values weighted by the attention weights)")
            loss = (context * up_context).sum() + (weights * up_weights).sum()
            call_student(loss.backward, what=f"{what}: backward()")
            assert_gradients([(name, leaf, other.grad) for name, leaf, other in zip(names, mine, theirs, strict=True)],
                             what=what, atol=10 * tol, rtol=10 * tol, of="(context, weights)")

    with swapped(ns, masked_softmax=ref.masked_softmax), single_thread():
        on_each_device(check)


# --- part 4: Seq2Seq ----------------------------------------------------------------------------

def _reference_parts(ns):
    """Seq2Seq's checks run with the reference parts graded elsewhere."""
    return swapped(ns, lstm_cell=ref.lstm_cell, LSTM=ref.LSTM, masked_softmax=ref.masked_softmax,
                   additive_attention=ref.additive_attention)


def _sizes(Vs, Vt, E, H, A, use_attention):
    return (f"Seq2Seq(src_vocab_size={Vs}, tgt_vocab_size={Vt}, embedding_dim={E}, hidden_size={H}, "
            f"attention_dim={A}, use_attention={use_attention})")


def _student_seq2seq(cls, reference, args, what):
    """The student's Seq2Seq(*args) holding the reference's weights."""
    with _no_rnn_modules():
        model = call_student(cls, *args[:5], use_attention=args[5], what=what)
    if not is_instance(model, nn.Module):
        raise GradingFailure(f"{what}: Seq2Seq must be an nn.Module")
    params = dict(model.named_parameters())
    expected = dict(reference.named_parameters())
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise GradingFailure(f"{what}: the parameter names are the contract (the table in part 4): missing "
                             f"{missing}, unexpected {extra}")
    for name, p in expected.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise GradingFailure(f"{what}: {name} has shape {tuple(params[name].shape)}, expected {tuple(p.shape)}")
    load_weights(model, expected)
    return model


def _random_batch(g, Vs, Vt, src_lengths, T):
    """src (B, S) right-padded with PAD; tgt (B, T): BOS, characters, EOS, PAD (the rows of different lengths)."""
    src = pad_sequences([torch.randint(3, Vs, (n,), generator=g).tolist() for n in src_lengths], pad=PAD_ID)
    rows = []
    for b in range(len(src_lengths)):
        n = T - 2 if b % 2 == 0 else int(torch.randint(0, T - 1, (1,), generator=g))
        rows.append([BOS_ID] + torch.randint(3, Vt, (n,), generator=g).tolist() + [EOS_ID])
    tgt = pad_sequences(rows, pad=PAD_ID)
    if tgt.shape[1] < T:
        tgt = torch.cat([tgt, torch.full((len(rows), T - tgt.shape[1]), PAD_ID)], dim=1)
    return src, tgt


FORWARD_SEQ_CASES = [  # (Vs, Vt, E, H, A, use_attention, source lengths, T, dtype)
    (12, 9, 4, 5, 3, True, [6, 4, 1, 6], 5, F32), (12, 9, 4, 5, 3, False, [6, 4, 1, 6], 5, F32),
    (8, 6, 3, 4, 2, True, [3], 2, F64), (20, 14, 6, 8, 7, True, [9, 9, 2], 8, F64),
    (20, 14, 6, 8, 7, False, [5, 9, 2], 8, F64), (10, 7, 5, 3, 6, True, [1, 2], 3, F32),
]


def _new_reference(args, seed, dtype):
    torch.manual_seed(seed)
    model = ref.Seq2Seq(*args[:5], use_attention=args[5])
    with torch.no_grad():  # livelier than the initialization: larger weights, non-zero logits
        for p in model.parameters():
            p.mul_(1.5)
    return model.to(dtype)


def _peeks(model, src, tgt) -> bool:
    """Whether the logits change when tgt[:, -1], which no decoder input may contain, changes."""
    try:
        with torch.no_grad():
            changed = tgt.clone()
            changed[:, -1] = torch.where(tgt[:, -1] == 3, 4, 3)
            return not torch.allclose(model(src, tgt), model(src, changed))
    except Exception:
        return False


def check_seq2seq_forward(ns):
    cls = student(ns, "Seq2Seq")

    def check(device):
        for seed, (*args, src_lengths, T, dtype) in enumerate(FORWARD_SEQ_CASES):
            Vs, Vt = args[0], args[1]
            what = f"{_sizes(*args)} with the reference's weights, {dtype}, on {device}"
            reference = _new_reference(args, 600 + seed, dtype)
            model = _student_seq2seq(cls, reference, args, what).to(device=device, dtype=dtype)
            reference.to(device)
            g = torch.Generator().manual_seed(700 + seed)
            src, tgt = _random_batch(g, Vs, Vt, src_lengths, T)
            src, tgt = src.to(device), tgt.to(device)
            what += f", src {src.tolist()}, tgt {tgt.tolist()}"
            expected = reference(src, tgt)
            upstream = _randn(g, *expected.shape, dtype=dtype).to(device)
            (expected * upstream).sum().backward()
            with _no_rnns():
                logits = call_student(model, src, tgt, what=what)
            if not _is_tensor(logits):
                raise GradingFailure(f"{what}: forward must return the logits tensor, got {logits!r:.100}")
            assert_equal(tuple(logits.shape), (len(src_lengths), T - 1, Vt),
                         what=f"{what}: the shape of the logits, (B, T - 1, tgt_vocab_size)")
            tol = _tol(dtype)
            try:
                assert_close(logits, expected, atol=10 * tol, rtol=10 * tol,
                             what=f"{what}: the logits (teacher forcing: the decoder reads tgt[:, :-1], starts from the "
                                  f"encoder's state after each row's last character, attends with its previous h over the encoder outputs "
                                  f"masked where src == PAD_ID, reads [embedding; context], and the output layer "
                                  f"reads [h; context])")
            except GradingFailure as err:
                if _peeks(model, src, tgt):
                    raise GradingFailure(f"{err} Your logits change when tgt[:, -1] changes: the decoder must read "
                                         f"tgt[:, :-1] only, and logits[:, t] must predict tgt[:, t + 1] without "
                                         f"seeing it") from None
                raise
            with torch.no_grad(), _no_rnns():
                longer = torch.cat([src, torch.full((len(src_lengths), 3), PAD_ID, device=device)], dim=1)
                longer_logits = call_student(model, longer, tgt, what=what)
            assert_close(longer_logits, expected, atol=10 * tol, rtol=10 * tol,
                         what=f"{what}: the logits when src has 3 more PAD columns (padding must change nothing: the "
                              f"encoder's final state is the one after each row's last character, and the PAD positions "
                              f"are masked out of attention)")
            call_student((logits * upstream).sum().backward, what=f"{what}: backward()")
            expected_grads = dict(reference.named_parameters())
            for name, p in model.named_parameters():
                if p.grad is None:
                    raise GradingFailure(f"{what}: {name} got no gradient (is it used, and not detached?)")
                assert_close(p.grad, expected_grads[name].grad, atol=100 * tol, rtol=100 * tol,
                             what=f"{what}: the gradient of {name}")

    with _reference_parts(ns), single_thread():
        on_each_device(check)
        for seed, (*args, src_lengths, T, _dtype) in enumerate(FORWARD_SEQ_CASES[:2]):
            what = f"{_sizes(*args)}.forward on the meta device"
            model = _student_seq2seq(cls, _new_reference(args, seed, F32), args, what).to("meta")
            src, tgt = _random_batch(torch.Generator().manual_seed(seed), args[0], args[1], src_lengths, T)
            src, tgt = src.to("meta"), tgt.to("meta")

            def run(model=model, src=src, tgt=tgt):
                with _no_rnns():
                    return model(src, tgt)

            _meta_device_check(run, what)


GREEDY_CASES = [  # (Vs, Vt, E, H, A, use_attention, source lengths, max_len, EOS bias)
    (12, 9, 6, 8, 5, True, [6, 4, 1, 6, 3], 10, 1.5),  # rows stop at steps 0 and 1, or never: max_len steps
    (12, 9, 6, 8, 5, False, [6, 4, 1, 6, 3], 10, 2.0),  # every row stops by step 3: 4 steps
    (15, 10, 5, 7, 6, True, [4], 8, 1.0),  # B = 1, stops at step 4
    (15, 10, 5, 7, 6, True, [5, 2, 7], 1, 0.5),  # max_len = 1, one row says EOS
    (20, 12, 8, 10, 9, True, [9, 3, 8, 8, 1, 5, 7], 14, 1.5),
    (20, 12, 8, 10, 9, True, [9, 3, 8], 6, -9.0),  # never EOS
]
GREEDY_OUTPUT_SCALE = 6.0  # larger output weights: the argmax changes from step to step


def greedy_case(seed: int):
    """(args, reference model (float64), src, max_len) of GREEDY_CASES[seed]."""
    *args, src_lengths, max_len, eos_bias = GREEDY_CASES[seed]
    reference = _new_reference(args, 800 + seed, F64)
    with torch.no_grad():
        reference.output.weight.mul_(GREEDY_OUTPUT_SCALE)
        reference.output.bias[EOS_ID] += eos_bias  # rows that stop early, late and never
    src, _ = _random_batch(torch.Generator().manual_seed(900 + seed), args[0], args[1], src_lengths, 2)
    return args, reference, src, max_len


def _greedy_rule_problems(ids, B, max_len, device) -> list[str]:
    if not _is_tensor(ids):
        return [f"greedy_decode must return a tensor of ids, got {ids!r:.100}"]
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != B or not 1 <= ids.shape[1] <= max_len:
        return [f"greedy_decode must return int64 ids of shape (B, L) with B = {B} and 1 <= L <= max_len = {max_len}, "
                f"got {ids.dtype} of shape {tuple(ids.shape)}"]
    if ids.device != device:
        return [f"the ids are on {ids.device}, the source on {device}"]
    problems = []
    ids = ids.cpu()
    L = ids.shape[1]
    ends = []
    for b, row in enumerate(ids.tolist()):
        end = row.index(EOS_ID) if EOS_ID in row else None
        ends.append(end)
        if end is not None and any(t != PAD_ID for t in row[end + 1:]):
            problems.append(f"row {b} has {row[end + 1:]} after its EOS; every step after a row's EOS must be PAD_ID")
    if all(e is not None for e in ends) and max(ends) != L - 1:
        problems.append(f"every row has produced EOS by step {max(ends) + 1}, but decoding went on for {L} steps: stop "
                        f"as soon as every row has its EOS")
    if L < max_len and any(e is None for e in ends):
        rows = [b for b, e in enumerate(ends) if e is None]
        problems.append(f"decoding stopped after {L} of max_len = {max_len} steps, but rows {rows} have no EOS yet: "
                        f"stop only when every row has produced EOS")
    return problems


def _agrees_with_own_forward(model, src, ids) -> str | None:
    """None if the student's own forward, fed BOS and ids, predicts ids (up to each row's EOS) and
    reads the source; else why not."""
    try:
        with torch.no_grad():
            tgt = torch.cat([torch.full((ids.shape[0], 1), BOS_ID, dtype=torch.long, device=ids.device), ids], dim=1)
            logits = model(src, tgt)
            other_src = torch.where(src != PAD_ID, 3 + (src - 3 + 1) % 2, src)
            if torch.allclose(logits, model(other_src, tgt)):
                return "your forward's logits do not depend on the source"
            predictions = logits.argmax(dim=-1).cpu()
    except Exception as err:
        return f"your forward raised {type(err).__name__}: {err}"
    for b, row in enumerate(ids.cpu().tolist()):
        end = row.index(EOS_ID) if EOS_ID in row else len(row) - 1
        for t in range(end + 1):
            if int(predictions[b, t]) != row[t]:
                return (f"row {b}: at step {t} you output {row[t]}, but your own forward, fed BOS and the {t} ids you "
                        f"output before, predicts {int(predictions[b, t])} (feed back your own prediction, the argmax, "
                        f"at every step)")
    return None


def check_greedy_decode(ns):
    cls = student(ns, "Seq2Seq")

    def check(device):
        for seed in range(len(GREEDY_CASES)):
            args, reference, src, max_len = greedy_case(seed)
            what = (f"{_sizes(*args)}.greedy_decode(src={src.tolist()}, max_len={max_len}) with the reference's "
                    f"weights (float64; the EOS logit shifted so that rows stop at different steps), on {device}")
            model = _student_seq2seq(cls, reference, args, what).to(device=device, dtype=F64)
            reference.to(device)
            src = src.to(device)
            expected = reference.greedy_decode(src, max_len)
            with _no_rnns():
                ids = call_student(model.greedy_decode, src, max_len, what=what)
            if _is_tensor(ids) and ids.shape == expected.shape and ids.device == expected.device and torch.equal(ids, expected):
                _check_attention_output(model, reference, src, max_len, ids, what)
                continue
            problems = _greedy_rule_problems(ids, src.shape[0], max_len, src.device)
            if not problems:
                disagreement = _agrees_with_own_forward(model, src, ids)
                if disagreement is None:
                    continue  # your forward differs from the reference's (graded there), your decoding is right
                problems = [disagreement]
            got = ids.tolist() if _is_tensor(ids) else ids
            if _is_tensor(ids) and ids.dim() == 2 and ids.numel() and bool((ids[:, 0] == BOS_ID).all()):
                problems.append("(Every row starts with BOS_ID: the output must not include the BOS the decoder "
                                "starts from.)")
            raise GradingFailure(f"{what}: got {got!r:.300}, expected {expected.tolist()} (the reference's greedy decoding "
                                 f"of the same weights). {' '.join(problems)}")

    with _reference_parts(ns), single_thread():
        on_each_device(check)


def _check_attention_output(model, reference, src, max_len, ids, what):
    what = what.replace("greedy_decode(", "greedy_decode(return_attention=True, ", 1)
    with _no_rnns():
        result = call_student(model.greedy_decode, src, max_len, return_attention=True, what=what)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and _is_tensor(result[0])):
        raise GradingFailure(f"{what}: with return_attention=True, greedy_decode must return (ids, weights), got "
                             f"{result!r:.150}")
    got_ids, weights = result
    assert_equal(got_ids.tolist(), ids.tolist(), what=f"{what}: the ids (as with return_attention=False)")
    if not reference.use_attention:
        if weights is not None:
            raise GradingFailure(f"{what}: without attention the weights must be None, got {weights!r:.100}")
        return
    B, L, S = ids.shape[0], ids.shape[1], src.shape[1]
    if not _is_tensor(weights):
        raise GradingFailure(f"{what}: the attention weights must be a tensor of shape (B, L, S), got {weights!r:.100}")
    assert_equal(tuple(weights.shape), (B, L, S), what=f"{what}: the shape of the attention weights (B, L, S)")
    for b, row in enumerate(ids.tolist()):  # each step's weights are a distribution over the source
        end = row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
        assert_close(weights[b, :end].sum(dim=-1), torch.ones(end, dtype=weights.dtype, device=weights.device),
                     atol=1e-6, what=f"{what}: the sums over the source positions of row {b}'s attention weights, "
                                     f"step by step up to its EOS")


def training_data():
    """(src vocabulary size, tgt vocabulary size, (src, tgt) for training, (src, tgt) for testing)."""
    train_pairs = date_pairs(TRAIN_PAIRS, seed=11, formats=TRAIN_FORMATS)
    test_pairs = date_pairs(TEST_PAIRS, seed=12, formats=TRAIN_FORMATS)
    src_stoi, _ = seq2seq_vocab([s for s, _ in train_pairs + test_pairs])
    tgt_stoi, _ = seq2seq_vocab(["0123456789-"])

    def encode(pairs):
        src = pad_sequences([[src_stoi[ch] for ch in s] for s, _ in pairs], pad=PAD_ID)
        tgt = pad_sequences([[BOS_ID] + [tgt_stoi[ch] for ch in t] + [EOS_ID] for _, t in pairs], pad=PAD_ID)
        return src, tgt

    return len(src_stoi), len(tgt_stoi), encode(train_pairs), encode(test_pairs)


def train_and_score(model, train, test, steps=TRAIN_STEPS, seed=0) -> tuple[list[float], float]:
    """The hidden test's own training loop (the notebook's may have been edited): Adam, clipping at 1,
    cross-entropy over the non-PAD targets. Returns the losses and the exact match with teacher forcing."""
    src, tgt = train
    generator = torch.Generator().manual_seed(seed)
    optimizer = beside(model, torch.optim.Adam)(model.parameters(), lr=TRAIN_LR)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(src), (TRAIN_BATCH,), generator=generator)
        batch_src, batch_tgt = src[rows], tgt[rows]
        batch_src = batch_src[:, :int((batch_src != PAD_ID).sum(dim=1).max())]
        logits = model(batch_src, batch_tgt)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch_tgt[:, 1:].reshape(-1), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        beside(model, torch.nn.utils.clip_grad_norm_)(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses, exact_match_teacher_forced(model, *test)


@torch.no_grad()
def exact_match_teacher_forced(model, src, tgt, batch_size=500) -> float:
    """The fraction of rows whose every target character (EOS included) is the argmax of its logits."""
    model.eval()
    right = 0
    for start in range(0, len(src), batch_size):
        s, t = src[start:start + batch_size], tgt[start:start + batch_size]
        predictions = model(s, t).argmax(dim=-1)
        right += int(((predictions == t[:, 1:]) | (t[:, 1:] == PAD_ID)).all(dim=1).sum())
    return right / len(src)


def check_seq2seq_training(ns):
    cls = student(ns, "Seq2Seq")
    Vs, Vt, train, test = training_data()
    E, H, A = TRAIN_SIZES
    what = (f"Seq2Seq({Vs}, {Vt}, embedding_dim={E}, hidden_size={H}, attention_dim={A}) after torch.manual_seed(0), "
            f"trained for {TRAIN_STEPS} steps (Adam, lr {TRAIN_LR}, batches of {TRAIN_BATCH}, gradients clipped at 1) "
            f"on {TRAIN_PAIRS} dates like {date_pairs(2, seed=11, formats=TRAIN_FORMATS)}")
    with _reference_parts(ns), single_thread(), _no_rnn_modules():
        manual_seed(0, near=cls)
        model = call_student(cls, Vs, Vt, E, H, A, what=what)
        losses, accuracy = call_student(train_and_score, model, train, test, what=what)
    if not accuracy >= ACCURACY_BAR:
        raise GradingFailure(
            f"{what}: exact match {accuracy:.1%} on {TEST_PAIRS} held-out dates (teacher forcing), at least "
            f"{ACCURACY_BAR:.0%} needed (the reference gets about 99%); the loss went from {losses[0]:.3f} to "
            f"{losses[-1]:.3f}. Check the initialization (uniform in [-1/sqrt(n), 1/sqrt(n)] for the decoder and the "
            f"attention, not zeros) and that every parameter is used and trained")
