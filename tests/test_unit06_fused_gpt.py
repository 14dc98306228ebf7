"""Unit 06's FusedGPT: unit 05's GPT computed with PyTorch's fused kernels, which the benchmark trains
beside nanoGPT. Its claims, checked on every device the machine has (plain pytest, no notebook tools):
the same parameters and the same function as GPT (dropout included), GPT-2 through ``from_hf``, and, with
``bias=False, gelu="none"``, nanoGPT's model itself (weights copied from the vendored model.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.nanogpt_model import GPT as NanoGPT
from benchmarks.nanogpt_model import GPTConfig as NanoGPTConfig
from llmcourse.grading import reference

pytestmark = pytest.mark.usefixtures("one_thread")

U06 = reference("06_training")
SIZES = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batch(T: int = 12, B: int = 3, device="cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(SIZES["vocab_size"], (B, T), generator=generator) for _ in range(2))
    return x.to(device), y.to(device)


def twins(dropout: float = 0.0, device="cpu", dtype=torch.float64):
    """A GPT and a FusedGPT holding the same weights (LayerNorms away from (1, 0), biases nonzero)."""
    torch.manual_seed(0)
    plain = U06.GPT(**SIZES, dropout=dropout)
    with torch.no_grad():
        for p in plain.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    fused = U06.FusedGPT(**SIZES, dropout=dropout)
    fused.load_state_dict(plain.state_dict())
    return plain.to(device, dtype), fused.to(device, dtype)


def test_fused_gpt_has_gpt_parameters_and_state_dict():
    plain, fused = twins()
    assert isinstance(fused, U06.GPT)
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == [(k, v.shape) for k, v in fused.state_dict().items()]
    assert fused.lm_head.weight is fused.wte.weight


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gpt_computes_gpt_function_and_gradients(device):
    plain, fused = twins(device=device)
    x, y = batch(device=device)
    outputs = [model(x, y) for model in (plain, fused)]
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=0, atol=1e-12)
    for _, loss in outputs:
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=name)
    full = batch(T=SIZES["block_size"], device=device)[0]  # the whole block, and no targets
    torch.testing.assert_close(fused(full)[0], plain(full)[0], rtol=0, atol=1e-10)
    assert fused(full)[1] is None
    with pytest.raises(AssertionError, match="block_size"):
        fused(batch(T=SIZES["block_size"] + 1, device=device)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gpt_in_float32_stays_within_rounding(device):
    plain, fused = twins(device=device, dtype=torch.float32)
    x, _ = batch(device=device)
    torch.testing.assert_close(fused(x)[0], plain(x)[0], rtol=1e-4, atol=1e-4)


def test_fused_gpt_draws_the_same_dropout_masks():
    """Dropout in the same places and order as GPT's: one seed, one output, in training mode."""
    plain, fused = twins(dropout=0.3)
    x, y = batch()
    losses = []
    for model in (plain, fused):
        torch.manual_seed(7)
        losses.append(model.train()(x, y)[1])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-12)
    torch.manual_seed(8)
    assert (fused(x, y)[1] - losses[0]).abs() > 1e-6  # another seed, other masks: the masks are really drawn


def test_fused_gpt_from_hf_is_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval().double()
    fused = U06.FusedGPT.from_hf(hf)
    assert type(fused) is U06.FusedGPT and fused.gelu == "tanh"
    x = torch.randint(31, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], hf(x).logits, rtol=0, atol=1e-9)


def nanogpt_twin(fused):
    """nanoGPT's model.py (bias=False, in fused's dtype) holding ``fused``'s weights: c_attn stacks q, k and v (3C, C)."""
    n = SIZES
    nano = NanoGPT(NanoGPTConfig(n_layer=n["n_layer"], n_head=n["n_head"], n_embd=n["n_embd"], block_size=n["block_size"],
                                 bias=False, vocab_size=n["vocab_size"], dropout=0.0)).to(fused.wte.weight.dtype)
    ours = fused.state_dict()
    with torch.no_grad():
        nano.transformer.wte.weight.copy_(ours["wte.weight"])
        nano.transformer.wpe.weight.copy_(ours["wpe.weight"])
        nano.transformer.ln_f.weight.copy_(ours["ln_f.weight"])
        for i, h in enumerate(nano.transformer.h):
            b = f"blocks.{i}."
            h.ln_1.weight.copy_(ours[b + "ln_1.weight"])
            h.ln_2.weight.copy_(ours[b + "ln_2.weight"])
            h.attn.c_attn.weight.copy_(torch.cat([ours[b + f"attn.{p}_proj.weight"] for p in "qkv"]))
            h.attn.c_proj.weight.copy_(ours[b + "attn.out_proj.weight"])
            h.mlp.c_fc.weight.copy_(ours[b + "mlp_fc.weight"])
            h.mlp.c_proj.weight.copy_(ours[b + "mlp_proj.weight"])
    return nano


def test_fused_gpt_with_nanogpt_switches_is_nanogpt_model(capsys):
    torch.manual_seed(0)
    fused = U06.FusedGPT(**SIZES, bias=False, gelu="none").double()
    assert not any(name.endswith("bias") for name, _ in fused.named_parameters())
    with torch.no_grad():
        for p in fused.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    nano = nanogpt_twin(fused)
    capsys.readouterr()  # nanoGPT prints its parameter count
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in nano.parameters())
    x, y = batch()
    logits, loss = fused(x, y)
    nano_logits, nano_loss = nano(x, y)  # with targets nanoGPT returns every position's logits
    torch.testing.assert_close(logits, nano_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(loss, nano_loss, rtol=0, atol=1e-12)
    # and not GPT-2's function: the tanh GELU differs
    tanh = U06.FusedGPT(**SIZES, bias=False).double()
    tanh.load_state_dict(fused.state_dict())
    assert (tanh(x)[0] - logits).abs().max() > 1e-6


def test_fused_gpt_rejects_an_unknown_gelu():
    with pytest.raises(ValueError, match="gelu"):
        U06.FusedGPT(**SIZES, gelu="erf")
