"""Unit 05 (attention and transformers): the reference against PyTorch and Hugging Face, PyTorch's
fully-masked-row behaviour, lazy stubs, and the mistakes students really make, each of which must
cost points exactly once. The tests every unit gets (release stubs, notebook structure, visible
tests, whole cells) come from ``unit_harness``.

Plain pytest, no Jupyter kernel: a notebook namespace is a dict of names, as the hidden tests
receive ``globals()`` from the grading kernel.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from unit_harness import C, UnitUnderTest, common_tests

from autograder.hidden import unit05_transformers as hidden
from autograder.references import unit05_transformers as ref

pytest.importorskip("transformers")

UNIT = "05_transformers"
GRADED_NAMES = ["causal_mask", "scaled_dot_product_attention", "MultiHeadAttention", "sinusoidal_positions",
                "LayerNorm", "TransformerBlock", "GPT"]
ATTENTION = {"scaled_dot_product_attention", "causal_mask"}
BLOCK_PARTS = ATTENTION | {"MultiHeadAttention", "LayerNorm"}
# Which notebook names each part's cells use (visible and hidden tests). The visible tests of a
# composite compare it with a formula written with the student's own parts, and only print how it
# compares with PyTorch or HF; the hidden checks swap in the reference's parts.
PART_NAMES = {
    "mask": {"causal_mask"},
    "sdpa": ATTENTION,
    "mha": {"MultiHeadAttention"} | ATTENTION,
    "sinusoids": {"sinusoidal_positions"},
    "layernorm": {"LayerNorm"},
    "block": {"TransformerBlock"} | BLOCK_PARTS,
    "gpt": {"GPT", "TransformerBlock"} | BLOCK_PARTS,
}


def part_of(check: str) -> str:
    return {"causal_mask": "mask", "scaled_dot_product_attention": "sdpa", "multi_head_attention": "mha",
            "sinusoidal_positions": "sinusoids", "layer_norm": "layernorm", "transformer_block": "block",
            "gpt_forward": "gpt", "gpt_from_hf": "gpt"}[check.removeprefix(C)]


U = UnitUnderTest(UNIT, hidden, graded_names=GRADED_NAMES, part_names=PART_NAMES, part_of=part_of)
# The mutants build on a fresh copy of the reference, as a student's notebook would define its own
# classes: the reference module's own objects are forbidden while the checks run.
fresh = SimpleNamespace(**U.reference_ns())

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the reference against PyTorch and Hugging Face ---------------------------------------------

def test_pytorch_gives_zeros_for_a_fully_masked_row():
    """The course's convention (COURSE.md) is PyTorch 2.13's behaviour: if a later PyTorch changes
    it, this fails and the convention must be revisited."""
    q, k, v = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[0, 1] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert (q.grad[0, 1] == 0).all() and torch.isfinite(q.grad).all()
    mine = ref.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(mine, out)


@pytest.mark.parametrize("case", range(len(hidden.SDPA_CASES)))
def test_reference_sdpa_matches_pytorch_with_gradients(case):
    qs, ks, vs, ms, full, causal, dtype = hidden.SDPA_CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = (torch.randn(*s, generator=g, dtype=dtype) for s in (qs, ks, vs))
    mask = None if ms is None else hidden._mask(g, ms, full_rows=full)
    if full:
        assert not mask.any(-1).all(), "the case must have a fully masked row"
    upstream = torch.randn(torch.broadcast_shapes(qs[:-2], ks[:-2]) + (qs[-2], vs[-1]), dtype=dtype)
    expected, grads = hidden._sdpa_expected(q, k, v, mask, causal, upstream)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = ref.scaled_dot_product_attention(*leaves, mask, is_causal=causal)
    (out * upstream).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    for leaf, e in zip(leaves, grads, strict=True):
        torch.testing.assert_close(leaf.grad, e, atol=10 * tol, rtol=10 * tol)


def test_reference_mha_loads_nn_multihead_attention():
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(12, 3, batch_first=True)
    mine = ref.MultiHeadAttention(12, 3)
    hidden._load_torch_mha(mine, torch_mha)
    x = torch.randn(2, 6, 12)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(mine(x, mask), torch_mha(x, x, x, attn_mask=~mask)[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mine(x), torch_mha(x, x, x)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", range(len(hidden.HF_CASES)))
def test_reference_from_hf_matches_hugging_face(case):
    V, n_pos, Cn, L, h, B, T, dtype = hidden.HF_CASES[case]
    hf = hidden.hf_model(V, n_pos, Cn, L, h, case, dtype)
    idx = torch.randint(0, V, (B, T))
    with torch.no_grad():
        expected = hf(idx).logits
        for model in (ref.GPT.from_hf(hf),):
            torch.testing.assert_close(model(idx)[0], expected, atol=1e-5 if dtype == torch.float32 else 1e-10,
                                       rtol=0)


def test_sinusoids_rotate():
    """PE[p + k] is a fixed rotation of PE[p] (the lecture's check), on the reference."""
    pe = ref.sinusoidal_positions(64, 16).double()
    k = 5
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    rotated = torch.empty_like(pe[:-k])
    c, s = torch.cos(k * freqs), torch.sin(k * freqs)
    rotated[:, 0::2] = pe[:-k, 0::2] * c + pe[:-k, 1::2] * s
    rotated[:, 1::2] = pe[:-k, 1::2] * c - pe[:-k, 0::2] * s
    torch.testing.assert_close(rotated, pe[k:], atol=1e-5, rtol=0)


def test_hidden_cases_cover_the_edges():
    assert any(qs[-2] == 1 for qs, *_ in hidden.SDPA_CASES)
    assert any(full for *_, full, _, _ in hidden.SDPA_CASES)
    assert any(qs[-2] != ks[-2] for qs, ks, *_ in hidden.SDPA_CASES)
    assert any(T == 1 for _, T, *_ in hidden.MHA_CASES) and any(h == Cn for _, _, Cn, h, *_ in hidden.MHA_CASES)
    assert any(T == 1 for _, T, *_ in hidden.GPT_CASES) and any(T == 1 for *_, T, _ in hidden.HF_CASES)


def test_release_stubs_parse_and_raise():
    ns = U.release_ns()
    x = torch.zeros(1, 2, 4)
    calls = [lambda: ns["causal_mask"](3), lambda: ns["scaled_dot_product_attention"](x, x, x),
             lambda: ns["MultiHeadAttention"](4, 2), lambda: ns["sinusoidal_positions"](3, 4),
             lambda: ns["LayerNorm"](4), lambda: ns["TransformerBlock"](4, 2), lambda: ns["GPT"](5, 4, 1, 1, 4),
             lambda: ns["GPT"].from_hf(None)]
    for call in calls:
        with pytest.raises(NotImplementedError):
            call()


# --- lazy stubs ---------------------------------------------------------------------------------

class LazyMHA(fresh.MultiHeadAttention):
    def forward(self, x, mask=None):
        return x


class LazyLayerNorm(fresh.LayerNorm):
    def forward(self, x):
        return x


class LazyBlock(fresh.TransformerBlock):
    def forward(self, x):
        return x


class LazyGPT(fresh.GPT):
    def forward(self, idx, targets=None):
        V = self.wte.weight.shape[0]
        logits = self.lm_head.weight.new_zeros(*idx.shape, V) + 0 * self.lm_head.weight.sum()
        loss = None if targets is None else logits.sum() * 0 + math.log(V)
        return logits, loss


def lazy_ns() -> dict:
    return {
        "causal_mask": lambda T, device=None: torch.ones(T, T, dtype=torch.bool, device=device),
        "scaled_dot_product_attention": lambda q, k, v, mask=None, is_causal=False:
            (v.mean(-2, keepdim=True) + 0 * q[..., :1].sum(-2, keepdim=True)).expand(
                *torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], v.shape[-1]),
        "MultiHeadAttention": LazyMHA,
        "sinusoidal_positions": lambda T, d: torch.zeros(T, d),
        "LayerNorm": LazyLayerNorm,
        "TransformerBlock": LazyBlock,
        "GPT": LazyGPT,
    }


