"""Hidden tests of unit 03 (neural language models and RNNs: a character-level RNN on names).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with the reference exported from the solution
notebook, and with PyTorch's own modules where PyTorch has them (``nn.RNNCell``, ``nn.RNN``,
``F.cross_entropy``, ``clip_grad_norm_``), on several seeds, shapes and dtypes, on every device
present, and raises ``GradingFailure`` with a message that says what was expected, on which
input, and how far off the answer was.

One mistake costs once:

- ``rnn_cell`` is graded by ``check_rnn_cell`` only: every other check swaps in the reference's.
- ``RNNLM`` is graded in three checks that see different mistakes. ``check_rnnlm_forward`` grades
  the parameters and the logits from ``h0=None`` with both biases random (the recurrence, the
  biases, a state created on the wrong device; a meta-device run finds the last on machines
  without a GPU too). ``check_rnnlm_hidden_state`` grades ``h0`` and ``h_last`` with zero biases
  (a bias mistake does not show), one token per call (whether the state is carried *inside* a
  call does not show) and, for ``h_last`` after several steps, ``weight_hh = 0`` (only "the last
  state, not the first" shows). ``check_rnnlm_training`` trains the class with the reference's
  ``encode_names``, ``sequence_nll`` and ``clip_grad_norm``: a model that does not carry its
  state from step to step (a bigram model in disguise) cannot fit the batch.
- ``encode_names`` is graded by ``check_encode_names`` only.
- ``sequence_nll``: ``check_sequence_nll`` grades values, padding, the mean, both layouts and the
  gradient on ordinary logits; ``check_sequence_nll_stability`` grades logits of +-1000 on
  single targets (so the mean, the padding and the layout do not show).
- ``clip_grad_norm``: ``check_clip_grad_norm`` clips lists of gradients whose norm is well above
  ``max_norm``; ``check_clip_grad_norm_edge_cases`` uses gradients with at most one non-zero entry,
  of magnitude 1 (so how the norm is computed, and global against per-tensor, do not show): below
  ``max_norm``, gradients that are ``None``, generators.
- ``generate`` samples from reference models.

Using a forbidden library routine fails every check of the name that uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder.references import unit03_rnns as ref
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_gradients,
    beside,
    call_on_a_generator,
    call_student,
    forbid,
    is_instance,
    load_weights,
    manual_seed,
    on_each_device,
    student,
    swapped,
    type_name,
)
from llmcourse.runtime import single_thread

# The checks run in the grader's process; the student's names are reached over llmcourse.wire.
RUNS_OUTSIDE_THE_KERNEL = True

# The fixed-batch training test (stated in the notebook): the first TRAINING_NAMES names of the
# training split, RNNLM(27, *TRAINING_SIZES) after torch.manual_seed(0), TRAINING_STEPS full-batch
# Adam steps at TRAINING_LR, gradients clipped at norm 1; the final loss must be <= LOSS_BAR.
TRAINING_NAMES = 32
TRAINING_SIZES = (16, 48)  # embedding_dim, hidden_size
TRAINING_STEPS = 80
TRAINING_LR = 0.02
LOSS_BAR = 1.2

RECURRENT_MODULES = (nn.RNN, nn.RNNCell, nn.GRU, nn.GRUCell, nn.LSTM, nn.LSTMCell)
RECURRENT_OPS = ("rnn_tanh", "rnn_tanh_cell", "rnn_relu", "rnn_relu_cell", "gru", "gru_cell", "lstm",
                 "lstm_cell", "_thnn_fused_gru_cell", "_thnn_fused_lstm_cell")
NO_RNN = ("Write the recurrence yourself with tensor operations (rnn_cell) and a Python loop over "
          "time; PyTorch's recurrent modules are not allowed inside rnn_cell and RNNLM.")
LOSS_OPS = ("cross_entropy", "cross_entropy_loss", "log_softmax", "_log_softmax", "nll_loss", "nll_loss_nd",
            "nll_loss2d", "nll_loss_forward")
NO_LOSS = ("Compute the loss yourself: log-sum-exp (torch.logsumexp, or subtract the maximum) minus the "
           "target's logit; F.cross_entropy, log_softmax and nll_loss are not allowed inside sequence_nll.")
NO_CLIP = ("Compute the global norm and scale the gradients yourself; torch.nn.utils.clip_grad_norm_ "
           "and its helpers are not allowed inside clip_grad_norm.")
_DEVICE_ERRORS = ("same device", "expected device", "two devices", "different device", "not on the expected")


def _clip_routines() -> list:
    """PyTorch's clipping functions, unwrapped from their no_grad wrapper so that forbid() can
    replace their code (every alias of them then raises)."""
    import torch.nn.utils.clip_grad as clip_grad

    routines = []
    for name in ("clip_grad_norm_", "clip_grad_norm", "_clip_grads_with_norm_", "_get_total_norm",
                 "clip_grads_with_norm_", "get_total_norm"):
        fn = getattr(clip_grad, name, None)
        fn = getattr(fn, "__wrapped__", fn)
        if fn is not None and hasattr(fn, "__code__") and not fn.__closure__ and fn not in routines:
            routines.append(fn)
    return routines


def _generator(device) -> torch.Generator:
    return torch.Generator(device=device) if torch.device(device).type != "cpu" else torch.Generator()


def _tolerances(dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-8}


def _is_device_error(err: Exception) -> bool:
    return any(e in str(err).lower() for e in _DEVICE_ERRORS)


# --- part 1: rnn_cell -----------------------------------------------------------------------------

RNN_CELL_CASES = [  # (B, I, H, dtype): batch, input size, hidden size
    (1, 1, 1, torch.float32), (3, 4, 5, torch.float32), (2, 6, 3, torch.float64), (1, 5, 5, torch.float32),
    (8, 3, 16, torch.float64), (4, 10, 2, torch.float32), (16, 32, 64, torch.float32), (5, 7, 7, torch.float64),
]


def _cell_inputs(B, n_in, H, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n_in, generator=g, dtype=dtype)
    h = torch.tanh(torch.randn(B, H, generator=g, dtype=dtype))
    W_xh = torch.randn(H, n_in, generator=g, dtype=dtype) / math.sqrt(n_in)
    W_hh = torch.randn(H, H, generator=g, dtype=dtype) / math.sqrt(H)
    b_h = torch.randn(H, generator=g, dtype=dtype) * 0.5
    return [t.to(device) for t in (x, h, W_xh, W_hh, b_h)]


def check_rnn_cell(ns):
    fn = student(ns, "rnn_cell")

    def check(device):
        for seed, (B, n_in, H, dtype) in enumerate(RNN_CELL_CASES):
            inputs = _cell_inputs(B, n_in, H, dtype, seed, device)
            what = (f"rnn_cell(x_t {(B, n_in)}, h_prev {(B, H)}, W_xh {(H, n_in)}, W_hh {(H, H)}, b_h {(H,)}), "
                    f"{dtype}, on {device}")
            mine = [t.clone().requires_grad_(True) for t in inputs]
            with forbid(*RECURRENT_MODULES, *RECURRENT_OPS, reason=NO_RNN):
                got = call_student(fn, *mine, what=what)
            if not isinstance(got, torch.Tensor):
                raise GradingFailure(f"{what}: expected a tensor, got {type(got).__name__}")
            if got.device != inputs[0].device:
                raise GradingFailure(f"{what}: the result is on {got.device}, not on the inputs' device")
            theirs = [t.clone().requires_grad_(True) for t in inputs]
            expected = ref.rnn_cell(*theirs)
            cell = nn.RNNCell(n_in, H).to(device=device, dtype=dtype)
            with torch.no_grad():
                cell.weight_ih.copy_(inputs[2])
                cell.weight_hh.copy_(inputs[3])
                cell.bias_ih.copy_(inputs[4] * 0.25)
                cell.bias_hh.copy_(inputs[4] * 0.75)
                pytorch = cell(inputs[0], inputs[1])
            tol = _tolerances(dtype)
            assert_close(got, pytorch, **tol, what=f"{what} vs nn.RNNCell({n_in}, {H}) with weight_ih = W_xh, "
                         f"weight_hh = W_hh and bias_ih + bias_hh = b_h: tanh(x_t @ W_xh.T + h_prev @ W_hh.T + b_h)")
            assert_close(got, expected, **tol, what=f"{what} vs the reference")
            # The gradients: your cell must be made of differentiable tensor operations.
            weights = torch.randn(B, H, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype).to(device)
            if not got.requires_grad:
                raise GradingFailure(f"{what}: the result has no gradient (don't detach, use torch operations)")
            call_student((got * weights).sum().backward, what=f"{what}: backward()")
            (expected * weights).sum().backward()
            assert_gradients([(name, a, b.grad) for name, a, b in zip(("x_t", "h_prev", "W_xh", "W_hh", "b_h"),
                                                                      mine, theirs, strict=True)], what=what, **tol)

    with single_thread():
        on_each_device(check)


# --- part 2: RNNLM --------------------------------------------------------------------------------

RNNLM_PARAMETERS = ("embedding.weight", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "output.weight",
                    "output.bias")


def _parameter_shapes(V, E, H) -> dict:
    return {"embedding.weight": (V, E), "weight_ih": (H, E), "weight_hh": (H, H), "bias_ih": (H,),
            "bias_hh": (H,), "output.weight": (V, H), "output.bias": (V,)}


def _build(cls, V, E, H, what):
    model = call_student(cls, V, E, H, what=what)
    if not is_instance(model, nn.Module):
        raise GradingFailure(f"{what}: RNNLM must be an nn.Module, got {type_name(model)}")
    params = dict(model.named_parameters())
    expected = _parameter_shapes(V, E, H)
    shapes = {name: tuple(params[name].shape) if name in params else None for name in expected}
    if shapes != expected:
        wrong = {k: v for k, v in shapes.items() if v != expected[k]}
        raise GradingFailure(
            f"{what}: parameters {wrong} (None: missing), expected {[(k, expected[k]) for k in wrong]}. "
            f"RNNLM needs embedding (nn.Embedding(V, E)), weight_ih (H, E), weight_hh (H, H), bias_ih (H,), "
            f"bias_hh (H,) and output (nn.Linear(H, V)); your parameters: "
            f"{ {k: tuple(p.shape) for k, p in params.items()} }")
    return model


def _random_state(V, E, H, seed, *, zero_bias=False, zero_hh=False) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {
        "embedding.weight": torch.randn(V, E, generator=g),
        "weight_ih": torch.randn(H, E, generator=g) / math.sqrt(E),
        "weight_hh": torch.randn(H, H, generator=g) * (1.2 / math.sqrt(H)),
        "bias_ih": torch.randn(H, generator=g) * 0.5,
        "bias_hh": torch.randn(H, generator=g) * 0.5,
        "output.weight": torch.randn(V, H, generator=g) / math.sqrt(H),
        "output.bias": torch.randn(V, generator=g) * 0.1,
    }
    if zero_bias:
        state["bias_ih"].zero_()
        state["bias_hh"].zero_()
    if zero_hh:
        state["weight_hh"].zero_()
    return state


def _load(model, state: dict):
    return load_weights(model, state)


def _forward(model, what, idx, h0=None):
    args = (idx,) if h0 is None else (idx, h0)
    try:
        with forbid(*RECURRENT_MODULES, *RECURRENT_OPS, reason=NO_RNN):
            out = call_student(model, *args, what=what)
    except GradingFailure as err:
        if _is_device_error(err):
            raise GradingFailure(f"{err} (create every new tensor on the device of the input: "
                                 f"device=idx.device)") from None
        raise
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise GradingFailure(f"{what}: forward must return a tuple (logits, h_last) of two tensors, got "
                             f"{type(out).__name__}")
    return out


def _pytorch_rnn_logits(state: dict, E, H, reference, idx):
    """The logits of nn.RNN(batch_first=True) holding the recurrence of ``state``, with the
    reference's embedding and output layer. Without cuDNN, whose TF32 arithmetic on recent GPUs
    is off by 1e-3."""
    rnn = nn.RNN(E, H, batch_first=True).to(idx.device)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, name + "_l0").copy_(state[name])
        out, _ = rnn(reference.embedding(idx))
        return reference.output(out)


RNNLM_CASES = [  # (V, E, H, B, T)
    (27, 8, 16, 4, 7), (5, 3, 3, 1, 1), (11, 6, 9, 1, 12), (27, 16, 8, 8, 3), (3, 2, 5, 2, 20), (27, 12, 12, 3, 9),
]


def check_rnnlm_forward(ns):
    cls = student(ns, "RNNLM")

    def check(device):
        for seed, (V, E, H, B, T) in enumerate(RNNLM_CASES):
            what = (f"RNNLM({V}, {E}, {H}) with random weights (both biases non-zero), idx of shape {(B, T)}, "
                    f"h0=None, on {device}")
            manual_seed(seed, near=cls)
            model = _build(cls, V, E, H, what)
            state = _random_state(V, E, H, seed)
            _load(model, state).to(device)
            reference = _load(ref.RNNLM(V, E, H), state).to(device)
            idx = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(50 + seed)).to(device)
            logits, _ = _forward(model, what, idx)
            if tuple(logits.shape) != (B, T, V):
                raise GradingFailure(f"{what}: logits of shape {tuple(logits.shape)}, expected {(B, T, V)}")
            if logits.device != idx.device:
                raise GradingFailure(f"{what}: the logits are on {logits.device}, not on idx's device")
            pytorch = _pytorch_rnn_logits(state, E, H, reference, idx)
            with torch.no_grad():
                expected, _ = reference(idx)
            assert_close(logits, pytorch, atol=1e-5, rtol=1e-4,
                         what=f"{what}: logits vs nn.RNN(batch_first=True) with the same weights (the state after "
                              f"each step, from zeros, through the output layer; the bias is bias_ih + bias_hh)")
            assert_close(logits, expected, atol=1e-5, rtol=1e-4, what=f"{what}: logits vs the reference")

    with swapped(ns, rnn_cell=ref.rnn_cell), single_thread():
        on_each_device(check)
        _meta_forward_check(cls)


def _meta_forward_check(cls):
    """A meta tensor stands in for a GPU on machines without one: a forward pass that creates its
    initial state on the CPU fails with a device mismatch or returns CPU tensors."""
    what = "RNNLM(7, 3, 5) on the meta device (a stand-in for a GPU), idx of shape (2, 4), h0=None"
    manual_seed(0, near=cls)
    model = _build(cls, 7, 3, 5, what).to("meta")
    idx = torch.zeros(2, 4, dtype=torch.long, device="meta")
    try:
        with forbid(*RECURRENT_MODULES, *RECURRENT_OPS, reason=NO_RNN):
            out = model(idx)
    except NotImplementedError:
        raise
    except Exception as err:
        if _is_device_error(err):
            raise GradingFailure(f"{what}: your code raised {type(err).__name__}: {err} (create the initial state "
                                 f"on the device of the input: device=idx.device)") from err
        return  # inconclusive: the code needs real data
    for tensor in out if isinstance(out, tuple) else ():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            raise GradingFailure(f"{what}: returned a tensor on {tensor.device} for an input on another device: "
                                 f"create the initial state on the input's device (device=idx.device)")


HIDDEN_STATE_CASES = [  # (V, E, H, B, T)
    (27, 8, 16, 4, 6), (5, 3, 3, 1, 4), (11, 6, 9, 1, 12), (27, 16, 8, 8, 3), (7, 5, 5, 2, 5),
]


def check_rnnlm_hidden_state(ns):
    cls = student(ns, "RNNLM")

    def check(device):
        for seed, (V, E, H, B, T) in enumerate(HIDDEN_STATE_CASES):
            base = f"RNNLM({V}, {E}, {H}) with random weights and zero biases, on {device}"
            manual_seed(seed, near=cls)
            model = _build(cls, V, E, H, base)
            reference = ref.RNNLM(V, E, H)
            state = _random_state(V, E, H, 200 + seed, zero_bias=True)
            _load(model, state).to(device)
            _load(reference, state).to(device)
            g = torch.Generator().manual_seed(300 + seed)
            idx = torch.randint(V, (B, T), generator=g).to(device)
            h0 = torch.tanh(torch.randn(B, H, generator=g)).to(device)
            # One token per call, carrying the state from call to call, from a random h0.
            h, h_ref = h0, h0
            with torch.no_grad():
                for t in range(T):
                    what = (f"{base}: idx[:, {t}:{t + 1}] of a sequence of shape {(B, T)}, fed one token per call with "
                            f"h0 = the previous call's h_last" + (" (a random h0 at t = 0)" if t == 0 else ""))
                    logits, h_new = _forward(model, what, idx[:, t:t + 1], h)
                    expected_logits, h_ref = reference(idx[:, t:t + 1], h_ref)
                    if tuple(h_new.shape) != (B, H):
                        raise GradingFailure(f"{what}: h_last of shape {tuple(h_new.shape)}, expected {(B, H)}")
                    assert_close(h_new, h_ref, atol=1e-5, rtol=1e-4,
                                 what=f"{what}: h_last (the recurrence must start from h0)")
                    assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4, what=f"{what}: logits")
                    h = h_ref  # the next call starts from the right state: one mistake, one failure
            # h_last after several steps, with weight_hh = 0: each state depends on its own token only.
            zero = _random_state(V, E, H, 400 + seed, zero_bias=True, zero_hh=True)
            _load(model, zero)
            _load(reference, zero)
            what = (f"RNNLM({V}, {E}, {H}) with weight_hh = 0 and zero biases, idx of shape {(B, T)} and a random h0, "
                    f"on {device}")
            with torch.no_grad():
                _, h_last = _forward(model, what, idx, h0)
                _, expected = reference(idx, h0)
            if tuple(h_last.shape) != (B, H):
                raise GradingFailure(f"{what}: h_last of shape {tuple(h_last.shape)}, expected {(B, H)}")
            assert_close(h_last, expected, atol=1e-5, rtol=1e-4,
                         what=f"{what}: h_last, the state after the last step (tanh(embedding(idx[:, -1]) @ "
                              f"weight_ih.T) here), not the first")

    with swapped(ns, rnn_cell=ref.rnn_cell), single_thread():
        on_each_device(check)


def training_batch() -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fixed batch of the training test: (inputs, targets, vocabulary size)."""
    from llmcourse.data import char_vocab, names_splits

    train_words = names_splits()[0]
    stoi, itos = char_vocab(train_words)
    inputs, targets = ref.encode_names(train_words[:TRAINING_NAMES], stoi)
    return inputs, targets, len(itos)


