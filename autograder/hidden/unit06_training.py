"""Hidden tests of unit 06 (training a GPT: batches, AdamW, the schedule, checkpoints, the loop).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with the reference exported from the solution
notebook, and ``AdamW`` also with ``torch.optim.AdamW``, on several seeds, shapes, dtypes and
configurations, on every device present, and raises ``GradingFailure`` with a message that says what
was expected, on which input, and how far off.

Exact comparisons are possible because the notebook fixes every random draw (its "Conventions"):
``get_batch`` makes one ``torch.randint(N - T, (B,), generator=generator)`` on the CPU, and ``train``
follows a fixed order and draws nothing else from PyTorch's global generator.

One mistake costs once: ``train`` is graded (``check_train``, ``check_train_logging``,
``check_training_outcome``) with the reference ``get_batch``, ``AdamW``, ``lr_at``,
``save_checkpoint``, ``load_checkpoint``, ``estimate_val_loss`` and ``TrainConfig`` swapped into the
notebook's namespace. ``check_train_logging`` trains with a constant learning rate and no clipping,
and compares the logged values with the run's own history, so that a schedule, clipping or
evaluation mistake (graded by ``check_train``) costs nothing there. The training outcome recomputes
the validation loss itself, on unit 05's reference GPT.

Forbidden while the student's code runs: ``torch.optim.AdamW`` / ``torch.optim.Adam``, their
functional and fused versions and the fused aten ops (in ``AdamW``, and the library optimizers and
their functions in ``train``), ``llmcourse.training.random_chunks`` (in ``get_batch``),
``llmcourse.training.pad_sequences`` and ``torch.nn.utils.rnn.pad_sequence`` (in ``pad_batch``),
``llmcourse.training.fit`` (in ``train``), the learning-rate schedulers (in ``lr_at``), and in each
check this unit's reference of the name it grades (a student could reach ``autograder/references``
only inside the grader, where the guard catches it).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.optim.adam as _torch_adam
import torch.optim.adamw as _torch_adamw
from torch.nn.utils import rnn as _rnn

from autograder.references import unit05_transformers as ref05
from autograder.references import unit06_training as ref
from llmcourse import training as course_training
from llmcourse.data import char_vocab, load_text
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    call_student,
    forbid,
    on_each_device,
    student,
    swapped,
)
from llmcourse.runtime import single_thread

F32, F64 = torch.float32, torch.float64

# The training outcome (stated in the notebook, whose cell "outcome-config" holds the same numbers;
# tests/test_unit06_hidden.py checks that they agree): unit 05's GPT with OUTCOME_MODEL, after
# torch.manual_seed(0), trained by the student's train (reference parts inside) with OUTCOME_CONFIG
# on character-level tiny Shakespeare (90/10 split); then estimate_val_loss with the same config
# must be <= VAL_LOSS_BAR.
OUTCOME_MODEL = dict(block_size=32, n_layer=1, n_head=4, n_embd=64)
OUTCOME_CONFIG = dict(batch_size=16, context_length=32, max_iters=300, max_lr=3e-3, min_lr=3e-4, warmup_iters=20,
                      weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, eval_every=100, eval_iters=20, eval_seed=0)
VAL_LOSS_BAR = 2.55


def _unwrapped(fn):
    """The function a decorator wraps: forbid() can swap the code of plain functions only."""
    while getattr(fn, "__closure__", None) and getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


def _library_adam_functions() -> tuple:
    found = []
    for module in (_torch_adamw, _torch_adam, getattr(torch.optim, "_functional", None)):
        for name in ("adamw", "adam", "_single_tensor_adamw", "_multi_tensor_adamw", "_fused_adamw",
                     "_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"):
            fn = getattr(module, name, None)
            if callable(fn) and not isinstance(fn, type):
                fn = _unwrapped(fn)
                if all(fn is not seen for seen in found):
                    found.append(fn)
    return tuple(found)


ADAM_FUNCTIONS = _library_adam_functions()
ADAM_CLASSES = (torch.optim.AdamW, torch.optim.Adam)
FUSED_ADAM_OPS = ("_fused_adamw_", "_fused_adamw", "_fused_adam_", "_fused_adam")

NO_LIBRARY_ADAM = ("Write the update with tensor operations: torch.optim.AdamW, torch.optim.Adam, their functional "
                   "and fused versions and the course's reference are not allowed here.")
NO_LIBRARY_LOOP = ("train must build and step your AdamW (the reference's while it is graded) in its own loop: "
                   "torch.optim.AdamW / Adam, llmcourse.training.fit and the course's reference train are not "
                   "allowed here.")


def _no_library_adam(*own):
    return forbid(*ADAM_CLASSES, *ADAM_FUNCTIONS, *own, *FUSED_ADAM_OPS, reason=NO_LIBRARY_ADAM)


def _no_library_adam_code(*own):
    """The classes and Python functions only: no torch-function mode, so no cost per tensor operation."""
    return forbid(*ADAM_CLASSES, *ADAM_FUNCTIONS, *own, reason=NO_LIBRARY_ADAM)


def _no_library_loop():
    return forbid(*ADAM_CLASSES, *ADAM_FUNCTIONS, course_training.fit, ref.train, reason=NO_LIBRARY_LOOP)


def _reference_parts() -> dict:
    """The parts graded elsewhere, swapped in while ``train`` is graded."""
    return dict(get_batch=ref.get_batch, AdamW=ref.AdamW, lr_at=ref.lr_at, save_checkpoint=ref.save_checkpoint,
                load_checkpoint=ref.load_checkpoint, estimate_val_loss=ref.estimate_val_loss,
                TrainConfig=ref.TrainConfig)


def _tol(dtype) -> float:
    return 1e-6 if dtype == F32 else 1e-12


# --- part 1: get_batch and pad_batch --------------------------------------------------------------

GET_BATCH_CASES = [  # (N, batch_size, context_length, the stream's type, vocabulary size)
    (100, 4, 8, "int64 tensor", 50),
    (9, 3, 8, "uint16 array", 65),  # N = T + 1: one window
    (10, 64, 8, "int64 tensor", 1000),  # N = T + 2: two windows, and the last must come up
    (50, 1, 1, "int32 tensor", 7),  # T = 1, B = 1
    (1000, 16, 32, "uint16 array", 50257),  # nanoGPT's memmap, GPT-2's vocabulary
    (37, 5, 12, "int64 array", 3),
    (200, 7, 3, "uint8 tensor", 256),
]


def _stream(N, kind, V, seed):
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    dtype = kind.split()[0]
    if kind.endswith("array"):
        return ids.numpy().astype(dtype)
    return ids.to(getattr(torch, dtype))


def _no_batch_shortcuts():
    return forbid(course_training.random_chunks, ref.get_batch,
                  reason="Index the windows yourself: llmcourse.training.random_chunks and the course's reference "
                         "are not allowed here.")


def _check_batch(got, expected, B, T, device, what):
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise GradingFailure(f"{what}: get_batch must return (x, y), got {got!r:.150}")
    for name, tensor in zip("xy", got, strict=True):
        if not isinstance(tensor, torch.Tensor):
            raise GradingFailure(f"{what}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.device.type != device.type:
            raise GradingFailure(f"{what}: {name} is on {tensor.device}, expected {device} (move the batch to `device`)")
        if tensor.dtype != torch.int64:
            raise GradingFailure(f"{what}: {name} has dtype {tensor.dtype}, expected torch.int64 (convert the windows)")
        assert_equal(tuple(tensor.shape), (B, T), what=f"{what}: {name}.shape")
    x, y = (t.cpu() for t in got)
    if torch.equal(y, x) and not torch.equal(expected[1], expected[0]):
        raise GradingFailure(f"{what}: y equals x; the targets are x shifted by one: y = data[s + 1 : s + T + 1]")
    if not torch.equal(x, expected[0]):
        row = int((x != expected[0]).any(dim=1).nonzero()[0])
        raise GradingFailure(f"{what}: x[{row}] is {x[row].tolist()[:12]}, expected {expected[0][row].tolist()[:12]} "
                             f"(the windows at starts = torch.randint(N - T, (B,), generator=generator), drawn on "
                             f"the CPU: every start 0 .. N - T - 1, the last window included)")
    if not torch.equal(y, expected[1]):
        row = int((y != expected[1]).any(dim=1).nonzero()[0])
        raise GradingFailure(f"{what}: y[{row}] is {y[row].tolist()[:12]}, expected {expected[1][row].tolist()[:12]} "
                             f"(y = data[s + 1 : s + T + 1], x shifted by one)")


def check_get_batch(ns):
    fn = student(ns, "get_batch")

    def check(device):
        for seed, (N, B, T, kind, V) in enumerate(GET_BATCH_CASES):
            stream = _stream(N, kind, V, seed)
            what = f"get_batch(a stream of N = {N} ids ({kind}), batch_size={B}, context_length={T}, {device!s}"
            # with a generator
            g_ref, g_mine = (torch.Generator().manual_seed(seed) for _ in range(2))
            expected = ref.get_batch(stream, B, T, "cpu", generator=g_ref)
            with _no_batch_shortcuts():
                got = call_student(fn, stream, B, T, device, generator=g_mine, what=f"{what}, generator)")
            _check_batch(got, expected, B, T, device, f"{what}, a generator seeded with {seed})")
            if not torch.equal(torch.randint(2**30, (4,), generator=g_mine), torch.randint(2**30, (4,), generator=g_ref)):
                raise GradingFailure(f"{what}, generator): the generator was not left as one draw of "
                                     f"torch.randint(N - T, (B,), generator=generator) leaves it")
            # with PyTorch's global generator
            torch.manual_seed(100 + seed)
            expected = ref.get_batch(stream, B, T, "cpu")
            after = torch.randint(2**30, (4,))
            torch.manual_seed(100 + seed)
            with _no_batch_shortcuts():
                got = call_student(fn, stream, B, T, str(device) if seed % 2 else device, what=f"{what}, no generator)")
            _check_batch(got, expected, B, T, device, f"{what}, the global generator seeded with {100 + seed})")
            if not torch.equal(torch.randint(2**30, (4,)), after):
                raise GradingFailure(f"{what}, no generator): PyTorch's global generator must advance exactly as one "
                                     f"torch.randint(N - T, (B,)) does (train relies on it): draw nothing else")

    with single_thread():
        on_each_device(check)
        # A meta tensor stands in for a GPU on machines without one: the batch must go to `device`.
        stream = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(0))
        try:
            with _no_batch_shortcuts():
                got = fn(stream, 2, 4, "meta", generator=torch.Generator().manual_seed(0))
        except NotImplementedError as err:
            if "meta" not in str(err).lower():
                raise
            return
        except Exception:
            return  # code that needs real values on the device: inconclusive here (the GPU run checks it)
        if isinstance(got, (tuple, list)) and got and isinstance(got[0], torch.Tensor) and got[0].device.type != "meta":
            raise GradingFailure(f"get_batch(..., device='meta') returned tensors on {got[0].device}: return x and y "
                                 f"on `device` (x.to(device)); on a GPU runtime the model expects them there")


PAD_CASES = [  # (sequences, max_len, pad_id)
    ([[5, 6, 7], [8], [1, 2, 3, 4, 5, 6]], 4, 0),
    ([[3, 1, 4, 1, 5]], 5, 0),  # one sequence of exactly max_len
    ([[9] * 7, [2] * 9, list(range(12))], 5, 99),  # all longer: truncated to their first max_len ids
    ([[1], [2, 3], []], 6, -1),  # all shorter, and an empty one
    ([[4, 4], [7]], 1, 3),  # max_len = 1
    ([(10, 11, 12), (13,)], 2, 50256),  # tuples; GPT-2's <|endoftext|> as padding
    ([[0, 0, 1], [0]], 4, 0),  # real tokens equal to pad_id: only the mask tells them apart
    ([[], []], 3, 5),  # nothing real at all
]


def _random_pad_case(seed):
    g = random.Random(seed)
    seqs = [[g.randrange(1000) for _ in range(g.randrange(0, 15))] for _ in range(g.randrange(1, 8))]
    return seqs, g.randrange(1, 12), g.randrange(-2, 1000)


def check_pad_batch(ns):
    fn = student(ns, "pad_batch")
    cases = PAD_CASES + [_random_pad_case(seed) for seed in range(6)]
    for seqs, max_len, pad_id in cases:
        what = f"pad_batch({seqs!r:.120}, max_len={max_len}, pad_id={pad_id})"
        expected_ids, expected_mask = ref.pad_batch(seqs, max_len, pad_id)
        with forbid(course_training.pad_sequences, _rnn.pad_sequence, ref.pad_batch,
                    reason="Pad with tensor operations or a loop: llmcourse.training.pad_sequences, "
                           "torch.nn.utils.rnn.pad_sequence and the course's reference are not allowed here."):
            got = call_student(fn, [list(s) if isinstance(s, list) else s for s in seqs], max_len, pad_id, what=what)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise GradingFailure(f"{what}: pad_batch must return (ids, attention_mask), got {got!r:.150}")
        ids, mask = got
        for name, tensor, dtype in (("ids", ids, torch.int64), ("attention_mask", mask, torch.bool)):
            if not isinstance(tensor, torch.Tensor):
                raise GradingFailure(f"{what}: {name} must be a tensor, got {type(tensor).__name__}")
            assert_equal(tuple(tensor.shape), (len(seqs), max_len), what=f"{what}: {name}.shape (B, max_len)")
            if tensor.dtype != dtype:
                raise GradingFailure(f"{what}: {name} has dtype {tensor.dtype}, expected {dtype}")
        assert_equal(ids.tolist(), expected_ids.tolist(),
                     what=f"{what}: ids (the first max_len ids of each sequence, then pad_id on the right)")
        assert_equal(mask.tolist(), expected_mask.tolist(),
                     what=f"{what}: attention_mask (True on the real tokens, False on the padding)")


# --- part 2: AdamW ----------------------------------------------------------------------------------

ADAMW_CASES = [
    dict(name="the default hyperparameters", dtype=F32, shapes=[[(3, 4), (4,)]], kwargs={}, groups=[{}], steps=4),
    dict(name="two parameter groups with their own hyperparameters, the learning rates changed between steps, a "
              "parameter without a gradient at steps 1 and 4", dtype=F64, shapes=[[(5,), ()], [(2, 3)]],
         kwargs=dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
         groups=[dict(lr=0.1, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-6), dict(lr=0.05, weight_decay=0.0)],
         steps=6, no_grad={(1, 0): {0, 3}}, lr_factor=0.7),
    dict(name="tiny gradients and a large eps", dtype=F64, shapes=[[(6,)]], kwargs=dict(lr=0.01, eps=1e-3,
                                                                                       weight_decay=0.0),
         groups=[{}], steps=5, grad_scale=1e-4),
    dict(name="huge gradients, low betas", dtype=F32, shapes=[[(4, 4), (1,)]],
         kwargs=dict(lr=1e-3, betas=(0.5, 0.6), weight_decay=0.3), groups=[{}], steps=5, grad_scale=1e4),
    dict(name="a closure", dtype=F64, shapes=[[(3,), (2, 2)]], kwargs=dict(lr=0.05, weight_decay=0.2), groups=[{}],
         steps=4, closure=True),
    dict(name="large lr and weight decay (the order of decay and update shows)", dtype=F32, shapes=[[(8,)]],
         kwargs=dict(lr=0.3, betas=(0.9, 0.95), weight_decay=0.8), groups=[{}], steps=3),
]


def _check_state(mine_opt, torch_opt, mine, theirs, what, tol):
    for i, (p, q) in enumerate(zip(mine, theirs, strict=True)):
        expected = torch_opt.state[q]
        if not expected:
            continue
        state = mine_opt.state.get(p, {})
        missing = {"step", "exp_avg", "exp_avg_sq"} - set(state)
        if missing:
            raise GradingFailure(f"{what}: the state of parameter {i} has keys {sorted(state)}, missing "
                                 f"{sorted(missing)} (PyTorch's names: step, exp_avg, exp_avg_sq)")
        assert_close(float(state["step"]), float(expected["step"]), atol=0, rtol=0,
                     what=f"{what}: state['step'] of parameter {i} (the number of steps it has taken)")
        assert_close(state["exp_avg"], expected["exp_avg"], atol=tol, rtol=100 * tol,
                     what=f"{what}: state['exp_avg'] (m) of parameter {i}")
        assert_close(state["exp_avg_sq"], expected["exp_avg_sq"], atol=tol, rtol=100 * tol,
                     what=f"{what}: state['exp_avg_sq'] (v) of parameter {i}")


def check_adamw_steps(ns):
    cls = student(ns, "AdamW")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise GradingFailure("AdamW must be a class that subclasses torch.optim.Optimizer")

    def check(device):
        for seed, case in enumerate(ADAMW_CASES):
            dtype, tol = case["dtype"], _tol(case["dtype"])
            what = f"AdamW, {case['name']} ({dtype}, on {device})"
            g = torch.Generator().manual_seed(seed)
            values = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for shapes in case["shapes"]]
            mine = [[v.clone().to(device).requires_grad_(True) for v in group] for group in values]
            theirs = [[v.clone().to(device).requires_grad_(True) for v in group] for group in values]
            groups_mine = [{"params": ps, **extra} for ps, extra in zip(mine, case["groups"], strict=True)]
            groups_theirs = [{"params": ps, **extra} for ps, extra in zip(theirs, case["groups"], strict=True)]
            if len(groups_mine) == 1 and not case["groups"][0]:
                groups_mine, groups_theirs = mine[0], theirs[0]  # a plain list of tensors
            with _no_library_adam(ref.AdamW):
                opt = call_student(cls, groups_mine, **case["kwargs"], what=f"{what}: AdamW(params, **{case['kwargs']})")
            torch_opt = torch.optim.AdamW(groups_theirs, **case["kwargs"])
            flat_mine = [p for group in mine for p in group]
            flat_theirs = [p for group in theirs for p in group]
            scale = case.get("grad_scale", 1.0)
            coefficients = [torch.randn(p.shape, generator=g, dtype=dtype).to(device) for p in flat_mine]
            for step in range(case["steps"]):
                if step and case.get("lr_factor"):
                    for opt_ in (opt, torch_opt):
                        for group in opt_.param_groups:
                            group["lr"] *= case["lr_factor"]
                if case.get("closure"):
                    def closure(params, coefficients=coefficients):
                        for p in params:
                            p.grad = None
                        loss = sum(((c * p) ** 2).sum() + p.sin().sum() for c, p in zip(coefficients, params, strict=True))
                        loss.backward()
                        return loss

                    with _no_library_adam(ref.AdamW):
                        returned = call_student(opt.step, functools.partial(closure, flat_mine),
                                                what=f"{what}: step(closure)")
                    expected_loss = torch_opt.step(functools.partial(closure, flat_theirs))
                    if not isinstance(returned, torch.Tensor):
                        raise GradingFailure(f"{what}: step(closure) must return the closure's loss, got {returned!r:.80}")
                    assert_close(returned, expected_loss, atol=tol, rtol=tol, what=f"{what}: the loss step(closure) returns")
                else:
                    for gi, group in enumerate(mine):
                        for pi, p in enumerate(group):
                            q = theirs[gi][pi]
                            if step in case.get("no_grad", {}).get((gi, pi), ()):
                                p.grad = q.grad = None
                            else:
                                grad = torch.randn(p.shape, generator=g, dtype=dtype) * scale
                                p.grad, q.grad = grad.to(device), grad.clone().to(device)
                    with _no_library_adam(ref.AdamW):
                        call_student(opt.step, what=f"{what}: step()")
                    torch_opt.step()
                for i, (p, q) in enumerate(zip(flat_mine, flat_theirs, strict=True)):
                    assert_close(p, q, atol=tol, rtol=10 * tol,
                                 what=f"{what}: parameter {i} {tuple(p.shape)} after step {step + 1}, against "
                                      f"torch.optim.AdamW")
            _check_state(opt, torch_opt, flat_mine, flat_theirs, f"{what}, after {case['steps']} steps", 10 * tol)

    with single_thread():
        on_each_device(check)


LONG_RUNS = [  # (name, dtype, steps, hyperparameters, tolerance)
    ("an MLP on a regression task", F32, 1000, dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), 1e-4),
    ("a logistic regression", F64, 400, dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3), 1e-9),
]


def _long_run_problem(name, dtype, device, seed):
    """Initial parameters and a function (params, step, generator) -> loss for one long run."""
    g = torch.Generator().manual_seed(seed)
    if name.startswith("an MLP"):
        shapes = [(16, 4), (16,), (1, 16), (1,)]
        init = [torch.randn(s, generator=g, dtype=dtype) * 0.5 for s in shapes]
        X = torch.randn(256, 4, generator=g, dtype=dtype).to(device)
        Y = (X.sum(dim=1, keepdim=True)).sin()

        def loss_fn(params, rows):
            w1, b1, w2, b2 = params
            out = torch.tanh(X[rows] @ w1.T + b1) @ w2.T + b2
            return ((out - Y[rows]) ** 2).mean()
    else:
        shapes = [(10,), ()]
        init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        X = torch.randn(256, 10, generator=g, dtype=dtype).to(device)
        Y = (X[:, :3].sum(dim=1) > 0).to(dtype)

        def loss_fn(params, rows):
            w, b = params
            return torch.nn.functional.binary_cross_entropy_with_logits(X[rows] @ w + b, Y[rows])
    return init, loss_fn


def _long_run(make_opt, init, loss_fn, steps, base_lr, device, student_code=False, what=""):
    """The parameters every 250 steps (and at the end) of a run with a warm-up + cosine schedule.

    For the student's optimizer the library Adam classes and functions are forbidden throughout, and
    the fused aten ops (a torch-function mode: slow) at the first steps and every 100th: a shortcut
    would be called at every step."""
    params = [v.clone().to(device).requires_grad_(True) for v in init]
    with _no_library_adam_code(ref.AdamW) if student_code else contextlib.nullcontext():
        opt = call_student(make_opt, params, what=f"{what}: building the optimizer") if student_code else make_opt(params)
        g = torch.Generator().manual_seed(1234)
        snapshots = {}
        for step in range(steps):
            for group in opt.param_groups:  # warm-up for 50 steps, then a cosine to 10%
                group["lr"] = base_lr * (step / 50 if step < 50 else
                                         0.1 + 0.45 * (1 + math.cos(math.pi * (step - 50) / (steps - 50))))
            rows = torch.randint(256, (32,), generator=g)
            loss = loss_fn(params, rows)
            opt.zero_grad()
            loss.backward()
            if not student_code:
                opt.step()
            elif step < 3 or step % 100 == 0:
                with forbid(*FUSED_ADAM_OPS, reason=NO_LIBRARY_ADAM):
                    call_student(opt.step, what=f"{what}: step() at step {step + 1}")
            else:
                call_student(opt.step, what=f"{what}: step() at step {step + 1}")
            if (step + 1) % 250 == 0 or step + 1 == steps:
                snapshots[step + 1] = [p.detach().clone() for p in params]
    return snapshots


@functools.lru_cache(maxsize=8)
def _torch_long_run(case: int, device: str) -> dict:
    """torch.optim.AdamW's run of LONG_RUNS[case] (deterministic: computed once per process)."""
    name, dtype, steps, hyper, _ = LONG_RUNS[case]
    init, loss_fn = _long_run_problem(name, dtype, torch.device(device), case)
    return _long_run(functools.partial(torch.optim.AdamW, **hyper), init, loss_fn, steps, hyper["lr"],
                     torch.device(device))


