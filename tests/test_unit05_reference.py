"""Unit 05's reference GPT, the model units 06-09 build on: GPT-2 exactly (checked against Hugging
Face offline), exported from the solution notebook, and never part of the installed package.

The hidden tests (test_unit05_hidden.py) grade students against it; these tests pin what later
units and the lecture rely on: ``reference("05_transformers").GPT``, its tied head, its size,
causality and loss, and that the forbidden-call guard catches it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder import notebooks
from llmcourse.grading import ForbiddenCallError, forbid, reference

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
GPT = reference("05_transformers").GPT
GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def small_hf(seed: int = 0, **overrides):
    """A small random GPT2LMHeadModel, built offline from a GPT2Config (no download)."""
    cfg = dict(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0) too, so that a swapped weight shows
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_reference_is_the_exported_solution_module():
    module = reference("05_transformers")
    assert Path(module.__file__).resolve() == notebooks.reference_path("05_transformers").resolve()
    assert {"scaled_dot_product_attention", "MultiHeadAttention", "TransformerBlock", "GPT"} <= set(vars(module))


def test_reference_outside_the_course_repository_says_where_it_lives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMCOURSE_AUTOGRADER_ROOT", raising=False)
    with pytest.raises(ModuleNotFoundError, match="course repository"):
        reference("05_transformers")


def test_no_reference_is_installed_with_the_package():
    """COURSE.md, "No leaks": nothing a unit grades is defined in the installed package, so a
    student of that unit can't import or read the answer."""
    package = Path(__import__("llmcourse").__file__).parent
    defined = {}
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined[node.name] = path.name
    for unit in notebooks.units():
        graded = {node.name for node in ast.parse(notebooks.reference_path(unit).read_text()).body
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        leaked = {name: defined[name] for name in graded & set(defined)}
        assert not leaked, f"unit {unit}'s answers are in the installed package: {leaked}"


@pytest.mark.parametrize("seed,n_layer,n_head,n_embd,T", [(0, 2, 4, 32, 16), (1, 1, 1, 8, 1), (2, 3, 2, 24, 7)])
def test_from_hf_matches_hugging_face(seed, n_layer, n_head, n_embd, T):
    hf = small_hf(seed, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT.from_hf(hf).eval()
    assert model.block_size == 16 and len(model.blocks) == n_layer and model.wte.weight.shape == (61, n_embd)
    idx = torch.randint(0, 61, (3, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, loss = model(idx)
    assert loss is None
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_from_hf_in_float64_is_exact():
    hf = small_hf(3).double()
    model = GPT.from_hf(hf)
    assert next(model.parameters()).dtype == torch.float64
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-10, rtol=1e-10)


def test_causal_changing_a_future_token_changes_no_earlier_logit():
    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16).eval()
    idx = torch.randint(0, 50, (2, 12))
    for t in (0, 5, 11):
        other = idx.clone()
        other[:, t] = (other[:, t] + 1) % 50
        with torch.no_grad():
            a, b = model(idx)[0], model(other)[0]
        torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_tied_head_and_parameter_count():
    model = GPT(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16)
    assert model.lm_head.weight is model.wte.weight
    C, L = 16, 2
    per_block = (4 * C * C + 4 * C) + (8 * C * C + 5 * C) + 4 * C  # attention, MLP, two LayerNorms
    assert sum(p.numel() for p in model.parameters()) == 50 * C + 12 * C + L * per_block + 2 * C


def test_gpt2_small_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(**GPT2_SMALL)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # nanoGPT's count (tied head)


def test_loss_is_cross_entropy_and_gradients_flow():
    torch.manual_seed(1)
    model = GPT(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8)
    idx, targets = torch.randint(0, 30, (3, 8)), torch.randint(0, 30, (3, 8))
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 30), targets.view(-1)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_too_long_input_is_refused():
    model = GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    with pytest.raises(AssertionError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_forbid_catches_the_reference_gpt_even_built_before_the_guard():
    model = GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ForbiddenCallError, match="GPT"):
        with forbid(GPT):
            model(idx)
    with pytest.raises(ForbiddenCallError, match="GPT"):
        with forbid(GPT):
            GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)

    class Sub(GPT):  # a subclass still runs GPT's __init__
        pass

    with pytest.raises(ForbiddenCallError):
        with forbid(GPT):
            Sub(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model(idx)  # restored afterwards
    assert "__init__" in GPT.__dict__ and "forward" in GPT.__dict__
    assert isinstance(GPT(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4), nn.Module)


def test_gpt2_initialization_so_that_training_starts_near_uniform():
    """Units 06-09 train this GPT: GPT-2's init (std 0.02, residual projections / sqrt(2L)) starts
    the loss near ln V, where PyTorch's default embedding init starts it at 40-70."""
    torch.manual_seed(0)
    model = GPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp_fc.weight.std().item() - 0.02) < 0.002
    for proj in (model.blocks[3].attn.out_proj.weight, model.blocks[3].mlp_proj.weight):
        assert abs(proj.std().item() - 0.02 / 8 ** 0.5) < 0.001
    assert model.blocks[0].attn.q_proj.bias.abs().max() == 0 and model.ln_f.weight.eq(1).all()
    idx, targets = torch.randint(0, 65, (4, 64)), torch.randint(0, 65, (4, 64))
    loss = model(idx, targets)[1].item()
    assert abs(loss - torch.log(torch.tensor(65.0)).item()) < 0.1