def train_fixed_batch(model, inputs, targets, steps=TRAINING_STEPS, lr=TRAINING_LR) -> float:
    """The hidden test's own loop: full-batch Adam with the reference loss and clipping; returns the
    final loss on the batch (nan if it stopped being finite)."""
    # The kernel's own Adam and clipping (torch's, equal to the reference's) step the student's weights.
    optimizer = beside(model, torch.optim.Adam)(model.parameters(), lr=lr)
    clip = beside(model, torch.nn.utils.clip_grad_norm_)
    for _ in range(steps):
        logits, _ = model(inputs)
        loss = ref.sequence_nll(logits, targets)
        if not torch.isfinite(loss):
            return math.nan
        optimizer.zero_grad()
        loss.backward()
        clip(model.parameters(), 1.0)
        optimizer.step()
    with torch.no_grad():
        return float(ref.sequence_nll(model(inputs)[0], targets))


def check_rnnlm_training(ns, seed: int = 0):
    cls = student(ns, "RNNLM")
    E, H = TRAINING_SIZES
    inputs, targets, V = training_batch()
    what = (f"RNNLM({V}, {E}, {H}) built after torch.manual_seed({seed}) and trained on the first {TRAINING_NAMES} "
            f"training names ({TRAINING_STEPS} full-batch Adam steps, lr {TRAINING_LR}, gradients clipped at norm 1, "
            f"with the reference encode_names, sequence_nll and clip_grad_norm)")
    with swapped(ns, rnn_cell=ref.rnn_cell, encode_names=ref.encode_names, sequence_nll=ref.sequence_nll,
                 clip_grad_norm=ref.clip_grad_norm), single_thread():
        manual_seed(seed, near=cls)
        model = call_student(cls, V, E, H, what=what)
        if not is_instance(model, nn.Module) or not list(model.parameters()):
            raise GradingFailure(f"{what}: RNNLM must be an nn.Module with parameters")
        model.train()
        loss = call_student(train_fixed_batch, model, inputs, targets, what=what)
    if not loss <= LOSS_BAR:
        raise GradingFailure(
            f"{what}: the loss on the batch ended at {loss:.3f}, above the bar of {LOSS_BAR}. The reference "
            f"ends near 0.48 (it learns the batch by heart); a model that does not carry its hidden state from "
            f"one step to the next sees only the current character and cannot get below about 1.87. Check "
            f"that forward passes each step's state to the next step, and the initialization")


