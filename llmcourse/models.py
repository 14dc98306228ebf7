"""The course's reference GPT: GPT-2's architecture, exactly, so that Hugging Face's weights load.

This is unit 05's graded model (students build it in ``05_transformers``). Units 06-09 train,
decode, fine-tune and align it, so its reference reaches students here, with those later units.
The unit-05 autograder forbids it inside the graded functions (``forbid(llmcourse.models.GPT)``).

The layout follows nanoGPT, and module names mirror Hugging Face's ``GPT2LMHeadModel`` so that
``GPT.from_hf`` is a plain copy:

    transformer.wte      nn.Embedding(vocab_size, n_embd)   token embeddings (tied to lm_head)
    transformer.wpe      nn.Embedding(block_size, n_embd)   learned position embeddings
    transformer.h[i]     Block: ln_1, attn (c_attn, c_proj), ln_2, mlp (c_fc, c_proj)
    transformer.ln_f     the final LayerNorm
    lm_head              nn.Linear(n_embd, vocab_size, bias=False), weight is transformer.wte.weight

Every weight is in PyTorch's ``nn.Linear`` layout (out_features, in_features). Hugging Face's
GPT-2 uses ``Conv1D`` modules whose weights are (in_features, out_features): ``from_hf``
transposes them. Shapes: B batch, T sequence length (T <= block_size), C = n_embd, V vocab size.

Conventions (COURSE.md): boolean masks with True = attend; GELU with the tanh approximation
(GPT-2's ``gelu_new``); LayerNorm with eps 1e-5 and the biased variance, as ``nn.LayerNorm``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "Block", "CausalSelfAttention", "MLP", "PretrainedUnavailable"]


class PretrainedUnavailable(RuntimeError):
    """``GPT.from_pretrained`` could not get the weights (offline, or ``transformers`` missing)."""


@dataclass
class GPTConfig:
    """GPT-2's hyper-parameters. The defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, GPT-2's: one fused projection to q, k, v (``c_attn``),
    heads of size C / n_head, scores scaled by 1/sqrt(head size), a causal mask, then ``c_proj``.

    Written out with matmul and softmax (no ``F.scaled_dot_product_attention``) so that it is the
    same computation as the unit-05 assignment's and runs under its forbidden-call guard.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head size): split the channels, then move heads before time
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, n_head, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))  # over the keys, row by row
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: C -> 4C, GELU (tanh approximation), 4C -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """A pre-LN transformer block (GPT-2): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, ``n_layer`` pre-LN blocks, a final LayerNorm and
    an LM head tied to the token embeddings.

    ``GPT(config)`` or ``GPT(vocab_size=..., block_size=..., ...)`` (the fields of ``GPTConfig``).
    Initialization as GPT-2's: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).
    """

    def __init__(self, config: GPTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = GPTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a GPTConfig or keyword arguments, not both")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one (V, C) matrix
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) int64 token ids, T <= block_size; targets: (B, T) ids or None.

        Returns (logits (B, T, V), loss): loss is the mean cross-entropy of logits against
        targets (``F.cross_entropy``, ignore_index -100), or None without targets.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # --- sizes ------------------------------------------------------------------------------------

    def num_parameters(self, by_component: bool = False):
        """The number of parameters (the tied head counted once).

        With ``by_component=True``, a dict: token embeddings, position embeddings, attention,
        MLP, LayerNorms, and the total.
        """
        counts = {"token embeddings": 0, "position embeddings": 0, "attention": 0, "mlp": 0,
                  "layer norms": 0}
        for name, p in self.named_parameters():  # named_parameters yields the tied weight once
            if name.startswith("transformer.wte"):
                key = "token embeddings"
            elif name.startswith("transformer.wpe"):
                key = "position embeddings"
            elif ".attn." in name:
                key = "attention"
            elif ".mlp." in name:
                key = "mlp"
            else:
                key = "layer norms"
            counts[key] += p.numel()
        counts["total"] = sum(counts.values())
        return counts if by_component else counts["total"]

    # --- Hugging Face GPT-2 -----------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_model) -> GPT:
        """A GPT holding a Hugging Face ``GPT2LMHeadModel``'s weights (its config is read too).

        HF's ``Conv1D`` weights are (in, out); ours are ``nn.Linear``'s (out, in): transposed.
        The HF model must use GPT-2's defaults: ``activation_function`` "gelu_new", no scaled or
        reordered attention variants.
        """
        hf_config = hf_model.config
        act = getattr(hf_config, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT uses GELU with the tanh approximation; this model uses {act!r}")
        if getattr(hf_config, "scale_attn_weights", True) is False or \
                getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or \
                getattr(hf_config, "reorder_and_upcast_attn", False):
            raise ValueError("this GPT-2 configuration changes the attention's scaling; GPT does not")
        config = GPTConfig(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                           n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                           dropout=0.0, layer_norm_epsilon=hf_config.layer_norm_epsilon)
        model = cls(config)
        source = hf_model.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = source[name]
                if name.endswith(transposed):
                    w = w.t()
                if tuple(w.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: HF's weight has shape {tuple(w.shape)}, ours {tuple(p.shape)}")
                p.copy_(w)
        return model.to(next(hf_model.parameters()).dtype)

    @classmethod
    def from_pretrained(cls, name: str = "gpt2") -> GPT:
        """GPT-2 (``"gpt2"``, ``"gpt2-medium"``, ...) from the Hugging Face hub, or its cache.

        Raises ``PretrainedUnavailable`` quickly when the weights cannot be had: ``transformers``
        missing, ``HF_HUB_OFFLINE=1`` with nothing cached, or no network. Catch it to skip a demo.
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as err:
            raise PretrainedUnavailable("GPT.from_pretrained needs the `transformers` package") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(name, local_files_only=offline)
        except Exception as err:  # OSError offline, connection errors, a missing repository
            raise PretrainedUnavailable(
                f"could not load {name!r} from the Hugging Face hub"
                f"{' (HF_HUB_OFFLINE is set and it is not cached)' if offline else ''}: "
                f"{type(err).__name__}: {str(err)[:200]}") from err
        return cls.from_hf(hf_model)
