"""Unit 06 (training a GPT): the reference against PyTorch, the training outcome's margin, lazy stubs,
and the mistakes students really make, each of which must cost points exactly once. The tests every
unit gets (release stubs, notebook structure, visible tests, whole cells) come from ``unit_harness``.

Plain pytest, no Jupyter kernel: a notebook namespace is a dict of names, as the hidden tests
receive ``globals()`` from the grading kernel.

The outcome cell's part lists only ``train`` (and the given ``TrainConfig`` / ``estimate_val_loss``):
its hidden check swaps the reference parts in, so a mistake in ``get_batch``, ``AdamW``, ``lr_at`` or
the checkpoint functions cannot change it, and running its 300-iteration training for each of those
mutants would take minutes. Its visible part trains with the student's own parts and prints the
validation loss without asserting anything about it (Adam + L2 alone ends the run around 3.1);
``test_outcome_cell_tolerates_the_part_mistakes`` runs it with several part mistakes at once.
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from unit_harness import C, InNotebook, UnitUnderTest, common_tests, run_cell

from autograder.hidden import unit06_training as hidden
from autograder.references import unit06_training as ref
from llmcourse import training as course_training

UNIT = "06_training"
GRADED_NAMES = ["get_batch", "pad_batch", "AdamW", "lr_at", "save_checkpoint", "load_checkpoint", "train"]
HELPERS = ["TrainConfig", "estimate_val_loss"]  # given (not graded), in the cell of train
TRAIN = {"train", *HELPERS}
PART_NAMES = {
    "batch": {"get_batch"},
    "pad": {"pad_batch"},
    "adamw": {"AdamW"},
    "lr": {"lr_at"},
    "checkpoint": {"save_checkpoint", "load_checkpoint"},
    # the visible tests of train write the loop out with the student's own parts
    "train": TRAIN | {"get_batch", "AdamW", "lr_at", "save_checkpoint", "load_checkpoint"},
    "outcome": TRAIN,
}


def part_of(check: str) -> str:
    return {"get_batch": "batch", "pad_batch": "pad", "adamw_steps": "adamw", "adamw_against_torch": "adamw",
            "lr_at": "lr", "checkpoint": "checkpoint", "train": "train", "train_logging": "train",
            "training_outcome": "outcome"}[check.removeprefix(C)]


U = UnitUnderTest(UNIT, hidden, graded_names=GRADED_NAMES, helpers=HELPERS, part_names=PART_NAMES, part_of=part_of,
                  helper_cell_ids=("notebook-imports", "data", "outcome-config"))
# The mutants build on a fresh copy of the reference, as a student's notebook would define its own
# functions: the reference module's own objects are forbidden while the checks run.
fresh = SimpleNamespace(**U.reference_ns())

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the reference against PyTorch, and the checks' cases ----------------------------------------

def test_reference_adamw_is_torch_adamw_for_1000_steps():
    init, loss_fn = hidden._long_run_problem("an MLP", torch.float32, torch.device("cpu"), 0)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mine = hidden._long_run(lambda ps: ref.AdamW(ps, **hyper), init, loss_fn, 1000, 3e-3, torch.device("cpu"))
    theirs = hidden._long_run(lambda ps: torch.optim.AdamW(ps, **hyper), init, loss_fn, 1000, 3e-3, torch.device("cpu"))
    for a, b in zip(mine[1000], theirs[1000], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_clipping_binds_in_the_first_train_case():
    """Else a train without clipping would pass check_train."""
    name, V, sizes, seed, settings = hidden.TRAIN_CASES[0]
    data = hidden._toy_data(V, seed)
    clipped, _ = hidden._run_reference(V, sizes, seed, data, ref.TrainConfig(**settings, progress=False))
    free, _ = hidden._run_reference(V, sizes, seed, data, ref.TrainConfig(**{**settings, "grad_clip": 0.0},
                                                                          progress=False))
    assert max(abs(a - b) for a, b in zip(clipped["train_loss"], free["train_loss"], strict=True)) > 1e-3


def test_the_logging_run_has_a_constant_learning_rate_and_no_clipping():
    """So that a schedule or clipping mistake (check_train's) costs nothing in check_train_logging."""
    *_, settings = hidden.LOGGING_RUN
    cycle = settings.get("cosine_cycle_iters") or settings["max_iters"]
    assert {ref.lr_at(it, settings["max_lr"], settings["min_lr"], settings["warmup_iters"], cycle)
            for it in range(settings["max_iters"])} == {settings["max_lr"]}
    assert settings["grad_clip"] == 0.0


def test_hidden_cases_cover_the_edges():
    assert any(N == T + 1 for N, _, T, *_ in hidden.GET_BATCH_CASES)  # one window
    assert any(N == T + 2 and B >= 32 for N, B, T, *_ in hidden.GET_BATCH_CASES)  # the last window comes up
    assert any(T == 1 for _, _, T, *_ in hidden.GET_BATCH_CASES)
    assert {kind.split()[1] for *_, kind, _ in hidden.GET_BATCH_CASES} == {"tensor", "array"}
    assert any([] in seqs for seqs, *_ in hidden.PAD_CASES) and any(m == 1 for _, m, _ in hidden.PAD_CASES)
    assert any(len(case["groups"]) > 1 for case in hidden.ADAMW_CASES)
    assert any(case.get("no_grad") for case in hidden.ADAMW_CASES) and any(case.get("closure") for case in hidden.ADAMW_CASES)
    assert {case["dtype"] for case in hidden.ADAMW_CASES} == {torch.float32, torch.float64}
    assert any(steps >= 1000 and tol <= 1e-4 for _, _, steps, _, tol in hidden.LONG_RUNS)
    assert any(w == 0 for *_, w, _ in hidden.SCHEDULES) and any(c == w + 1 for *_, w, c in hidden.SCHEDULES)
    assert any(s["grad_clip"] == 0 for *_, s in hidden.TRAIN_CASES) and any(s["eval_every"] == 0 for *_, s in hidden.TRAIN_CASES)


def test_reference_resume_is_exact(tmp_path):
    """A run resumed from a checkpoint reproduces the uninterrupted run's losses and weights exactly."""
    V, sizes, seed, settings = hidden.LOGGING_RUN
    data = hidden._toy_data(V, seed)
    config = ref.TrainConfig(**{**settings, "max_lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 3, "cosine_cycle_iters": 10,
                                "grad_clip": 0.5}, progress=False)
    expected, weights = hidden._run_reference(V, sizes, seed, data, config)
    config = replace(config, checkpoint=str(tmp_path / "ckpt.pt"))
    torch.manual_seed(seed)
    first = ref.train(ref.GPT(V, *sizes), data, replace(config, max_iters=7))
    torch.manual_seed(seed + 1)  # another initialization and random state: the checkpoint restores both
    model = ref.GPT(V, *sizes)
    resumed = ref.train(model, data, replace(config, resume=True))
    assert resumed["iter"] == list(range(7, 12))
    assert first["train_loss"] + resumed["train_loss"] == expected["train_loss"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_outcome_constants_match_the_notebook():
    ns = U.notebook_helpers
    assert ns["OUTCOME_MODEL"] == hidden.OUTCOME_MODEL
    assert ns["OUTCOME_CONFIG"] == hidden.OUTCOME_CONFIG
    assert ns["VAL_LOSS_BAR"] == hidden.VAL_LOSS_BAR
    text = "\n".join(c.source for c in U.nb.cells if c.cell_type == "markdown")
    assert f"at most\n{hidden.VAL_LOSS_BAR}" in text or f"at most {hidden.VAL_LOSS_BAR}" in text


def test_reference_outcome_has_a_margin():
    """The reference's validation loss on the graded run, well under the bar. Measured on the course's
    2-core machine over seeds 0-4: 2.424, 2.412, 2.429, 2.386, 2.418 (the graded run uses seed 0)."""
    val, _ = hidden.outcome_val_loss(U.reference_ns(), torch.device("cpu"))
    print(f"\nreference validation loss {val:.4f}, bar {hidden.VAL_LOSS_BAR}")
    assert val <= hidden.VAL_LOSS_BAR - 0.08


def test_release_stubs_parse_and_raise():
    ns = U.release_ns()
    p = torch.zeros(2, requires_grad=True)
    calls = [lambda: ns["get_batch"](torch.arange(10), 2, 3, "cpu"), lambda: ns["pad_batch"]([[1]], 2, 0),
             lambda: ns["AdamW"]([p]), lambda: ns["lr_at"](0, 1.0, 0.1, 1, 2),
             lambda: ns["save_checkpoint"](None, None, 0, "x"), lambda: ns["load_checkpoint"]("x", None, None),
             lambda: ns["train"](None, {}, ns["TrainConfig"]())]
    for call in calls:
        with pytest.raises(NotImplementedError):
            call()
    assert ns["estimate_val_loss"].__doc__ and ns["TrainConfig"]().max_iters == 2000  # given in full


def test_forbidden_adam_functions_can_be_swapped():
    """forbid() swaps the code of plain functions: the decorated torch.optim.adam.adam is unwrapped."""
    names = {fn.__qualname__ for fn in hidden.ADAM_FUNCTIONS}
    assert {"adamw", "adam", "_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"} <= names
    assert all(fn.__closure__ is None for fn in hidden.ADAM_FUNCTIONS)
    assert course_training.fit.__closure__ is None and course_training.random_chunks.__closure__ is None


# --- lazy stubs ---------------------------------------------------------------------------------

class LazyAdamW(fresh.AdamW):
    """Plain SGD under AdamW's name."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def lazy_load(src, model, optimizer):
    checkpoint = torch.load(src, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    return checkpoint["iteration"]


def lazy_train(model, data, config):
    n = config.max_iters
    return {"iter": list(range(n)), "train_loss": [math.log(10)] * n, "lr": [config.max_lr] * n,
            "eval_iter": [n], "val_loss": [math.log(10)]}


def lazy_ns() -> dict:
    return {
        "get_batch": lambda data, batch_size, context_length, device, generator=None: (
            torch.zeros(batch_size, context_length, dtype=torch.long, device=device),
            torch.ones(batch_size, context_length, dtype=torch.long, device=device)),
        "pad_batch": lambda seqs, max_len, pad_id: (torch.full((len(seqs), max_len), pad_id, dtype=torch.long),
                                                    torch.ones(len(seqs), max_len, dtype=torch.bool)),
        "AdamW": LazyAdamW,
        "lr_at": lambda it, max_lr, min_lr, warmup_iters, cosine_cycle_iters: float(max_lr),
        "save_checkpoint": lambda model, optimizer, iteration, out: torch.save(
            {"model": model.state_dict(), "iteration": iteration}, out),
        "load_checkpoint": lazy_load,
        "train": lazy_train,
    }


# --- mutants: mistakes students really make -----------------------------------------------------

def make_get_batch(mode):
    def get_batch(data, batch_size, context_length, device, generator=None):
        data = torch.as_tensor(data)
        N, T = len(data), context_length
        if mode == "via_random_chunks":
            x, y = course_training.random_chunks(data.long(), T, batch_size, generator)
            return x.to(device), y.to(device)
        if mode == "python_random":
            starts = torch.tensor([random.randrange(N - T) for _ in range(batch_size)])
        else:
            starts = torch.randint(N - T - 1 if mode == "never_last_window" else N - T, (batch_size,),
                                   generator=generator)
        rows = starts[:, None] + torch.arange(T)
        x, y = data[rows], data[rows if mode == "y_not_shifted" else rows + 1]
        if mode != "keeps_the_stream_dtype":
            x, y = x.long(), y.long()
        return (x, y) if mode == "ignores_device" else (x.to(device), y.to(device))

    return get_batch


def make_pad_batch(mode):
    def pad_batch(seqs, max_len, pad_id):
        if mode in ("via_pad_sequences", "via_torch_pad_sequence"):
            kept = [list(s)[:max_len] for s in seqs]
            if mode == "via_pad_sequences":
                ids = course_training.pad_sequences(kept + [[pad_id] * max_len], pad=pad_id)[:-1]
            else:
                ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s + [pad_id] * (max_len - len(s)), dtype=torch.long)
                                                       for s in kept], batch_first=True, padding_value=pad_id)
            mask = torch.arange(max_len)[None, :] < torch.tensor([len(s) for s in kept])[:, None]
            return ids, mask
        ids = torch.full((len(seqs), max_len), pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_len, dtype=torch.bool)
        for row, seq in enumerate(seqs):
            seq = list(seq)
            kept = seq if mode == "no_truncation" else seq[-max_len:] if mode == "keeps_the_last_tokens" else seq[:max_len]
            if not kept:
                continue
            if mode == "left_padding":
                ids[row, max_len - len(kept):] = torch.tensor(kept)
                mask[row, max_len - len(kept):] = True
            else:
                ids[row, :len(kept)] = torch.tensor(kept)
                mask[row, :len(kept)] = True
        if mode == "inverted_mask":
            mask = ~mask
        return ids, mask.long() if mode == "mask_as_long" else mask

    return pad_batch


def make_adamw(mode):
    if mode == "subclasses_torch":
        return type("AdamW", (torch.optim.AdamW,), {})
    if mode == "wrong_defaults":
        class WrongDefaults(fresh.AdamW):  # torch.optim.Adam's weight decay (0) and nanoGPT's betas
            def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0):
                super().__init__(params, lr, betas, eps, weight_decay)

        return WrongDefaults

    class Mutant(fresh.AdamW):
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
            super().__init__(params, lr, betas, eps, weight_decay)
            self.calls = 0

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.calls += 1
            for group in self.param_groups:
                hyper = self.defaults if mode == "ignores_group_hyperparameters" else group
                lr, (beta1, beta2), eps, wd = hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"]
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    state = self.state[p]
                    if not state or mode == "no_state":
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                if mode in ("via_functional", "via_fused_op"):
                    states = [self.state[p] for p in params]
                    if mode == "via_functional":
                        steps = [torch.tensor(float(s["step"] - 1)) for s in states]
                        torch.optim._functional.adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                                      [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                                                      beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps,
                                                      maximize=False)
                    else:
                        steps = [torch.tensor(float(s["step"]), device=p.device) for s, p in zip(states, params, strict=True)]
                        torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                            [s["exp_avg_sq"] for s in states], [], steps, lr=lr, beta1=beta1,
                                            beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
                    continue
                for p in params:
                    state = self.state[p]
                    t = self.calls if mode == "shared_step_count" else state["step"]
                    m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                    if mode == "l2_weight_decay":
                        g = g + wd * p
                    elif mode != "decay_after_update":
                        p.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    if mode == "no_bias_correction":
                        p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)
                    elif mode == "eps_inside_sqrt":
                        p.addcdiv_(m / (1 - beta1 ** t), (v / (1 - beta2 ** t) + eps).sqrt(), value=-lr)
                    elif mode == "reordered_but_equivalent":
                        p.sub_(lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps))
                    else:
                        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                    if mode == "decay_after_update":
                        p.mul_(1 - lr * wd)
            return loss

    Mutant.__name__ = f"AdamW_{mode}"
    return Mutant


def make_lr_at(mode):
    def lr_at(it, max_lr, min_lr, warmup_iters, cosine_cycle_iters):
        if it < warmup_iters:
            return (it + 1 if mode == "warmup_off_by_one" else it) / warmup_iters * max_lr
        if it <= cosine_cycle_iters or mode == "no_floor":
            span = cosine_cycle_iters if mode == "cosine_over_the_cycle" else max(cosine_cycle_iters - warmup_iters, 1)
            progress = (it - warmup_iters) / span
            if mode == "linear_decay":
                return max_lr - progress * (max_lr - min_lr)
            return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
        return min_lr

    return lr_at


def make_save_checkpoint(mode):
    def save_checkpoint(model, optimizer, iteration, out):
        checkpoint = {"model": model.state_dict(), "iteration": iteration}
        if mode != "forgets_the_optimizer":
            checkpoint["optimizer"] = optimizer.state_dict()
        if mode != "forgets_the_rng":
            checkpoint["torch_rng"] = torch.get_rng_state()
            if mode != "forgets_python_and_numpy_rng":
                checkpoint["python_rng"], checkpoint["numpy_rng"] = random.getstate(), np.random.get_state()
        torch.save(checkpoint, out)

    return save_checkpoint


def make_load_checkpoint(mode):
    def load_checkpoint(src, model, optimizer):
        checkpoint = torch.load(src, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        if "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if "torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng"])
        if "python_rng" in checkpoint:
            random.setstate(checkpoint["python_rng"])
            np.random.set_state(checkpoint["numpy_rng"])
        return checkpoint["iteration"]

    return load_checkpoint


def checkpoint_mutant(mode):
    return {"save_checkpoint": make_save_checkpoint(mode), "load_checkpoint": make_load_checkpoint(mode)}


TRAIN_SOURCE = inspect.getsource(ref.train)


def train_mutant(*replacements):
    """The reference train with ``(old, new)`` replacements, defined in the notebook's namespace."""
    source = TRAIN_SOURCE
    for old, new in replacements:
        assert old in source, f"the mutant no longer applies: {old!r}"
        source = source.replace(old, new, 1)
    return InNotebook("train", source)


SET_LR = '        for group in optimizer.param_groups:\n            group["lr"] = lr\n'
VIA_FIT = '''
def train(model, data, config):
    from llmcourse.training import fit

    cycle = config.cosine_cycle_iters if config.cosine_cycle_iters is not None else config.max_iters
    model.to(config.device).train()
    optimizer = AdamW(model.parameters(), lr=config.max_lr, betas=config.betas, weight_decay=config.weight_decay)
    history = {"iter": [], "train_loss": [], "lr": [], "eval_iter": [], "val_loss": []}

    def batch_loss(it):
        lr = lr_at(it, config.max_lr, config.min_lr, config.warmup_iters, cycle)
        for group in optimizer.param_groups:
            group["lr"] = lr
        history["iter"].append(it)
        history["lr"].append(lr)
        return model(*get_batch(data["train"], config.batch_size, config.context_length, config.device))[1]

    result = fit(model, batch_loss, config.max_iters, optimizer, max_norm=config.grad_clip, progress=False,
                 clip=torch.nn.utils.clip_grad_norm_ if config.grad_clip > 0 else None)
    history["train_loss"] = result.train
    history["eval_iter"], history["val_loss"] = [config.max_iters], [estimate_val_loss(model, data["val"], config)]
    return history
'''

GET_BATCH, PAD, STEPS, TORCH = C + "get_batch", C + "pad_batch", C + "adamw_steps", C + "adamw_against_torch"
LR, CKPT, TRAIN_CHECK, LOGGING, OUTCOME = C + "lr_at", C + "checkpoint", C + "train", C + "train_logging", C + "training_outcome"
ALL_TRAIN = {TRAIN_CHECK, LOGGING, OUTCOME}

TRAIN_MUTANTS = {
    "train_no_clipping": ({"train": train_mutant((
        "        if config.grad_clip > 0:\n            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)\n",
        ""))}, {TRAIN_CHECK}),
    "train_no_schedule": ({"train": train_mutant((SET_LR, ""))}, {TRAIN_CHECK}),  # computed and logged, never set
    "train_lr_set_after_the_step": ({"train": train_mutant((SET_LR, ""), (
        "        optimizer.step()\n", "        optimizer.step()\n" + SET_LR))}, {TRAIN_CHECK}),
    "train_eval_at_the_wrong_iterations": ({"train": train_mutant((
        "(it + 1) % config.eval_every == 0", "it % config.eval_every == 0"))}, {TRAIN_CHECK}),
    "train_eval_with_the_global_rng": ({"train": train_mutant((
        'val = estimate_val_loss(model, data["val"], config)',
        'val = model(*get_batch(data["val"], config.batch_size, config.context_length, config.device))[1].item()'))},
        {TRAIN_CHECK, LOGGING}),
    "train_no_tensorboard": ({"train": train_mutant(("    if config.log_dir:", "    if False:"))}, {LOGGING}),
    "train_tensorboard_wrong_tags": ({"train": train_mutant(('add_scalar("train/loss"', 'add_scalar("loss/train"'),
                                                             ('add_scalar("val/loss"', 'add_scalar("loss/val"'))},
                                     {LOGGING}),
    "train_val_logged_at_it": ({"train": train_mutant(('writer.add_scalar("val/loss", val, it + 1)',
                                                        'writer.add_scalar("val/loss", val, it)'))}, {LOGGING}),
    "train_no_resume": ({"train": train_mutant((
        "        start = load_checkpoint(config.checkpoint, model, optimizer)\n", "        pass\n"))}, {LOGGING}),
    "train_checkpoint_only_at_the_end": ({"train": train_mutant((
        "(config.checkpoint_every and (it + 1) % config.checkpoint_every == 0) or last", "last"))}, {LOGGING}),
    "train_zero_grad_after_backward": ({"train": train_mutant((
        "        optimizer.zero_grad(set_to_none=True)\n        loss.backward()\n",
        "        loss.backward()\n        optimizer.zero_grad(set_to_none=True)\n"))}, ALL_TRAIN),
    "train_via_torch_adamw": ({"train": train_mutant(("optimizer = AdamW(", "optimizer = torch.optim.AdamW("))},
                              ALL_TRAIN),
    "train_via_fit": ({"train": InNotebook("train", VIA_FIT)}, ALL_TRAIN),
    # the unit's own reference, imported from autograder/references inside the grader
    "train_is_the_reference": ({"train": ref.train}, ALL_TRAIN),
}

MUTANTS = {
    **{f"get_batch_{m}": ({"get_batch": make_get_batch(m)}, {GET_BATCH}) for m in (
        "never_last_window", "y_not_shifted", "python_random", "keeps_the_stream_dtype", "ignores_device",
        "via_random_chunks")},
    "get_batch_is_the_reference": ({"get_batch": ref.get_batch}, {GET_BATCH}),
    **{f"pad_batch_{m}": ({"pad_batch": make_pad_batch(m)}, {PAD}) for m in (
        "left_padding", "inverted_mask", "no_truncation", "keeps_the_last_tokens", "mask_as_long",
        "via_pad_sequences", "via_torch_pad_sequence")},
    "pad_batch_is_the_reference": ({"pad_batch": ref.pad_batch}, {PAD}),
    **{f"adamw_{m}": ({"AdamW": make_adamw(m)}, {STEPS, TORCH}) for m in (
        "no_bias_correction", "l2_weight_decay", "decay_after_update", "eps_inside_sqrt", "no_state",
        "ignores_group_hyperparameters", "subclasses_torch", "via_functional", "via_fused_op")},
    "adamw_shared_step_count": ({"AdamW": make_adamw("shared_step_count")}, {STEPS}),  # differs when a grad is None
    "adamw_wrong_defaults": ({"AdamW": make_adamw("wrong_defaults")}, {STEPS}),
    "adamw_reordered_but_equivalent": ({"AdamW": make_adamw("reordered_but_equivalent")}, set()),  # accepted
    "adamw_is_the_reference": ({"AdamW": ref.AdamW}, {STEPS, TORCH}),
    **{f"lr_at_{m}": ({"lr_at": make_lr_at(m)}, {LR}) for m in (
        "warmup_off_by_one", "cosine_over_the_cycle", "no_floor", "linear_decay")},
    "lr_at_is_the_reference": ({"lr_at": ref.lr_at}, {LR}),
    **{f"checkpoint_{m}": (checkpoint_mutant(m), {CKPT}) for m in (
        "forgets_the_optimizer", "forgets_the_rng", "forgets_python_and_numpy_rng")},
    "checkpoint_is_the_reference": ({"save_checkpoint": ref.save_checkpoint, "load_checkpoint": ref.load_checkpoint},
                                    {CKPT}),
    **TRAIN_MUTANTS,
}
# The train mutants' hidden checks run in the whole-cell test; the hidden-only test runs those that
# must fail the outcome.
HIDDEN_ONLY = [name for name in MUTANTS if name not in TRAIN_MUTANTS or OUTCOME in MUTANTS[name][1]]
# Mistakes in what train logs, evaluates or saves, not in how it trains: their training is the
# reference's (test_these_mutants_train_like_the_reference), and the graded run logs and saves nothing,
# so their outcome cell is the reference's, which passes (test_reference_passes). It is not rerun for
# each of them (two 300-iteration runs each).
SAME_TRAINING = {"train_eval_at_the_wrong_iterations", "train_no_tensorboard", "train_tensorboard_wrong_tags",
                 "train_val_logged_at_it", "train_no_resume", "train_checkpoint_only_at_the_end"}


def cell_runner(u, check, visible, ns, mutant):
    """nbgrader's cell (visible asserts, then the hidden check), except for the outcome cell: the
    SAME_TRAINING mutants skip it, and the others run its hidden check first (a failing cell fails
    either way; the visible training run is only needed when the hidden check passes)."""
    if check != OUTCOME:
        return run_cell(u, check, visible, ns, mutant)
    if mutant in SAME_TRAINING:
        return
    u.run_check(check, ns)
    exec(compile(visible, check, "exec"), ns)


@pytest.mark.parametrize("mutant", sorted(SAME_TRAINING))
def test_these_mutants_train_like_the_reference(mutant):
    overrides, expected = MUTANTS[mutant]
    assert OUTCOME not in expected
    for name, V, sizes, seed, settings in hidden.TRAIN_CASES:
        data = hidden._toy_data(V, seed)
        config = ref.TrainConfig(**settings, progress=False)
        reference, weights = hidden._run_reference(V, sizes, seed, data, config)
        ns = U.make_ns(overrides)
        torch.manual_seed(seed)
        model = ref.GPT(V, *sizes)
        history = ns["train"](model, data, config)
        assert history["train_loss"] == reference["train_loss"], name
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), name


def test_every_listed_mistake_has_a_mutant():
    for name in ("adamw_no_bias_correction", "adamw_l2_weight_decay", "adamw_decay_after_update",
                 "lr_at_warmup_off_by_one", "lr_at_cosine_over_the_cycle", "get_batch_never_last_window",
                 "get_batch_y_not_shifted", "checkpoint_forgets_the_optimizer", "checkpoint_forgets_the_rng",
                 "pad_batch_left_padding", "pad_batch_inverted_mask", "pad_batch_no_truncation", "train_no_clipping",
                 "train_no_schedule", "train_eval_at_the_wrong_iterations", "train_no_tensorboard",
                 "get_batch_via_random_chunks", "pad_batch_via_pad_sequences", "train_via_fit", "adamw_subclasses_torch",
                 "adamw_via_functional", "adamw_via_fused_op", "train_via_torch_adamw"):
        assert name in MUTANTS


def test_outcome_cell_tolerates_the_part_mistakes():
    """The outcome cell's visible part trains with the student's own parts: mistakes graded in parts 1
    to 4 must not make it fail (several at once here, so that one 300-iteration run suffices). With
    Adam + L2 the run ends around 3.1: the cell prints it, and asserts nothing about it."""
    visible = dict(U.graded_cells)[OUTCOME]
    overrides = {"get_batch": make_get_batch("never_last_window"), "AdamW": make_adamw("l2_weight_decay"),
                 "lr_at": make_lr_at("warmup_off_by_one"), **checkpoint_mutant("forgets_the_rng")}
    exec(compile(visible, OUTCOME, "exec"), U.make_ns(U.notebook_helpers, overrides))


def test_outcome_fails_without_training():
    """The bar is far from an untrained model: the lazy train (no step at all) fails it quickly."""
    with pytest.raises(hidden.GradingFailure, match="above the bar"):
        U.run_check(OUTCOME, lazy_ns())


globals().update(common_tests(U, lazy_ns=lazy_ns, mutants=MUTANTS, cell_runner=cell_runner, hidden_seconds=30.0,
                              hidden_only_mutants=HIDDEN_ONLY))