# --- part 3: encode_names and sequence_nll ----------------------------------------------------------

def _vocabularies():
    """(label, stoi): the course's vocabulary, and shuffled ones (with "." = 0)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabularies = [("the course vocabulary (char_vocab)", {".": 0, **{c: i + 1 for i, c in enumerate(letters)}})]
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(26, generator=g).tolist()
        vocabularies.append((f"a shuffled vocabulary #{seed}", {".": 0, **{letters[k]: i + 1 for i, k in enumerate(order)}}))
    return vocabularies


def _word_batches():
    from llmcourse.data import names_splits

    names = names_splits()[1]  # dev names
    g = torch.Generator().manual_seed(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    random_words = ["".join(letters[i] for i in torch.randint(26, (int(n),), generator=g).tolist())
                    for n in torch.randint(1, 13, (40,), generator=g)]
    return [["emma"], ["a"], ["ab", "c"], ["c", "ab"], ["bob", "bob"], ["x", "y", "z"], ["zzzzzzzzzzzz", "q"],
            names[:5], names[100:164], random_words[:17], random_words[17:]]


def check_encode_names(ns):
    fn = student(ns, "encode_names")
    for label, stoi in _vocabularies():
        for words in _word_batches():
            shown = words if len(words) <= 6 else f"{words[:4]}... ({len(words)} words)"
            what = f"encode_names({shown}, stoi) with {label}"
            result = call_student(fn, list(words), dict(stoi), what=what)
            if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
                raise GradingFailure(f"{what}: must return a tuple (inputs, targets) of two tensors, got "
                                     f"{type(result).__name__}")
            inputs, targets = result
            expected_inputs, expected_targets = ref.encode_names(words, stoi)
            for name, got, expected in (("inputs", inputs, expected_inputs), ("targets", targets, expected_targets)):
                if got.dtype != torch.long:
                    raise GradingFailure(f"{what}: {name} has dtype {got.dtype}, expected torch.int64")
                if tuple(got.shape) != tuple(expected.shape):
                    raise GradingFailure(f"{what}: {name} of shape {tuple(got.shape)}, expected "
                                         f"{tuple(expected.shape)} (batch, longest word + 1)")
                for row, word in enumerate(words):
                    if not torch.equal(got[row].cpu(), expected[row]):
                        hint = ("'.' (0) then the word's ids, padded with 0" if name == "inputs" else
                                "the word's ids then '.' (0): targets[t] is the character after inputs[t]; "
                                "padded with -100")
                        raise GradingFailure(f"{what}: {name} of {word!r} (row {row}) is {got[row].tolist()}, expected "
                                             f"{expected[row].tolist()} ({hint})")


NLL_CASES = [  # (shape of logits, dtype, scale, ignore_index)
    ((1, 1, 2), torch.float32, 1.0, -100), ((4, 7, 27), torch.float32, 3.0, -100), ((2, 5, 11), torch.float64, 1.0, -100),
    ((8, 1, 27), torch.float32, 2.0, -100), ((3, 9, 5), torch.float64, 10.0, -100), ((13, 27), torch.float32, 2.0, -100),
    ((1, 3), torch.float64, 1.0, -100), ((6, 12, 27), torch.float32, 1.0, -1), ((5, 4, 8), torch.float64, 0.1, -100),
    ((32, 16, 27), torch.float32, 4.0, -100),
]


def _nll_inputs(shape, dtype, scale, ignore_index, seed, device):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=dtype) * scale
    V = shape[-1]
    targets = torch.randint(V, shape[:-1], generator=g)
    if len(shape) == 3:  # padding at the end of rows, as encode_names makes it; one row all padding
        B, T = shape[:2]
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        if B > 2:
            lengths[-1] = 0
        targets[torch.arange(T)[None, :] >= lengths[:, None]] = ignore_index
    elif shape[0] > 2:  # (N, V): a few positions ignored anywhere
        targets[torch.rand(shape[0], generator=g) < 0.3] = ignore_index
        targets[0] = 0
    return logits.to(device), targets.to(device)


def _compare_nll(fn, logits, targets, ignore_index, what, atol, rtol, gradient=True):
    mine = logits.detach().clone().requires_grad_(True)
    args = (mine, targets) if ignore_index == -100 else (mine, targets, ignore_index)
    with forbid(nn.CrossEntropyLoss, nn.NLLLoss, *LOSS_OPS, reason=NO_LOSS):
        got = call_student(fn, *args, what=what)
    if not isinstance(got, torch.Tensor) or got.dim() != 0:
        raise GradingFailure(f"{what}: sequence_nll must return a scalar (0-d) tensor, got "
                             f"{type(got).__name__} of shape {tuple(getattr(got, 'shape', ()))}")
    theirs = logits.detach().clone().requires_grad_(True)
    V = logits.shape[-1]
    expected = F.cross_entropy(theirs.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)
    assert_close(got, expected, atol=atol, rtol=rtol,
                 what=f"{what}: the loss vs F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), "
                      f"ignore_index={ignore_index}) (the mean over the targets that are not {ignore_index})")
    if not gradient:
        return
    assert_close(got, ref.sequence_nll(logits, targets, ignore_index), atol=atol, rtol=rtol,
                 what=f"{what}: the loss vs the reference")
    if not got.requires_grad:
        raise GradingFailure(f"{what}: the loss has no gradient (don't detach, use torch operations)")
    call_student(got.backward, what=f"{what}: backward()")
    expected.backward()
    assert_gradients([("the logits", mine, theirs.grad)], what=what, atol=atol, rtol=rtol, of="the loss")


def check_sequence_nll(ns):
    fn = student(ns, "sequence_nll")

    def check(device):
        for seed, (shape, dtype, scale, ignore_index) in enumerate(NLL_CASES):
            logits, targets = _nll_inputs(shape, dtype, scale, ignore_index, seed, device)
            n_real = int((targets != ignore_index).sum())
            what = (f"sequence_nll(logits {shape} of scale {scale}, targets {tuple(targets.shape)} with {n_real} real "
                    f"targets" + ("" if ignore_index == -100 else f", ignore_index={ignore_index}") + f"), {dtype}, "
                    f"on {device}")
            tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
            _compare_nll(fn, logits, targets, ignore_index, what, **tol)

    with single_thread():
        on_each_device(check)


def _stability_cases():
    """(description, logits (1, 1, V), target): single targets, so the mean, padding and layout don't matter."""
    g = torch.Generator().manual_seed(0)
    cases = []
    three = torch.tensor([1000.0, -1000.0, 0.0])
    for target in range(3):
        cases.append((f"logits {three.tolist()}", three, target))
    high = 1000.0 + torch.randn(27, generator=g)
    cases.append(("27 logits near +1000 (1000 + noise)", high, 5))
    low = -1000.0 + torch.randn(27, generator=g)
    cases.append(("27 logits near -1000 (-1000 + noise)", low, 0))
    spread = torch.empty(1000).uniform_(-1000.0, 1000.0, generator=g)
    cases.append(("1000 logits uniform in [-1000, 1000], the target the smallest", spread, int(spread.argmin())))
    cases.append(("1000 logits uniform in [-1000, 1000], the target the largest", spread, int(spread.argmax())))
    mixed = torch.tensor([-800.0, 750.0, 760.0, -5.0])
    cases.append((f"logits {mixed.tolist()}", mixed, 1))
    return cases