def check_adamw_against_torch(ns):
    cls = student(ns, "AdamW")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise GradingFailure("AdamW must be a class that subclasses torch.optim.Optimizer")

    def check(device):
        for seed, (name, dtype, steps, hyper, tol) in enumerate(LONG_RUNS):
            what = f"AdamW({', '.join(f'{k}={v}' for k, v in hyper.items())}), {steps} steps on {name} with a " \
                   f"learning-rate schedule ({dtype}, on {device})"
            init, loss_fn = _long_run_problem(name, dtype, device, seed)
            expected = _torch_long_run(seed, str(device))
            got = _long_run(functools.partial(cls, **hyper), init, loss_fn, steps, hyper["lr"], device,
                            student_code=True, what=what)
            for step in sorted(expected):
                for i, (p, q) in enumerate(zip(got[step], expected[step], strict=True)):
                    assert_close(p, q, atol=tol, rtol=tol,
                                 what=f"{what}: parameter {i} {tuple(p.shape)} after {step} steps, against "
                                      f"torch.optim.AdamW")

    with single_thread():
        on_each_device(check)


# --- part 3: lr_at ----------------------------------------------------------------------------------

SCHEDULES = [  # (max_lr, min_lr, warmup_iters, cosine_cycle_iters)
    (1e-3, 1e-4, 100, 1000),
    (6e-4, 6e-5, 10, 50),
    (1.0, 0.0, 0, 20),  # no warm-up, a floor of 0
    (3e-3, 3e-3, 5, 30),  # min_lr = max_lr: constant after the warm-up
    (0.5, 0.1, 1, 40),  # one warm-up iteration
    (2e-3, 2e-4, 7, 8),  # a cycle one longer than the warm-up
]
SCHEDULERS = tuple(getattr(torch.optim.lr_scheduler, name) for name in (
    "LambdaLR", "CosineAnnealingLR", "LinearLR", "SequentialLR", "OneCycleLR", "CosineAnnealingWarmRestarts")
    if hasattr(torch.optim.lr_scheduler, name))


