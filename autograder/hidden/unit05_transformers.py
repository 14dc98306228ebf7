"""Hidden tests of unit 05 (attention and transformers: a GPT-2, exactly).

Each ``check_*`` function is called from one autograded cell of the notebook with the notebook's
``globals()``. It compares the student's names with PyTorch (``F.scaled_dot_product_attention``,
``nn.MultiheadAttention``, ``nn.LayerNorm``, ``F.gelu``), with Hugging Face's ``GPT2LMHeadModel``
(a small random configuration built offline) and with the reference exported from the solution
notebook, on several seeds, shapes and dtypes, on every device present, and raises
``GradingFailure`` with a message that says what was expected, on which input, and how far off.

Fully masked rows: ``F.scaled_dot_product_attention`` returns zeros for a query whose mask is all
False in PyTorch 2.13 (checked in tests/test_unit05_hidden.py), and so must the student's code.
``nn.MultiheadAttention`` returns NaN there, so the multi-head comparison uses masks with at
least one key per query.

One mistake costs once: every check swaps in the reference for the parts graded elsewhere
(``causal_mask`` inside ``scaled_dot_product_attention``; the attention inside
``MultiHeadAttention``; ``LayerNorm``, ``MultiHeadAttention``, ``scaled_dot_product_attention`` and
``causal_mask`` inside ``TransformerBlock``; all of them and ``TransformerBlock`` inside ``GPT``).
``GPT.forward`` loads the reference's weights and compares logits, loss and gradients (an untied
head shows in the gradient of ``wte.weight``); ``GPT.from_hf`` compares logits with HF's.

Forbidden while the student's code runs: ``F.scaled_dot_product_attention`` and its aten twins,
``nn.MultiheadAttention`` / ``F.multi_head_attention_forward``, ``nn.LayerNorm`` /
``F.layer_norm``, the library transformer layers, and this unit's own reference: its ``GPT`` in every
check, and in each check the reference of the name it grades (a student could reach
``autograder/references`` only inside the grader, where the guard catches it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder.references import unit05_transformers as ref
from llmcourse.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    call_student,
    forbid,
    is_instance,
    is_shared,
    load_weights,
    on_each_device,
    student,
    swapped,
)
from llmcourse.runtime import single_thread

# The checks run in the grader's process; the student's names are reached over llmcourse.wire.
RUNS_OUTSIDE_THE_KERNEL = True

F32, F64 = torch.float32, torch.float64

NO_SHORTCUTS = ("Write it from tensor operations (matmul, softmax, mean, var): F.scaled_dot_product_attention, "
                "nn.MultiheadAttention, nn.LayerNorm, the library transformer layers and the course's reference "
                "are not allowed here.")
FORBIDDEN_CLASSES = (nn.MultiheadAttention, nn.LayerNorm, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                     nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
                     ref.GPT)  # the reference parts are swapped in elsewhere: each check forbids its own
FORBIDDEN_OPS = (F.scaled_dot_product_attention, "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable", "_fused_sdp_choice",
                 F.multi_head_attention_forward, "multi_head_attention_forward", "_native_multi_head_attention",
                 F.layer_norm, "layer_norm", "native_layer_norm", "_transformer_encoder_layer_fwd")


def _no_shortcuts(*own):
    """The guard while a student's code runs; ``own``: the reference of the name being graded."""
    return forbid(*FORBIDDEN_CLASSES, *own, *FORBIDDEN_OPS, reason=NO_SHORTCUTS)


def _no_shortcut_modules(*own):
    """For building a student's module: the classes only, no torch-function mode (creating an
    nn.Parameter under one imports torch._dynamo, seconds the first time)."""
    return forbid(*FORBIDDEN_CLASSES, *own, reason=NO_SHORTCUTS)


_DEVICE_ERRORS = ("same device", "expected device", "two devices", "different device", "copy out of meta")