def check_sequence_nll_stability(ns):
    fn = student(ns, "sequence_nll")

    def check(device):
        for label, row, target in _stability_cases():
            logits = row.reshape(1, 1, -1).to(device)
            targets = torch.tensor([[target]], device=device)
            what = f"sequence_nll of one target (id {target}) with {label}, on {device}"
            _compare_nll(fn, logits, targets, -100, what + " (subtract the maximum: log-sum-exp)", atol=1e-3,
                         rtol=1e-5, gradient=False)

    with single_thread():
        on_each_device(check)


# --- part 4: clip_grad_norm ---------------------------------------------------------------------------

CLIP_CASES = [  # (shapes of the parameters, dtype, scale of the gradients, max_norm)
    ([(3, 4), (4,), (2, 2, 2)], torch.float32, 1.0, 1.0), ([(10,)], torch.float64, 1.0, 0.5),
    ([(1,)], torch.float32, 3.0, 0.5), ([(5, 5), (5,), (1,)], torch.float64, 1.0, 0.1),
    ([(27, 16), (16, 16), (16,), (16,)], torch.float32, 100.0, 1.0), ([(2, 3), (7,)], torch.float32, 0.5, 0.2),
    ([(64, 64), (64,)], torch.float64, 10.0, 5.0),
]