def check_lr_at(ns):
    fn = student(ns, "lr_at")
    for max_lr, min_lr, warmup, cycle in SCHEDULES:
        for it in [*range(0, cycle + 25), 3 * cycle + 7]:
            what = f"lr_at({it}, max_lr={max_lr}, min_lr={min_lr}, warmup_iters={warmup}, cosine_cycle_iters={cycle})"
            with forbid(ref.lr_at, *SCHEDULERS, reason="Compute the schedule with math: the library schedulers and "
                                                       "the course's reference are not allowed here."):
                got = call_student(fn, it, max_lr, min_lr, warmup, cycle, what=what)
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                raise GradingFailure(f"{what}: expected a Python float, got {type(got).__name__} {got!r:.60}")
            phase = ("the warm-up: it / warmup_iters * max_lr" if it < warmup else
                     "the cosine from max_lr at it = warmup_iters to min_lr at it = cosine_cycle_iters"
                     if it <= cycle else "after the cycle: min_lr")
            assert_close(got, ref.lr_at(it, max_lr, min_lr, warmup, cycle), atol=1e-12, rtol=1e-9,
                         what=f"{what} ({phase})")


# --- part 4: checkpoints ----------------------------------------------------------------------------

CKPT_CASES = [  # (destination, optimizer, dropout)
    ("a path (str)", "AdamW", 0.1),
    ("a file object (io.BytesIO)", "SGD with momentum", 0.0),
    ("a path (pathlib.Path)", "AdamW with two parameter groups", 0.2),
]


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ckpt_optimizer(kind, model):
    if kind == "SGD with momentum":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "AdamW":
        return ref.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return ref.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0, "lr": 5e-3}],
                     lr=1e-2, betas=(0.9, 0.95))