# --- mutants: mistakes students really make -----------------------------------------------------

def make_sdpa(mode):
    def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False):
        if mode == "via_torch":
            if is_causal and mask is not None:
                mask, is_causal = mask & causal_mask_ref(q.size(-2), q.device), False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        scores = q @ k.transpose(-2, -1)
        if mode != "no_scale":
            scores = scores / math.sqrt(q.size(-1))
        if is_causal and mode != "ignores_is_causal":
            causal = fresh.causal_mask(q.size(-2), device=None if mode == "causal_mask_on_cpu" else q.device)
            mask = causal if mask is None else mask & causal
        if mask is not None:
            drop = mask if mode == "mask_inverted" else ~mask
            scores = scores.masked_fill(drop, -1e9 if mode == "large_negative" else float("-inf"))
        weights = torch.softmax(scores, dim=-2 if mode == "softmax_over_queries" else -1)
        if mask is not None and mode not in ("nan_when_fully_masked", "large_negative"):
            weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        return weights @ v

    return scaled_dot_product_attention


def causal_mask_ref(T, device=None):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def make_causal_mask(mode):
    def causal_mask(T, device=None):
        ones = torch.ones(T, T, dtype=torch.bool, device=device)
        return {"strict": ones.tril(-1), "wide": ones.tril(1), "inverted": ones.triu(1),
                "upper": ones.triu()}[mode]

    return causal_mask