def _params_with_grads(shapes, dtype, scale, seed, device, none=()):
    g = torch.Generator().manual_seed(seed)
    params = []
    for k, shape in enumerate(shapes):
        p = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        if k not in none:
            p.grad = (torch.randn(shape, generator=g, dtype=dtype) * scale).to(device)
        params.append(p)
    return params


def _clone_grads(params):
    clones = []
    for p in params:
        c = p.detach().clone().requires_grad_(True)
        c.grad = None if p.grad is None else p.grad.clone()
        clones.append(c)
    return clones


def _call_clip(fn, max_norm, what, *parameters):
    with forbid(*_clip_routines(), reason=NO_CLIP):
        return call_student(fn, *parameters, max_norm, what=what)


def check_clip_grad_norm(ns):
    fn = student(ns, "clip_grad_norm")

    def check(device):
        for seed, (shapes, dtype, scale, max_norm) in enumerate(CLIP_CASES):
            params = _params_with_grads(shapes, dtype, scale, seed, device)
            torch_params, ref_params = _clone_grads(params), _clone_grads(params)
            what = (f"clip_grad_norm(a list of {len(shapes)} parameters of shapes {shapes}, max_norm={max_norm}), "
                    f"{dtype} gradients of scale {scale}, on {device}")
            got = _call_clip(fn, max_norm, what, params)
            expected = torch.nn.utils.clip_grad_norm_(torch_params, max_norm)
            ref.clip_grad_norm(ref_params, max_norm)
            if not isinstance(got, torch.Tensor) or got.dim() != 0:
                raise GradingFailure(f"{what}: must return the total norm as a 0-d tensor, got {type(got).__name__} "
                                     f"{getattr(got, 'shape', got)!r:.80}")
            # rtol 1e-5 in float64 too: leaving out the 1e-6 of max_norm / (total_norm + 1e-6) is accepted.
            tol = {"atol": 1e-6 if dtype == torch.float32 else 1e-9, "rtol": 1e-5}
            assert_close(got, expected, **tol, what=f"{what}: the returned total norm (before clipping) vs "
                         f"torch.nn.utils.clip_grad_norm_ (sqrt of the sum of the squares of all gradients)")
            assert_close([p.grad for p in params], [p.grad for p in torch_params], **tol,
                         what=f"{what}: the clipped gradients vs torch.nn.utils.clip_grad_norm_ (one global factor "
                              f"max_norm / (total_norm + 1e-6) for all of them)")
            assert_close([p.grad for p in params], [p.grad for p in ref_params], **tol,
                         what=f"{what}: the clipped gradients vs the reference")

    with single_thread():
        on_each_device(check)