def _ckpt_steps(model, optimizer, steps, stream, device):
    """Steps whose batches come from PyTorch's global generator, whose dropout masks from the device's,
    and whose loss is scaled by draws from Python's and NumPy's generators."""
    losses = []
    for _ in range(steps):
        x, y = ref.get_batch(stream, 4, 8, device)
        scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        loss = model(x, y)[1] * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def check_checkpoint(ns):
    save, load = student(ns, "save_checkpoint"), student(ns, "load_checkpoint")

    def guard():
        return forbid(ref.save_checkpoint, ref.load_checkpoint, reason="The course's reference is not allowed here.")

    def check(device):
        for seed, (where, kind, dropout) in enumerate(CKPT_CASES):
            what = (f"a run of unit 05's GPT (dropout {dropout}) with {kind}, saved to {where} after 3 steps, "
                    f"then resumed by a fresh model and optimizer, on {device}")
            stream = torch.randint(0, 11, (300,), generator=torch.Generator().manual_seed(seed))
            _seed_all(seed)
            model = ref05.GPT(11, 8, 1, 2, 8, dropout=dropout).to(device)
            optimizer = _ckpt_optimizer(kind, model)
            _ckpt_steps(model, optimizer, 3, stream, device)
            if where.startswith("a file"):
                out = io.BytesIO()
            else:
                out = Path(folder) / f"checkpoint{seed}.pt"
                out = str(out) if "str" in where else out
            with guard():
                call_student(save, model, optimizer, 3, out, what=f"{what}: save_checkpoint(model, optimizer, 3, out)")
            expected = _ckpt_steps(model, optimizer, 4, stream, device)
            expected_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if isinstance(out, io.BytesIO):
                out.seek(0)
            elif not Path(out).is_file():
                raise GradingFailure(f"{what}: save_checkpoint wrote no file at {where}")
            _seed_all(1000 + seed)  # another start and another random state
            model = ref05.GPT(11, 8, 1, 2, 8, dropout=dropout).to(device)
            optimizer = _ckpt_optimizer(kind, model)
            torch.rand(5)
            random.random()
            with guard():
                iteration = call_student(load, out, model, optimizer, what=f"{what}: load_checkpoint(src, model, optimizer)")
            assert_equal(iteration, 3, what=f"{what}: the iteration load_checkpoint returns")
            resumed = _ckpt_steps(model, optimizer, 4, stream, device)
            hint = ("the first step differs: restore the model's weights and every generator (PyTorch's, CUDA's, "
                    "Python's random and NumPy's)" if abs(resumed[0] - expected[0]) > _tolerance(device) / 10 else
                    "the first step matches but the next ones differ: restore the optimizer's state "
                    "(optimizer.load_state_dict)")
            tol = _tolerance(device) / 10
            assert_close(resumed, expected, atol=tol, rtol=tol,
                         what=f"{what}: the losses of the 4 steps after the checkpoint, against the uninterrupted run "
                              f"({hint})")
            assert_close(dict(model.state_dict()), expected_weights, atol=tol, rtol=tol,
                         what=f"{what}: the weights after the 4 steps")

    with single_thread(), tempfile.TemporaryDirectory() as folder:
        on_each_device(check)


