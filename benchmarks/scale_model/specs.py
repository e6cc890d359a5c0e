"""Full-size model specs for the scale model: every Muon parameter's shape, fusion and TP split."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from benchmarks.shapes import DENSE, MOE, ModelShape, full_size

MUON_BYTES_PER_ELEMENT = 24
"""fp32 grad read, fp32 momentum read + write, bf16 direction write, bf16 update read,
fp32 master read + write."""
ADAMW_BYTES_PER_ELEMENT = 28
"""fp32 grad read, exp_avg and exp_avg_sq read + write, fp32 master read + write."""
MODELLED_BF16_UNITS = "sm_90"
"""The modelled GPU's bf16 matrix units (H100-like: bf16 tensor cores), so ``ns_dtype``
"auto" resolves by ``muon_ds.device``'s rule as it would on that GPU."""
MEGATRON_ALIGN = 64
"""Megatron's ``pad_param_start``: every param starts on a 64-element boundary."""


# -- models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLA:
    """DeepSeek-V3 multi-head latent attention without query compression (Moonlight's)."""

    kv_lora_rank: int
    qk_head_dim: int
    rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class Model:
    key: str
    description: str
    shape: ModelShape
    mla: MLA | None = None


MODELS = {
    m.key: m
    for m in (
        Model(
            "moonlight-16b",
            "Moonlight-16B-A3B: 27 layers (first dense, ffn 11264), hidden 2048, MLA 16 heads "
            "(kv rank 512, qk 128+64 rope, v 128, no q compression), 64 routed experts "
            "(top-6) + 2 shared of ffn 1408, vocab 163840, untied head",
            full_size(MOE),
            MLA(kv_lora_rank=512, qk_head_dim=128, rope_head_dim=64, v_head_dim=128),
        ),
        Model(
            "llama3-8b",
            "Llama-3-8B: 32 layers, hidden 4096, 32 heads / 8 KV, SwiGLU 14336, vocab 128256",
            full_size(DENSE),
        ),
        Model(
            "llama-70b",
            "Llama-3-70B-like: 80 layers, hidden 8192, 64 heads / 8 KV, SwiGLU 28672, vocab 128256",
            dataclasses.replace(
                full_size(DENSE), layers=80, hidden=8192, heads=64, query_groups=8, ffn=28672
            ),
        ),
    )
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as a 2-D matrix before tensor parallelism.

    ``tp_dim`` is the dim tensor parallelism splits (0 column-, 1 row-parallel); None
    means every TP rank holds it whole. ``fused`` names a layout of several logical
    matrices; ``expert`` is a routed expert's global index.
    """

    name: str
    shape: tuple[int, int]
    muon: bool
    tp_dim: int | None = None
    fused: Literal["", "qkv", "gated"] = ""
    expert: int | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def transformer_params(model: Model) -> list[ParamSpec]:
    """Every parameter in model order, named like Megatron-core's GPTModel."""
    s = model.shape
    specs = [ParamSpec("embedding", (s.vocab, s.hidden), muon=False, tp_dim=0)]
    for layer in range(s.layers):
        prefix = f"layers.{layer:02d}."
        specs.append(ParamSpec(prefix + "input_norm", (s.hidden, 1), muon=False))
        specs += _attention(model, prefix + "attention.")
        specs.append(ParamSpec(prefix + "mlp_norm", (s.hidden, 1), muon=False))
        if s.experts and layer >= s.first_dense_layers:
            specs.append(ParamSpec(prefix + "mlp.router", (s.experts, s.hidden), muon=True))
            specs += _mlp(prefix + "mlp.shared_experts.", s.hidden, s.shared_experts * s.expert_ffn)
            for e in range(s.experts):
                # Zero-padded: the planner sorts by name, so every EP rank's experts sort alike.
                specs += _mlp(f"{prefix}mlp.experts.{e:03d}.", s.hidden, s.expert_ffn, expert=e)
        else:
            specs += _mlp(prefix + "mlp.", s.hidden, s.ffn)
    specs.append(ParamSpec("final_norm", (s.hidden, 1), muon=False))
    specs.append(ParamSpec("output", (s.vocab, s.hidden), muon=False, tp_dim=0))
    return specs


def _attention(model: Model, prefix: str) -> list[ParamSpec]:
    s, mla = model.shape, model.mla
    if mla is None:
        qkv_rows = (s.heads + 2 * s.query_groups) * s.head_dim
        return [
            ParamSpec(prefix + "linear_qkv", (qkv_rows, s.hidden), True, tp_dim=0, fused="qkv"),
            ParamSpec(prefix + "linear_proj", (s.hidden, s.heads * s.head_dim), True, tp_dim=1),
        ]
    q_rows = s.heads * (mla.qk_head_dim + mla.rope_head_dim)
    kv_rows = s.heads * (mla.qk_head_dim + mla.v_head_dim)
    return [
        ParamSpec(prefix + "linear_q_proj", (q_rows, s.hidden), True, tp_dim=0),
        # Megatron builds the KV down-projection "duplicated": whole on every TP rank.
        ParamSpec(
            prefix + "linear_kv_down_proj", (mla.kv_lora_rank + mla.rope_head_dim, s.hidden), True
        ),
        ParamSpec(prefix + "kv_norm", (mla.kv_lora_rank, 1), muon=False),
        ParamSpec(prefix + "linear_kv_up_proj", (kv_rows, mla.kv_lora_rank), True, tp_dim=0),
        ParamSpec(prefix + "linear_proj", (s.hidden, s.heads * mla.v_head_dim), True, tp_dim=1),
    ]


def _mlp(prefix: str, hidden: int, ffn: int, expert: int | None = None) -> list[ParamSpec]:
    """Gated fc1 ``[gate; up]`` and fc2; routed experts are not TP-split (expert TP 1)."""
    dense = expert is None
    return [
        ParamSpec(prefix + "fc1", (2 * ffn, hidden), True, 0 if dense else None, "gated", expert),
        ParamSpec(prefix + "fc2", (hidden, ffn), True, 1 if dense else None, "", expert),
    ]


def active_params(model: Model, specs: Sequence[ParamSpec]) -> int:
    """Matmul weights one token passes through: top-k routed experts, the head, no embedding."""
    s = model.shape
    routed = sum(p.numel for p in specs if p.expert is not None)
    dense = sum(p.numel for p in specs if p.expert is None and p.muon)
    head = next(p.numel for p in specs if p.name == "output")
    return dense + head + (routed * s.top_k // s.experts if s.experts else 0)