def _unit_grads(shapes, device, nonzero, value, none=()):
    """Parameters whose gradients are zero but for one entry (param nonzero[0], flat index nonzero[1])."""
    params = []
    for k, shape in enumerate(shapes):
        p = torch.zeros(shape, device=device, requires_grad=True)
        if k not in none:
            grad = torch.zeros(shape)
            if nonzero is not None and k == nonzero[0]:
                grad.view(-1)[nonzero[1]] = value
            p.grad = grad.to(device)
        params.append(p)
    return params


EDGE_CASES = [  # (label, shapes, (param, index) of the one non-zero entry or None, its value, max_norm, None grads, generator)
    ("all gradients zero", [(3, 4), (4,)], None, 0.0, 1.0, (), False),
    ("one entry -1, below max_norm=2", [(3,), (2, 2)], (1, 2), -1.0, 2.0, (), False),
    ("one entry 1, below max_norm=1.5", [(5,)], (0, 4), 1.0, 1.5, (), False),
    ("one entry -1 clipped to max_norm=0.25, one parameter without a gradient", [(2, 3), (4,)], (0, 1), -1.0, 0.25,
     (1,), False),
    ("half of the parameters without a gradient, one entry 1 clipped to max_norm=0.5", [(2,), (3,), (4,), (5,)],
     (2, 3), 1.0, 0.5, (0, 3), False),
    ("parameters without a gradient, below max_norm=1", [(2,), (3,)], (1, 0), 1.0, 3.0, (0,), False),
    ("model.parameters() of a generator, one entry -1 clipped to max_norm=0.5", [(4, 3), (4,), (2, 4)], (2, 5), -1.0,
     0.5, (), True),
    ("a generator, below max_norm=2", [(3,), (3,)], (0, 0), 1.0, 2.0, (), True),
    ("a generator with a parameter without a gradient, one entry 1 clipped to max_norm=0.1", [(2, 2), (3,), (1,)],
     (0, 3), 1.0, 0.1, (1,), True),
]