def make_mha(mode):
    class Mutant(fresh.MultiHeadAttention):
        def __init__(self, d_model, n_heads, bias=True):
            super().__init__(d_model, n_heads, bias)
            if mode == "via_torch":
                self.inner = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True)

        def forward(self, x, mask=None):
            B, T, Cn = x.shape
            h = self.n_heads
            if mode == "via_torch":
                return self.inner(x, x, x, attn_mask=None if mask is None else ~mask)[0]
            if mode == "split_without_transpose":
                q, k, v = (p(x).reshape(B, h, T, Cn // h) for p in (self.q_proj, self.k_proj, self.v_proj))
            else:
                q, k, v = (p(x).view(B, T, h, Cn // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            y = fresh.scaled_dot_product_attention(q, k, v, None if mode == "ignores_mask" else mask)
            y = y.reshape(B, T, Cn) if mode == "merge_without_transpose" else y.transpose(1, 2).reshape(B, T, Cn)
            return y if mode == "no_out_proj" else self.out_proj(y)

    Mutant.__name__ = f"MHA_{mode}"
    return Mutant


def make_sinusoids(mode):
    def sinusoidal_positions(T, d):
        pos = torch.arange(T, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(0, d, 2, dtype=torch.float64)
        angle = pos / 10000 ** ((i / 2 if mode == "exponent_i_over_d" else i) / d)
        pe = torch.zeros(T, d, dtype=torch.float64)
        first, second = (torch.cos, torch.sin) if mode == "sin_cos_swapped" else (torch.sin, torch.cos)
        if mode == "halves":
            return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()
        pe[:, 0::2], pe[:, 1::2] = first(angle), second(angle)
        return pe.float()

    return sinusoidal_positions


def make_layer_norm(mode):
    class Mutant(fresh.LayerNorm):
        def forward(self, x):
            if mode == "via_torch":
                return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
            mean = x.mean(-1, keepdim=True)
            var = x.var(-1, keepdim=True, unbiased=mode == "unbiased")
            if mode == "eps_outside_sqrt":
                return (x - mean) / (var.sqrt() + self.eps) * self.weight + self.bias
            if mode == "no_affine":
                return (x - mean) / torch.sqrt(var + self.eps)
            return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias

    Mutant.__name__ = f"LayerNorm_{mode}"
    return Mutant


def make_block(mode):
    class Mutant(fresh.TransformerBlock):
        def forward(self, x):
            T = x.size(1)
            mask = None if mode == "not_causal" else fresh.causal_mask(T, device=None if mode == "mask_on_cpu" else x.device)
            approx = "none" if mode == "exact_gelu" else "tanh"
            if mode == "post_ln":
                x = self.ln_1(x + self.attn(x, mask))
                return self.ln_2(x + self.mlp_proj(F.gelu(self.mlp_fc(x), approximate=approx)))
            x = x + self.attn(self.ln_1(x), mask)
            act = F.relu if mode == "relu" else (lambda t: F.gelu(t, approximate=approx))
            mlp = self.mlp_proj(act(self.mlp_fc(self.ln_2(x))))
            return mlp if mode == "no_residual" else x + mlp

    Mutant.__name__ = f"Block_{mode}"
    return Mutant


def make_gpt(mode):
    class Mutant(fresh.GPT):
        def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, dropout=0.0):
            super().__init__(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
            if mode == "untied_head":
                self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
                with torch.no_grad():
                    self.lm_head.weight.copy_(self.wte.weight)
            if mode == "wraps_the_reference":  # reachable only inside the grader: the guard catches it
                self.inner = ref.GPT(vocab_size, block_size, n_layer, n_head, n_embd)

        def forward(self, idx, targets=None):
            B, T = idx.shape
            x = self.wte(idx)
            if mode != "no_positions":
                x = x + self.wpe(torch.arange(T, device=idx.device))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(x if mode == "no_ln_f" else self.ln_f(x))
            loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                                 targets.reshape(-1))
            return logits, loss

        @classmethod
        def from_hf(cls, hf_model):
            model = super().from_hf(hf_model)
            sd = hf_model.state_dict()
            Cn = hf_model.config.n_embd
            with torch.no_grad():
                if mode == "untied_head":
                    model.lm_head.weight.copy_(sd["lm_head.weight"])
                for i, block in enumerate(model.blocks):
                    p = f"transformer.h.{i}."
                    if mode == "from_hf_out_proj_not_transposed":
                        block.attn.out_proj.weight.copy_(sd[p + "attn.c_proj.weight"])
                    if mode == "from_hf_qkv_split_wrong":  # rows of the (C, 3C) weight, not columns
                        w = sd[p + "attn.c_attn.weight"].reshape(3 * Cn, Cn)
                        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                            getattr(block.attn, name).weight.copy_(w[j * Cn:(j + 1) * Cn])
            return model

    Mutant.__name__ = f"GPT_{mode}"
    return Mutant


SDPA, MASK, MHA = C + "scaled_dot_product_attention", C + "causal_mask", C + "multi_head_attention"
SINE, LN, BLOCK = C + "sinusoidal_positions", C + "layer_norm", C + "transformer_block"
FWD, HF = C + "gpt_forward", C + "gpt_from_hf"

MUTANTS = {
    **{f"sdpa_{m}": ({"scaled_dot_product_attention": make_sdpa(m)}, {SDPA}) for m in (
        "no_scale", "softmax_over_queries", "mask_inverted", "nan_when_fully_masked", "large_negative",
        "ignores_is_causal", "via_torch", "causal_mask_on_cpu")},
    **{f"causal_mask_{m}": ({"causal_mask": make_causal_mask(m)}, {MASK}) for m in (
        "strict", "wide", "inverted", "upper")},
    **{f"mha_{m}": ({"MultiHeadAttention": make_mha(m)}, {MHA}) for m in (
        "split_without_transpose", "merge_without_transpose", "ignores_mask", "no_out_proj", "via_torch")},
    **{f"sinusoids_{m}": ({"sinusoidal_positions": make_sinusoids(m)}, {SINE}) for m in (
        "sin_cos_swapped", "exponent_i_over_d", "halves")},
    **{f"layer_norm_{m}": ({"LayerNorm": make_layer_norm(m)}, {LN}) for m in (
        "unbiased", "eps_outside_sqrt", "no_affine", "via_torch")},
    **{f"block_{m}": ({"TransformerBlock": make_block(m)}, {BLOCK}) for m in (
        "post_ln", "exact_gelu", "not_causal", "relu", "no_residual", "mask_on_cpu")},
    "gpt_untied_head": ({"GPT": make_gpt("untied_head")}, {FWD}),
    "gpt_no_positions": ({"GPT": make_gpt("no_positions")}, {FWD, HF}),
    "gpt_no_ln_f": ({"GPT": make_gpt("no_ln_f")}, {FWD, HF}),
    "gpt_wraps_the_reference": ({"GPT": make_gpt("wraps_the_reference")}, {FWD, HF}),
    # the unit's own reference, imported from autograder/references inside the grader
    "sdpa_is_the_reference": ({"scaled_dot_product_attention": ref.scaled_dot_product_attention}, {SDPA}),
    "mha_is_the_reference": ({"MultiHeadAttention": ref.MultiHeadAttention}, {MHA}),
    "layer_norm_is_the_reference": ({"LayerNorm": ref.LayerNorm}, {LN}),
    "block_is_the_reference": ({"TransformerBlock": ref.TransformerBlock}, {BLOCK}),
    "gpt_is_the_reference": ({"GPT": ref.GPT}, {FWD, HF}),
    "gpt_from_hf_out_proj_not_transposed": ({"GPT": make_gpt("from_hf_out_proj_not_transposed")}, {HF}),
    "gpt_from_hf_qkv_split_wrong": ({"GPT": make_gpt("from_hf_qkv_split_wrong")}, {HF}),
}
# Visible cells that must run the student's own parts fail too (documented per mutant).
CASCADES: dict[str, set[str]] = {}


def test_every_listed_mistake_has_a_mutant():
    for name in ("sdpa_no_scale", "sdpa_softmax_over_queries", "causal_mask_strict", "causal_mask_wide",
                 "sdpa_mask_inverted", "causal_mask_inverted", "mha_split_without_transpose", "layer_norm_unbiased",
                 "block_post_ln", "block_exact_gelu", "gpt_untied_head"):
        assert name in MUTANTS


def _cell_runner(u, check, visible, ns, mutant):
    exec(compile(visible, check, "exec"), ns)
    u.run_check(check, ns)


globals().update(common_tests(U, lazy_ns=lazy_ns, mutants=MUTANTS, cascades=CASCADES,
                              cell_runner=_cell_runner))