# --- part 5: train ----------------------------------------------------------------------------------

TRAIN_CASES = [  # (name, vocabulary, GPT(block_size, n_layer, n_head, n_embd), seed, TrainConfig settings)
    ("clipping that binds, a warm-up and a cycle shorter than the run, evaluations every 7 iterations",
     13, (8, 1, 2, 16), 0,
     dict(batch_size=4, context_length=8, max_iters=20, max_lr=1e-2, min_lr=1e-3, warmup_iters=5, cosine_cycle_iters=15,
          grad_clip=0.1, eval_every=7, eval_iters=2, weight_decay=0.1, betas=(0.9, 0.95))),
    ("no clipping, no warm-up, the cycle is max_iters, evaluations every 4 iterations", 7, (6, 2, 2, 8), 1,
     dict(batch_size=3, context_length=6, max_iters=12, max_lr=5e-3, min_lr=0.0, warmup_iters=0, cosine_cycle_iters=None,
          grad_clip=0.0, eval_every=4, eval_iters=3, eval_seed=5, weight_decay=0.0)),
    ("an evaluation only after the last iteration (eval_every=0)", 11, (8, 1, 1, 8), 2,
     dict(batch_size=2, context_length=8, max_iters=9, max_lr=2e-2, min_lr=2e-3, warmup_iters=2, cosine_cycle_iters=6,
          grad_clip=1.0, eval_every=0, eval_iters=1)),
]
HISTORY_KEYS = ("iter", "train_loss", "lr", "eval_iter", "val_loss")