def check_clip_grad_norm_edge_cases(ns):
    fn = student(ns, "clip_grad_norm")

    def check(device):
        for label, shapes, nonzero, value, max_norm, none, as_generator in EDGE_CASES:
            params = _unit_grads(shapes, device, nonzero, value, none)
            expected_params = _clone_grads(params)
            expected_norm = torch.nn.utils.clip_grad_norm_([p for p in expected_params if p.grad is not None], max_norm)
            what = f"clip_grad_norm with {label} (shapes {shapes}), on {device}"
            if as_generator:
                got = _call_clip(beside(fn, call_on_a_generator), max_norm, what, fn, params)
            else:
                got = _call_clip(fn, max_norm, what, list(params))
            try:
                norm = float(got)
            except (TypeError, ValueError, RuntimeError):
                raise GradingFailure(f"{what}: must return the total norm (a 0-d tensor), got {type(got).__name__}") \
                    from None
            if float(expected_norm) <= max_norm:  # (a norm returned after clipping is graded by check_clip_grad_norm)
                assert_close(norm, float(expected_norm), atol=1e-6, what=f"{what}: the returned total norm")
            for k, (p, e) in enumerate(zip(params, expected_params, strict=True)):
                if e.grad is None:
                    if p.grad is not None:
                        raise GradingFailure(f"{what}: parameter {k} had no gradient and must keep grad None, got "
                                             f"a gradient of shape {tuple(p.grad.shape)}")
                    continue
                hint = ("below max_norm the gradients must stay as they are" if float(expected_norm) <= max_norm else
                        "all gradients are scaled by max_norm / (total_norm + 1e-6)")
                if as_generator:
                    hint += "; a generator can be read only once: make a list first"
                assert_close(p.grad, e.grad, atol=1e-6, rtol=1e-5, what=f"{what}: the gradient of parameter {k} ({hint})")

    with single_thread():
        on_each_device(check)


