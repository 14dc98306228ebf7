"""The reference GPT (llmcourse.models): GPT-2 exactly, checked against Hugging Face offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcourse.grading import ForbiddenCallError, forbid
from llmcourse.models import GPT, GPTConfig, PretrainedUnavailable

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


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


@pytest.mark.parametrize("seed,n_layer,n_head,n_embd,T", [(0, 2, 4, 32, 16), (1, 1, 1, 8, 1), (2, 3, 2, 24, 7)])
def test_from_hf_matches_hugging_face(seed, n_layer, n_head, n_embd, T):
    hf = small_hf(seed, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT.from_hf(hf).eval()
    assert model.config == GPTConfig(vocab_size=61, block_size=16, n_layer=n_layer, n_head=n_head,
                                     n_embd=n_embd, dropout=0.0)
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


def test_from_hf_refuses_other_activations():
    with pytest.raises(ValueError, match="tanh"):
        GPT.from_hf(small_hf(activation_function="relu"))


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


def test_tied_head_and_parameter_counts():
    model = GPT(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16)
    assert model.lm_head.weight is model.transformer.wte.weight
    counts = model.num_parameters(by_component=True)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    C = 16
    assert counts == {"token embeddings": 50 * C, "position embeddings": 12 * C,
                      "attention": 2 * (C * 3 * C + 3 * C + C * C + C), "mlp": 2 * (C * 4 * C + 4 * C + 4 * C * C + C),
                      "layer norms": (2 * 2 + 1) * 2 * C, "total": counts["total"]}


def test_gpt2_small_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.num_parameters() == 124_439_808  # nanoGPT's count for GPT-2 small (tied head)


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
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_from_pretrained_offline_fails_fast_with_a_clear_error(tmp_path):
    code = ("import time, sys\nfrom llmcourse.models import GPT, PretrainedUnavailable\nt = time.time()\n"
            "try:\n    GPT.from_pretrained('gpt2')\nexcept PretrainedUnavailable as e:\n"
            "    print('OK', round(time.time() - t, 2), e)\n    sys.exit(0)\nsys.exit(1)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "HF_HUB_OFFLINE" in result.stdout
    assert time.perf_counter() - start < 60  # mostly importing transformers; no network wait


def test_pretrained_error_is_catchable_as_runtime_error():
    assert issubclass(PretrainedUnavailable, RuntimeError)


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