def _toy_data(V, seed):
    g = torch.Generator().manual_seed(seed)
    return {"train": torch.randint(0, V, (300,), generator=g), "val": torch.randint(0, V, (100,), generator=g)}


def _history(got, what):
    if not isinstance(got, dict) or not set(HISTORY_KEYS) <= set(got):
        keys = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise GradingFailure(f"{what}: train must return the history {{'iter', 'train_loss', 'lr', 'eval_iter', "
                             f"'val_loss'}} (lists), got {keys}")
    return {key: list(got[key]) for key in HISTORY_KEYS}


def _run_reference(V, sizes, seed, data, config):
    torch.manual_seed(seed)
    model = ref05.GPT(V, *sizes)
    history = ref.train(model, data, config)
    return history, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_student(ns, fn, V, sizes, seed, data, config, what):
    torch.manual_seed(seed)
    model = ref05.GPT(V, *sizes)
    with swapped(ns, **_reference_parts()), _no_library_loop():
        got = call_student(fn, model, data, config, what=what)
    return _history(got, what), model


def _tolerance(device) -> float:
    return 1e-5 if device.type == "cpu" else 1e-4  # GPU kernels may reduce in another order


def check_train(ns):
    fn = student(ns, "train")

    def check(device):
        tol = _tolerance(device)
        for name, V, sizes, seed, settings in TRAIN_CASES:
            config = ref.TrainConfig(**settings, device=str(device), progress=False)
            what = f"train(unit 05's GPT{(V, *sizes)}, random tokens, {name}) on {device}"
            data = _toy_data(V, seed)
            expected, weights = _run_reference(V, sizes, seed, data, config)
            history, model = _run_student(ns, fn, V, sizes, seed, data, config, what)
            assert_equal(history["iter"], expected["iter"], what=f"{what}: history['iter']")
            assert_close(history["lr"], expected["lr"], atol=1e-12, rtol=1e-9,
                         what=f"{what}: history['lr'] (lr_at(it, max_lr, min_lr, warmup_iters, cosine_cycle_iters), "
                              f"a cycle of None meaning max_iters, set on every group before the step)")
            assert_close(history["train_loss"], expected["train_loss"], atol=tol, rtol=tol,
                         what=f"{what}: history['train_loss'] against the reference train (same seed; the order: lr, "
                              f"get_batch, forward, zero_grad, backward, clip_grad_norm_ if grad_clip > 0, step)")
            assert_equal(history["eval_iter"], expected["eval_iter"],
                         what=f"{what}: history['eval_iter'] (it + 1 when (it + 1) % eval_every == 0, and after the "
                              f"last iteration)")
            assert_close(history["val_loss"], expected["val_loss"], atol=tol, rtol=tol,
                         what=f"{what}: history['val_loss'] (estimate_val_loss(model, data['val'], config))")
            assert_close(dict(model.state_dict()), {k: v.to(device) for k, v in weights.items()}, atol=tol, rtol=tol,
                         what=f"{what}: the weights after training")

    with single_thread():
        on_each_device(check)