# --- part 5: generate ---------------------------------------------------------------------------------

GENERATE_CASES = [  # (V, E, H, start_ids, max_new_tokens, temperature, end_id, bias of the end token)
    (27, 8, 32, [0], 30, 1.0, 0, 2.0), (27, 8, 32, [0, 5, 13], 30, 0.5, 0, 2.0), (27, 8, 32, [0], 20, 2.0, 0, 1.0),
    (10, 4, 16, [3], 15, 1.0, 7, 2.5), (6, 3, 8, [0], 1, 1.0, 0, 0.0), (27, 8, 32, [0], 8, 0.8, 0, -8.0),
    (5, 2, 4, [1, 2, 3, 4], 25, 1.3, 0, 1.0), (27, 16, 24, [0], 40, 0.7, 0, 0.5),
    (27, 8, 32, [0], 20, 0.05, 0, 2.0),  # float32, logits / T of several hundred: exp() would overflow
]
FLOAT32_GENERATE_CASES = {8}  # the others run in float64, so that rounding never flips a draw


def _generate_model(V, E, H, end_id, end_bias, seed, device):
    torch.manual_seed(seed)
    model = _load(ref.RNNLM(V, E, H), _random_state(V, E, H, 500 + seed))
    with torch.no_grad():
        model.output.weight.mul_(3.0)  # peaked distributions: argmax and sampling differ, temperature matters
        model.output.bias[end_id] += end_bias
    dtype = torch.float32 if seed in FLOAT32_GENERATE_CASES else torch.float64
    return model.to(device=device, dtype=dtype)


def check_generate(ns):
    fn = student(ns, "generate")

    def check(device):
        for case, (V, E, H, start_ids, max_new, temperature, end_id, end_bias) in enumerate(GENERATE_CASES):
            model = _generate_model(V, E, H, end_id, end_bias, case, device)
            for seed in range(3):
                kwargs = {"temperature": temperature, "end_id": end_id}
                what = (f"generate(a random RNNLM({V}, {E}, {H}), start_ids={start_ids}, max_new_tokens={max_new}, "
                        f"temperature={temperature}, end_id={end_id}) with a generator seeded {seed}, on {device}")
                got = call_student(fn, model, list(start_ids), max_new, generator=_generator(device).manual_seed(seed),
                                   what=what, **kwargs)
                expected = ref.generate(model, list(start_ids), max_new, generator=_generator(device).manual_seed(seed),
                                        **kwargs)
                if not isinstance(got, list) or not all(isinstance(i, int) for i in got):
                    raise GradingFailure(f"{what}: must return a list of Python ints (use .item()), got "
                                         f"{got!r:.120}")
                if got != expected:
                    hint = ("each step draws torch.multinomial(softmax(logits[0, -1] / temperature), 1, generator); "
                            "feed start_ids once, then each new id with the state h of the previous call; return the "
                            "new ids only, stop after end_id (included) or max_new_tokens")
                    assert_equal(got, expected, what=f"{what} ({hint})")

    with single_thread():
        on_each_device(check)