def _meta_device_check(call, what: str) -> None:
    """A meta tensor stands in for a GPU on machines without one: code that creates a tensor on the
    CPU inside the function (a causal mask without ``device=``) fails with a device mismatch or
    returns a CPU tensor. Inconclusive (it passes) when the code needs real data."""
    try:
        with _no_shortcuts():
            out = call()
    except Exception as err:
        text = str(err).lower()
        if any(e in text for e in _DEVICE_ERRORS):
            raise GradingFailure(f"{what}: your code raised {type(err).__name__}: {err} (create every new "
                                 f"tensor on the device of the input, e.g. torch.ones(..., device=q.device))") from err
        if isinstance(err, NotImplementedError) and "meta" not in text:
            raise  # an unfinished stub
        return
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(first, torch.Tensor) and first.device.type != "meta":
        raise GradingFailure(f"{what}: for an input on another device (here 'meta') you returned a tensor on "
                             f"{first.device}: create new tensors on the input's device (device=x.device)")


def _tol(dtype) -> float:
    return 1e-5 if dtype == F32 else 1e-10


def _randn(g, *shape, dtype=F32, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _mask(g, shape, p_keep=0.6, full_rows=0, ensure_one=False):
    """A random bool mask (True = attend); ``full_rows`` rows set all False; with ``ensure_one`` every
    row keeps at least one key."""
    mask = torch.rand(*shape, generator=g) < p_keep
    if ensure_one:
        idx = torch.randint(0, shape[-1], shape[:-1], generator=g)
        mask.scatter_(-1, idx.unsqueeze(-1), True)
    flat = mask.view(-1, shape[-1])
    for r in range(min(full_rows, flat.shape[0])):
        flat[(r * 7) % flat.shape[0]] = False
    return mask


def _module(cls, *args, what, own=()):
    with _no_shortcut_modules(*own):
        model = call_student(cls, *args, what=what)
    if not is_instance(model, nn.Module):
        raise GradingFailure(f"{what}: must be an nn.Module")
    return model


def _param_shapes(model) -> dict:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


# --- part 1: causal_mask and scaled_dot_product_attention ---------------------------------------

def check_causal_mask(ns):
    fn = student(ns, "causal_mask")

    def check(device):
        for T in (1, 2, 3, 5, 8, 16):
            what = f"causal_mask({T})" + ("" if device.type == "cpu" else f", device={device}")
            args = {} if device.type == "cpu" else {"device": device}
            got = call_student(fn, T, what=what, **args)
            if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
                raise GradingFailure(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
            if got.device.type != device.type:
                raise GradingFailure(f"{what}: returned a tensor on {got.device}, expected {device}")
            assert_equal(tuple(got.shape), (T, T), what=f"{what}.shape")
            expected = torch.ones(T, T, dtype=torch.bool).tril()
            if not torch.equal(got.cpu(), expected):
                bad = (got.cpu() != expected).nonzero()[0].tolist()
                raise GradingFailure(f"{what}: entry {tuple(bad)} is {bool(got.cpu()[tuple(bad)])}; query i attends to "
                                     f"keys j <= i (True on and below the diagonal)")

    on_each_device(check)


SDPA_CASES = [  # (q shape, k shape, v shape, mask shape or None, full rows, is_causal, dtype)
    ((1, 1, 4), (1, 1, 4), (1, 1, 3), None, 0, False, F32),  # T = 1
    ((1, 1, 4), (1, 1, 4), (1, 1, 3), None, 0, True, F32),
    ((2, 5, 8), (2, 7, 8), (2, 7, 6), (5, 7), 1, False, F32),  # T_q != T_k, a mask shared by the batch
    ((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8), None, 0, True, F32),  # heads, causal
    ((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 5), (2, 1, 6, 6), 2, False, F64),  # per batch, broadcast over heads
    ((4, 1, 3, 5), (4, 1, 9, 5), (4, 1, 9, 5), (4, 1, 1, 9), 1, False, F32),  # padding mask over the keys
    ((3, 6, 16), (3, 6, 16), (3, 6, 2), (3, 6, 6), 1, True, F64),  # a mask and is_causal together
    ((1, 2, 1, 4), (1, 2, 1, 4), (1, 2, 1, 4), (1, 1, 1, 1), 1, False, F32),  # T = 1, fully masked
    ((2, 7, 32), (2, 7, 32), (2, 7, 32), None, 0, False, F32),
    ((2, 2, 5, 3), (2, 2, 5, 3), (2, 2, 5, 3), (5, 5), 0, True, F64),
]


def _sdpa_expected(q, k, v, mask, is_causal, upstream):
    """F.scaled_dot_product_attention on the CPU (math path): the output and the gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if mask is not None and is_causal:
        Tq, Tk = q.shape[-2], k.shape[-2]
        mask, is_causal = mask & torch.ones(Tq, Tk, dtype=torch.bool).tril(), False
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=is_causal)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def check_scaled_dot_product_attention(ns):
    fn = student(ns, "scaled_dot_product_attention")

    def check(device):
        for seed, (qs, ks, vs, ms, full, causal, dtype) in enumerate(SDPA_CASES):
            g = torch.Generator().manual_seed(seed)
            q, k, v = _randn(g, *qs, dtype=dtype), _randn(g, *ks, dtype=dtype), _randn(g, *vs, dtype=dtype)
            mask = None if ms is None else _mask(g, ms, full_rows=full)
            out_shape = torch.broadcast_shapes(qs[:-2], ks[:-2]) + (qs[-2], vs[-1])
            upstream = _randn(g, *out_shape, dtype=dtype)
            expected, grads = _sdpa_expected(q, k, v, mask, causal, upstream)
            what = (f"scaled_dot_product_attention(q {qs}, k {ks}, v {vs}, mask "
                    f"{'None' if ms is None else ms}{f' with {full} fully masked row(s)' if full else ''}, "
                    f"is_causal={causal}), {dtype}, on {device}")
            leaves = [t.to(device).requires_grad_(True) for t in (q, k, v)]
            with _no_shortcuts(ref.scaled_dot_product_attention):
                out = call_student(fn, *leaves, None if mask is None else mask.to(device), is_causal=causal, what=what)
            tol = _tol(dtype)
            hint = ("" if not full else " (a query whose mask is all False gets zeros, as in PyTorch)")
            assert_close(out, expected.to(device), atol=tol, rtol=tol,
                         what=f"{what}: the output against F.scaled_dot_product_attention{hint}")
            if not out.requires_grad:
                raise GradingFailure(f"{what}: the output must be differentiable (don't detach)")
            call_student((out * upstream.to(device)).sum().backward, what=f"{what}: backward()")
            for name, leaf, e in zip("qkv", leaves, grads, strict=True):
                if leaf.grad is None:
                    raise GradingFailure(f"{what}: the output does not depend on {name}")
                assert_close(leaf.grad, e.to(device), atol=10 * tol, rtol=10 * tol,
                             what=f"{what}: the gradient with respect to {name}{hint}")

    with swapped(ns, causal_mask=ref.causal_mask), single_thread():
        on_each_device(check)
        q = torch.empty(2, 3, 5, 4, device="meta")
        mask = torch.ones(1, 1, 5, 5, dtype=torch.bool, device="meta")
        for kwargs in ({"is_causal": True}, {"mask": mask, "is_causal": True}):
            _meta_device_check(lambda kwargs=kwargs: fn(q, q, q, **kwargs),
                               f"scaled_dot_product_attention on meta tensors (standing in for a GPU), "
                               f"{', '.join(f'{k}=...' if k == 'mask' else f'{k}={v}' for k, v in kwargs.items())}")


# --- part 2: MultiHeadAttention -----------------------------------------------------------------

MHA_CASES = [  # (B, T, C, h, bias, mask kind, dtype)
    (1, 1, 4, 1, True, None, F32), (2, 5, 8, 2, True, "causal", F32), (3, 6, 12, 3, False, "batch", F64),
    (2, 4, 6, 6, True, "causal", F32), (2, 7, 16, 4, True, "batch", F64), (1, 3, 8, 8, False, None, F32),
    (4, 9, 12, 2, True, "shared", F32),
]


def _load_torch_mha(module, torch_mha):
    C = torch_mha.embed_dim
    state = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        state[f"{name}.weight"] = torch_mha.in_proj_weight[i * C:(i + 1) * C].detach()
        if torch_mha.in_proj_bias is not None:
            state[f"{name}.bias"] = torch_mha.in_proj_bias[i * C:(i + 1) * C].detach()
    state["out_proj.weight"] = torch_mha.out_proj.weight.detach()
    if torch_mha.out_proj.bias is not None:
        state["out_proj.bias"] = torch_mha.out_proj.bias.detach()
    load_weights(module, state)


def _mha_expected_names(C, bias):
    return {f"{n}.{w}": (C, C) if w == "weight" else (C,) for n in ("q_proj", "k_proj", "v_proj", "out_proj")
            for w in (("weight", "bias") if bias else ("weight",))}


def check_multi_head_attention(ns):
    cls = student(ns, "MultiHeadAttention")

    def check(device):
        for seed, (B, T, C, h, bias, kind, dtype) in enumerate(MHA_CASES):
            what = (f"MultiHeadAttention({C}, {h}, bias={bias}) with nn.MultiheadAttention's weights, x ({B}, {T}, {C}), "
                    f"mask {kind}, {dtype}, on {device}")
            torch.manual_seed(seed)
            torch_mha = nn.MultiheadAttention(C, h, bias=bias, batch_first=True, dtype=dtype)
            with torch.no_grad():
                for p in torch_mha.parameters():
                    p.normal_(0, 0.5)
            model = _module(cls, C, h, bias, what=what, own=(ref.MultiHeadAttention,)).to(dtype)
            assert_equal(_param_shapes(model), _mha_expected_names(C, bias), what=f"{what}: the parameters")
            _load_torch_mha(model, torch_mha)
            model.to(device)
            g = torch.Generator().manual_seed(100 + seed)
            x, upstream = _randn(g, B, T, C, dtype=dtype), _randn(g, B, T, C, dtype=dtype)
            if kind is None:
                mask, torch_mask = None, None
            elif kind == "causal":
                mask = torch.ones(T, T, dtype=torch.bool).tril()
                torch_mask = ~mask
            elif kind == "shared":
                mask = _mask(g, (T, T), ensure_one=True)
                torch_mask = ~mask
            else:  # one mask per batch element, broadcast over the heads
                mask = _mask(g, (B, 1, T, T), ensure_one=True)
                torch_mask = (~mask).expand(B, h, T, T).reshape(B * h, T, T)
            x_ref = x.clone().requires_grad_(True)
            expected = torch_mha(x_ref, x_ref, x_ref, attn_mask=torch_mask, need_weights=False)[0]
            (expected * upstream).sum().backward()
            x_mine = x.to(device).requires_grad_(True)
            with _no_shortcuts(ref.MultiHeadAttention):
                out = call_student(model, x_mine, None if mask is None else mask.to(device), what=what)
            tol = _tol(dtype)
            assert_close(out, expected.detach().to(device), atol=10 * tol, rtol=10 * tol,
                         what=f"{what}: the output (split C into h heads of C/h channels: (B, T, C) -> (B, T, h, d) "
                              f"-> (B, h, T, d), attend in each head, then back)")
            if not out.requires_grad:
                raise GradingFailure(f"{what}: the output must be differentiable (don't detach)")
            call_student((out * upstream.to(device)).sum().backward, what=f"{what}: backward()")
            assert_close(x_mine.grad, x_ref.grad.to(device), atol=100 * tol, rtol=100 * tol,
                         what=f"{what}: the gradient with respect to x")

    with swapped(ns, scaled_dot_product_attention=ref.scaled_dot_product_attention, causal_mask=ref.causal_mask), \
            single_thread():
        on_each_device(check)


# --- part 3: sinusoidal_positions and LayerNorm -------------------------------------------------

def _sinusoids(T, d):
    pos = torch.arange(T, dtype=F64).unsqueeze(1)
    i = torch.arange(0, d, 2, dtype=F64)
    angle = pos / 10000 ** (i / d)
    pe = torch.zeros(T, d, dtype=F64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return pe


def check_sinusoidal_positions(ns):
    fn = student(ns, "sinusoidal_positions")
    for T, d in ((1, 2), (1, 8), (7, 4), (10, 6), (50, 16), (128, 64), (300, 32)):
        what = f"sinusoidal_positions({T}, {d})"
        got = call_student(fn, T, d, what=what)
        if not isinstance(got, torch.Tensor) or not got.is_floating_point():
            raise GradingFailure(f"{what}: expected a float tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        assert_close(got, _sinusoids(T, d), atol=2e-5, rtol=1e-5,
                     what=f"{what} (PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)))")


LN_CASES = [  # (x shape, eps, dtype, scale, shift)
    ((2, 3, 8), 1e-5, F32, 1.0, 0.0), ((5, 1), 1e-5, F32, 1.0, 0.0), ((4, 16), 1e-3, F64, 3.0, 5.0),
    ((2, 2, 3, 7), 1e-5, F64, 0.5, -2.0), ((3, 12), 1e-6, F32, 10.0, 100.0), ((1, 1, 4), 1e-5, F32, 2.0, 1.0),
    ((6, 2), 0.1, F64, 1.0, 0.0),
]


def _compare_forward_backward(model, x, upstream, expected, grads: dict, *, device, own, what: str,
                              out_tol: float, grad_tol: float, explain: str) -> None:
    """Run the student's ``model`` on ``x`` (on ``device``, with ``own``'s shortcuts forbidden) and
    compare its output with ``expected``; then backpropagate ``upstream`` and compare the gradients
    with ``grads``: {"x": the input's, parameter name: that parameter's}, computed on the CPU."""
    x_mine = x.to(device).requires_grad_(True)
    with _no_shortcuts(own):
        out = call_student(model, x_mine, what=what)
    assert_close(out, expected.detach().to(device), atol=out_tol, rtol=out_tol, what=f"{what}: the output ({explain})")
    call_student((out * upstream.to(device)).sum().backward, what=f"{what}: backward()")
    leaves = {"x": x_mine, **dict(model.named_parameters())}
    for name, e in grads.items():
        if leaves[name].grad is None:
            raise GradingFailure(f"{what}: the output does not depend on {name}")
        assert_close(leaves[name].grad, e.to(device), atol=grad_tol, rtol=grad_tol,
                     what=f"{what}: the gradient with respect to {name}")


def check_layer_norm(ns):
    cls = student(ns, "LayerNorm")

    def check(device):
        for seed, (shape, eps, dtype, scale, shift) in enumerate(LN_CASES):
            d = shape[-1]
            what = f"LayerNorm({d}, eps={eps}) with nn.LayerNorm's weights, x {shape}, {dtype}, on {device}"
            model = _module(cls, d, eps, what=what, own=(ref.LayerNorm,)).to(dtype)
            assert_equal(_param_shapes(model), {"weight": (d,), "bias": (d,)}, what=f"{what}: the parameters")
            assert_close(model.weight, torch.ones(d, dtype=dtype), what=f"LayerNorm({d}).weight at initialization")
            assert_close(model.bias, torch.zeros(d, dtype=dtype), what=f"LayerNorm({d}).bias at initialization")
            g = torch.Generator().manual_seed(seed)
            torch_ln = nn.LayerNorm(d, eps=eps, dtype=dtype)
            with torch.no_grad():
                torch_ln.weight.copy_(_randn(g, d, dtype=dtype))
                torch_ln.bias.copy_(_randn(g, d, dtype=dtype))
            model.load_state_dict(torch_ln.state_dict())
            model.to(device)
            x = _randn(g, *shape, dtype=dtype, scale=scale) + shift
            upstream = _randn(g, *shape, dtype=dtype)
            x_ref = x.clone().requires_grad_(True)
            expected = torch_ln(x_ref)
            (expected * upstream).sum().backward()
            tol = _tol(dtype)
            _compare_forward_backward(
                model, x, upstream, expected,
                {"x": x_ref.grad, "weight": torch_ln.weight.grad, "bias": torch_ln.bias.grad},
                device=device, own=ref.LayerNorm, what=what, out_tol=10 * tol, grad_tol=100 * tol,
                explain="normalize over the last dimension with the biased variance, divided by d, and eps "
                        "inside the square root")

    with single_thread():
        on_each_device(check)


# --- part 4: TransformerBlock and GPT -----------------------------------------------------------

BLOCK_CASES = [(1, 1, 4, 1, F32), (2, 5, 8, 2, F32), (3, 7, 12, 3, F64), (2, 9, 16, 4, F32), (1, 4, 8, 8, F64)]


def _torch_block(sd, x, h):
    """GPT-2's pre-LN block written with PyTorch's own functions, on the weights ``sd`` (the
    notebook's parameter names)."""
    B, T, C = x.shape

    def lin(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    a = F.layer_norm(x, (C,), sd["ln_1.weight"], sd["ln_1.bias"], 1e-5)
    q, k, v = (lin(a, f"attn.{n}").view(B, T, h, C // h).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    x = x + lin(y, "attn.out_proj")
    m = F.layer_norm(x, (C,), sd["ln_2.weight"], sd["ln_2.bias"], 1e-5)
    return x + lin(F.gelu(lin(m, "mlp_fc"), approximate="tanh"), "mlp_proj")


def _parts():
    return dict(causal_mask=ref.causal_mask, scaled_dot_product_attention=ref.scaled_dot_product_attention,
                MultiHeadAttention=ref.MultiHeadAttention, LayerNorm=ref.LayerNorm)


def _randomize(model, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_randn(g, *p.shape, dtype=p.dtype, scale=scale))
    return model


def check_transformer_block(ns):
    cls = student(ns, "TransformerBlock")

    def check(device):
        for seed, (B, T, C, h, dtype) in enumerate(BLOCK_CASES):
            what = f"TransformerBlock({C}, {h}) with random weights, x ({B}, {T}, {C}), {dtype}, on {device}"
            reference = _randomize(ref.TransformerBlock(C, h).to(dtype), seed)
            model = _module(cls, C, h, what=what, own=(ref.TransformerBlock,)).to(dtype)
            assert_equal(_param_shapes(model), _param_shapes(reference), what=f"{what}: the parameters")
            model.load_state_dict(reference.state_dict())
            model.to(device).eval()
            g = torch.Generator().manual_seed(100 + seed)
            x, upstream = _randn(g, B, T, C, dtype=dtype), _randn(g, B, T, C, dtype=dtype)
            sd = {k: v.detach().clone().requires_grad_(True) for k, v in reference.state_dict().items()}
            x_ref = x.clone().requires_grad_(True)
            expected = _torch_block(sd, x_ref, h)
            (expected * upstream).sum().backward()
            tol = _tol(dtype)
            _compare_forward_backward(
                model, x, upstream, expected,
                {"x": x_ref.grad, **{name: sd[name].grad for name, _ in model.named_parameters()}},
                device=device, own=ref.TransformerBlock, what=what, out_tol=100 * tol, grad_tol=1000 * tol,
                explain="pre-LN: x + attn(ln_1(x)) with a causal mask, then x + mlp_proj(gelu_tanh(mlp_fc(ln_2(x))))")

    with swapped(ns, **_parts()), single_thread():
        on_each_device(check)
        model = _module(cls, 8, 2, what="TransformerBlock(8, 2)").to("meta")
        _meta_device_check(lambda: model(torch.empty(2, 5, 8, device="meta")),
                           "TransformerBlock(8, 2) on meta tensors (standing in for a GPU)")


GPT_CASES = [  # (B, T, V, block_size, n_layer, n_head, n_embd, dtype)
    (1, 1, 7, 4, 1, 1, 4, F32), (2, 8, 11, 8, 2, 2, 8, F32), (3, 5, 13, 10, 3, 4, 16, F64),
    (2, 12, 9, 12, 1, 3, 12, F32),
]


def check_gpt_forward(ns):
    cls = student(ns, "GPT")

    def check(device):
        for seed, (B, T, V, bs, L, h, C, dtype) in enumerate(GPT_CASES):
            what = (f"GPT(vocab_size={V}, block_size={bs}, n_layer={L}, n_head={h}, n_embd={C}) with the reference's "
                    f"weights, idx ({B}, {T}), {dtype}, on {device}")
            torch.manual_seed(seed)
            reference = _randomize(ref.GPT(V, bs, L, h, C).to(dtype), seed).eval()
            model = _module(cls, V, bs, L, h, C, what=what)
            if not (hasattr(model, "lm_head") and hasattr(model, "wte") and is_shared(model, "lm_head.weight", "wte.weight")):
                raise GradingFailure(f"{what}: lm_head.weight must be wte.weight (one tied (V, C) matrix)")
            model = model.to(dtype)
            assert_equal(_param_shapes(model), _param_shapes(reference), what=f"{what}: the parameters")
            model.load_state_dict(reference.state_dict())
            model.to(device).eval()
            g = torch.Generator().manual_seed(100 + seed)
            idx, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
            expected, expected_loss = reference(idx, targets)
            expected_loss.backward()
            with _no_shortcuts():
                result = call_student(model, idx.to(device), targets.to(device), what=what)
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise GradingFailure(f"{what}: forward must return (logits, loss), got {result!r:.150}")
            logits, loss = result
            tol = _tol(dtype)
            assert_close(logits, expected.detach().to(device), atol=100 * tol, rtol=100 * tol,
                         what=f"{what}: the logits (wte(idx) + wpe(positions), the blocks, ln_f, then the tied head)")
            assert_close(loss, expected_loss.detach().to(device), atol=100 * tol, rtol=100 * tol,
                         what=f"{what}: the loss (mean cross-entropy of the logits against the targets)")
            call_student(loss.backward, what=f"{what}: backward()")
            grads = dict(model.named_parameters())
            for name, p in reference.named_parameters():
                mine = grads[name].grad
                if mine is None:
                    raise GradingFailure(f"{what}: the loss does not depend on {name}")
                assert_close(mine, p.grad.to(device), atol=1000 * tol, rtol=1000 * tol,
                             what=f"{what}: the gradient with respect to {name}"
                                  f"{' (the head is tied: wte.weight gets the gradients of both uses)' if name == 'wte.weight' else ''}")
            with torch.no_grad(), _no_shortcuts():
                no_targets = call_student(model, idx.to(device), what=f"{what}, no targets")
                if not (isinstance(no_targets, (tuple, list)) and len(no_targets) == 2 and no_targets[1] is None):
                    raise GradingFailure(f"{what}: without targets forward must return (logits, None)")
                for t in range(T):  # causality: changing token t changes no earlier logit
                    changed = idx.clone()
                    changed[:, t] = (changed[:, t] + 1) % V
                    other = call_student(model, changed.to(device), what=what)[0]
                    assert_close(other[:, :t], no_targets[0][:, :t], atol=100 * tol, rtol=100 * tol,
                                 what=f"{what}: the logits before position {t} after changing token {t} (causality)")

    with swapped(ns, TransformerBlock=ref.TransformerBlock, **_parts()), single_thread():
        on_each_device(check)


HF_CASES = [  # (vocab, n_positions, n_embd, n_layer, n_head, B, T, dtype)
    (23, 12, 16, 2, 4, 2, 12, F32), (17, 8, 8, 1, 1, 1, 1, F32), (31, 16, 24, 3, 2, 3, 9, F64),
    (19, 10, 12, 2, 6, 2, 7, F32),
]


def hf_model(V, n_pos, C, L, h, seed, dtype=F32):
    """A small random GPT2LMHeadModel, built offline (no download), LayerNorms away from (1, 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=n_pos, n_embd=C, n_layer=L, n_head=h, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(_randn(g, *p.shape, scale=0.3 if "ln_" in name else 0.05))
    return model.to(dtype)


def check_gpt_from_hf(ns):
    cls = student(ns, "GPT")

    def check(device):
        for seed, (V, n_pos, C, L, h, B, T, dtype) in enumerate(HF_CASES):
            what = (f"GPT.from_hf(a random GPT2LMHeadModel: vocab_size={V}, n_positions={n_pos}, n_embd={C}, "
                    f"n_layer={L}, n_head={h}), idx ({B}, {T}), {dtype}, on {device}")
            hf = hf_model(V, n_pos, C, L, h, seed, dtype)
            idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                expected = hf(idx).logits
            with _no_shortcut_modules():
                model = call_student(cls.from_hf, hf, what=what)
            if not is_instance(model, nn.Module):
                raise GradingFailure(f"{what}: from_hf must return a GPT")
            model = model.to(device=device, dtype=dtype).eval()
            with torch.no_grad(), _no_shortcuts():
                result = call_student(model, idx.to(device), what=what)
            logits = result[0] if isinstance(result, (tuple, list)) else result
            tol = 1e-4 if dtype == F32 else 1e-9
            assert_close(logits, expected.to(device), atol=tol, rtol=0,
                         what=f"{what}: the logits against Hugging Face's (HF's Conv1D weights are (in, out): "
                              f"transpose them; c_attn stacks q, k and v along its output dimension)")

    with swapped(ns, TransformerBlock=ref.TransformerBlock, **_parts()), single_thread():
        on_each_device(check)