LOGGING_RUN = (13, (8, 1, 2, 16), 3,  # a constant learning rate, no clipping: only the loop's mechanics matter
               dict(batch_size=4, context_length=8, max_iters=12, max_lr=2e-3, min_lr=2e-3, warmup_iters=0,
                    grad_clip=0.0, eval_every=4, eval_iters=2, weight_decay=0.1))
TAGS = ("train/loss", "train/lr", "val/loss")


class _Interrupted(Exception):
    """A simulated crash in the middle of a run."""


def _crashing_get_batch(after: int):
    """The reference get_batch, raising at its call number ``after + 1`` on the global generator."""
    calls = 0

    def get_batch(data, batch_size, context_length, device, generator=None):
        nonlocal calls
        if generator is None:
            calls += 1
            if calls > after:
                raise _Interrupted(f"simulated crash at iteration {after}")
        return ref.get_batch(data, batch_size, context_length, device, generator)

    return get_batch


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: {tag: [(step, value), ...]}, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


def check_train_logging(ns):
    fn = student(ns, "train")
    V, sizes, seed, settings = LOGGING_RUN

    def check(device):
        tol = _tolerance(device)
        data = _toy_data(V, seed)
        config = ref.TrainConfig(**settings, device=str(device), progress=False)
        expected, weights = _run_reference(V, sizes, seed, data, config)
        with tempfile.TemporaryDirectory() as folder:
            # TensorBoard
            what = (f"train(unit 05's GPT{(V, *sizes)}, random tokens, 12 iterations at a constant learning rate, "
                    f"evaluations every 4, log_dir=...) on {device}")
            history, _ = _run_student(ns, fn, V, sizes, seed, data, replace(config, log_dir=str(Path(folder) / "runs")),
                                      what)
            assert_close(history["train_loss"], expected["train_loss"], atol=tol, rtol=tol,
                         what=f"{what}: history['train_loss'] against the reference train (the run itself must be "
                              f"right first: see the previous test)")
            scalars = read_scalars(Path(folder) / "runs")
            missing = [tag for tag in TAGS if tag not in scalars]
            if missing:
                raise GradingFailure(f"{what}: no TensorBoard scalars {missing} in log_dir (found {sorted(scalars)}): "
                                     f"SummaryWriter(config.log_dir).add_scalar(tag, value, step) for 'train/loss' and "
                                     f"'train/lr' at step it, 'val/loss' at step it + 1; close the writer at the end")
            for tag, steps, values in (("train/loss", history["iter"], history["train_loss"]),
                                       ("train/lr", history["iter"], history["lr"]),
                                       ("val/loss", history["eval_iter"], history["val_loss"])):
                assert_equal([step for step, _ in scalars[tag]], steps,
                             what=f"{what}: the steps of {tag!r} (it for train/*, it + 1 for val/loss, once each)")
                assert_close([value for _, value in scalars[tag]], values, atol=1e-6, rtol=1e-5,
                             what=f"{what}: the values of {tag!r} against the history")
            # An interrupted run, resumed from its last periodic checkpoint
            path = Path(folder) / "ckpt.pt"
            crashing = replace(config, checkpoint=str(path), checkpoint_every=4)
            what = (f"train(..., checkpoint=..., checkpoint_every=4), 12 iterations at a constant learning rate, "
                    f"interrupted at iteration 9 (an error in get_batch), then run again with resume=True, on {device}")
            torch.manual_seed(seed)
            model = ref05.GPT(V, *sizes)
            with swapped(ns, **_reference_parts()), swapped(ns, get_batch=_crashing_get_batch(9)), _no_library_loop():
                try:
                    fn(model, data, crashing)
                except _Interrupted:
                    pass
                except (NotImplementedError, GradingFailure):
                    raise
                except Exception as err:
                    raise GradingFailure(f"{what}: your code raised {type(err).__name__}: {err}") from err
                else:
                    raise GradingFailure(f"{what}: the run was not interrupted: train must draw its batches with "
                                         f"get_batch(data['train'], batch_size, context_length, device)")
            if not path.is_file():
                raise GradingFailure(f"{what}: no checkpoint after the interruption: save_checkpoint(model, optimizer, "
                                     f"it + 1, config.checkpoint) every checkpoint_every iterations (here after 4 and 8)")
            history, model = _run_student(ns, fn, V, sizes, seed + 100, data, replace(crashing, resume=True), what)
            assert_equal(history["iter"], list(range(8, 12)),
                         what=f"{what}: the iterations of the resumed run (from the checkpoint saved after 8: "
                              f"start = load_checkpoint(config.checkpoint, model, optimizer))")
            assert_close(history["train_loss"], expected["train_loss"][8:], atol=tol, rtol=tol,
                         what=f"{what}: the losses of the resumed iterations, against the uninterrupted reference run")
            assert_close(dict(model.state_dict()), {k: v.to(device) for k, v in weights.items()}, atol=tol, rtol=tol,
                         what=f"{what}: the weights at the end of the resumed run")

    with single_thread():
        on_each_device(check)


