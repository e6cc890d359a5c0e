"""A tiny byte-level GPT (learned positions, untied head) for demos, tests and benchmarks.

Pure: a config, an init from a seed, a loss. The corpus is ``muon_ds.testing.corpus``, the
training loop ``muon_ds.testing.training``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

VOCAB_SIZE = 256
"""Byte-level tokens: every byte is a token, so any text is covered without a tokenizer."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the tiny GPT."""

    context: int = 64
    """Tokens per sequence (bytes: a line or two of code, which keeps a CPU step cheap);
    also the number of learned positions."""

    d_model: int = 128
    """Width of the residual stream."""

    n_layers: int = 4
    """Number of transformer blocks."""

    n_heads: int = 4
    """Attention heads per block; must divide ``d_model``."""

    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``d_model``."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Q, K and V are separate ``[d, d]`` projections rather than one fused ``[3d, d]``:
    Muon orthogonalises each weight as a whole, and Q, K, V are three logical matrices.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = (
            proj(x).view(batch, seq, self.n_heads, width // self.n_heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, cfg.d_model, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TinyGPT(nn.Module):
    """Decoder-only byte-level GPT with learned positions and an untied head.

    Module names are chosen for muon_ds's routing: ``tok_embed`` / ``pos_embed`` and
    ``lm_head`` match its default AdamW name patterns, every other matrix goes to Muon.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB_SIZE, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02), residual output projections shrunk by sqrt(2 L).

        The small head makes the initial loss close to ln(256), a uniform guess.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, 256]`` for int64 tokens ``[batch, seq]``, seq <= context."""
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.tok_embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_final(x))


def init_model(cfg: GPTConfig, seed: int) -> TinyGPT:
    """A ``TinyGPT`` whose weights depend on ``seed`` only (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGPT(cfg)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats per byte."""
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
