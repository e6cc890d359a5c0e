"""Plain-torch builds of the benchmark shapes, for the DeepSpeed contenders.

``build(shape)`` gives a Llama-like decoder (RMSNorm, rotary GQA attention with separate
q/k/v/o projections, SwiGLU MLPs, untied head) whose forward returns the next-token loss.
For the MoE shape each MoE layer has a linear router, ``experts`` routed SwiGLU experts as
separate ``nn.Linear`` weights (so Muon sees one matrix per expert, as Megatron's
SequentialMLP gives it) with softmax top-k routing, and shared experts. Every expert is
replicated over data parallelism (no expert parallelism): each DP rank holds and trains all
of them, which is what ZeRO-1 under DeepSpeed does for a plain-torch MoE.

Names follow the routing convention both DeepSpeed's Muon and muon_ds use: ``embed`` and
``lm_head`` stay on AdamW, every other 2-D weight is a Muon matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.shapes import ModelShape


def _rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotate ``[batch, heads, seq, head_dim]`` pairs by position (RoPE, base 10000)."""
    seq, dim = x.shape[-2], x.shape[-1]
    positions = torch.arange(seq, dtype=torch.float32, device=x.device)
    inverse = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = torch.outer(positions, inverse)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = shape.heads, shape.query_groups, shape.head_dim
        self.q_proj = nn.Linear(shape.hidden, shape.heads * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.hidden, shape.query_groups * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.hidden, shape.query_groups * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.heads * shape.head_dim, shape.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.groups, self.head_dim).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(
            _rotary(q), _rotary(k), v, is_causal=True, enable_gqa=self.groups != self.heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed experts (softmax over the chosen k) plus always-on shared experts."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.top_k = shape.top_k
        self.router = nn.Linear(shape.hidden, shape.experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(shape.hidden, shape.expert_ffn) for _ in range(shape.experts)
        )
        self.shared = SwiGLU(shape.hidden, shape.expert_ffn * shape.shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(tokens).topk(self.top_k, dim=-1)
        weights = weights.softmax(dim=-1)
        out = self.shared(tokens)
        for index, expert in enumerate(self.experts):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            if token.numel():
                routed = expert(tokens[token]) * weights[token, slot, None]
                out = out.index_add(0, token, routed)
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, shape: ModelShape, moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(shape.hidden)
        self.attn = Attention(shape)
        self.mlp_norm = nn.RMSNorm(shape.hidden)
        self.mlp = MoE(shape) if moe else SwiGLU(shape.hidden, shape.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Token ids ``[batch, seq + 1]`` in, mean next-token cross-entropy out."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(
            Block(shape, moe=shape.experts > 0 and i >= shape.first_dense_layers)
            for i in range(shape.layers)
        )
        self.norm = nn.RMSNorm(shape.hidden)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1])
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def build(shape: ModelShape, seed: int) -> DecoderLM:
    """The model for ``shape``, initialised from ``seed`` (the same weights on every rank)."""
    torch.manual_seed(seed)
    return DecoderLM(shape)


def muon_matrices(model: nn.Module) -> list[str]:
    """Names of the parameters Muon orthogonalises: 2-D, not the embedding or the head."""
    return [
        name
        for name, param in model.named_parameters()
        if param.ndim >= 2 and "embed" not in name and "lm_head" not in name
    ]