# --- part 6: the training outcome -------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def shakespeare() -> tuple[int, dict]:
    """Character-level tiny Shakespeare: (vocabulary size, {"train", "val"}), split 90/10 as the notebook."""
    text = load_text("tinyshakespeare")
    stoi, itos = char_vocab(text, first=None)
    tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * len(tokens))
    return len(itos), {"train": tokens[:n_train], "val": tokens[n_train:]}


def outcome_val_loss(ns, device) -> tuple[float, str]:
    """The student's train on the graded run (reference parts inside), then the validation loss (and
    the run's description)."""
    fn = student(ns, "train")
    V, data = shakespeare()
    config = ref.TrainConfig(**OUTCOME_CONFIG, device=str(device), progress=False)
    what = (f"train(unit 05's GPT(vocab_size={V}, {', '.join(f'{k}={v}' for k, v in OUTCOME_MODEL.items())}) after "
            f"torch.manual_seed(0), tiny Shakespeare, {OUTCOME_CONFIG['max_iters']} iterations) on {device}")
    torch.manual_seed(0)
    model = ref05.GPT(V, **OUTCOME_MODEL)
    with swapped(ns, **_reference_parts()), _no_library_loop():
        call_student(fn, model, data, config, what=what)
    return ref.estimate_val_loss(model.to(device), data["val"], config), what


def check_training_outcome(ns):
    student(ns, "train")

    def check(device):
        val, what = outcome_val_loss(ns, device)
        if not val <= VAL_LOSS_BAR:
            raise GradingFailure(f"{what}: the validation loss is {val:.3f}, above the bar of {VAL_LOSS_BAR} (the "
                                 f"reference reaches about 2.4). Check that every iteration sets the learning rate, "
                                 f"zeroes the gradients, steps the optimizer, and that the model is on config.device "
                                 f"in training mode")

    with single_thread():
        on_each_device(check)
