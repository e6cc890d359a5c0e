"""The two model shapes every communication benchmark contender trains.

Proportions follow the models Muon is used for, scaled down so a step takes well under a
second on a CPU rank: a Llama-like dense GPT (GQA attention, SwiGLU MLP, RMSNorm, untied
head) and a DeepSeek-V3-small / Moonlight-like MoE (first layer dense, then routed
experts plus one shared expert, top-k routing). ``full_size`` gives the shapes to use on
GPUs. DeepSpeed contenders build them as plain torch modules, Megatron contenders as
``GPTModel``s; the parameter shapes Muon sees are the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes."""

    name: str
    """``dense`` or ``moe``: the key used in tables and JSON."""
    layers: int
    hidden: int
    heads: int
    query_groups: int
    """KV heads (GQA); ``heads`` means plain multi-head attention."""
    ffn: int
    """SwiGLU inner size of a dense MLP."""
    vocab: int
    seq: int
    micro_batch: int
    """Sequences per rank per step."""
    experts: int = 0
    """Routed experts per MoE layer; 0 makes every layer dense."""
    expert_ffn: int = 0
    top_k: int = 0
    shared_experts: int = 0
    """Shared experts per MoE layer, each of ``expert_ffn``."""
    first_dense_layers: int = 0
    """Leading layers with a dense MLP (DeepSeek-V3 and Moonlight keep the first dense)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


DENSE = ModelShape(
    name="dense",
    layers=4,
    hidden=256,
    heads=8,
    query_groups=2,
    ffn=704,
    vocab=2048,
    seq=64,
    micro_batch=4,
)

MOE = ModelShape(
    name="moe",
    layers=4,
    hidden=256,
    heads=8,
    query_groups=8,
    ffn=704,
    vocab=2048,
    seq=64,
    micro_batch=4,
    experts=8,
    expert_ffn=128,
    top_k=2,
    shared_experts=1,
    first_dense_layers=1,
)

CPU_SHAPES = {shape.name: shape for shape in (DENSE, MOE)}


def full_size(shape: ModelShape) -> ModelShape:
    """GPU-size counterpart: Llama-3-8B-like dense, Moonlight-16B-A3B-like MoE layers."""
    if shape.experts:
        return dataclasses.replace(
            shape,
            layers=27,
            hidden=2048,
            heads=16,
            query_groups=16,
            ffn=11264,
            vocab=163840,
            seq=4096,
            micro_batch=1,
            experts=64,
            expert_ffn=1408,
            top_k=6,
            shared_experts=2,
        )
    return dataclasses.replace(
        shape,
        layers=32,
        hidden=4096,
        heads=32,
        query_groups=8,
        ffn=14336,
        vocab=128256,
        seq=4096,
        micro_batch=1,
    )
