"""The unsharded test models and how TP/EP ranks hold them.

Each model is a dict of full reference tensors (what single-process ``muon_ds.Muon``
updates) plus, per parallel layout, a function giving one rank's ``LocalParam``s: the
TP-local or EP-local tensors a framework would hold, built from the reference tensors,
so the same function maps reference values, reference gradients and expected results.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from muon_ds.config import MuonConfig
from muon_ds.layout import (
    TensorParallel,
    expert_blocks,
    gated_blocks,
    qkv_blocks,
    route_param,
)
from tests.dist.zero1 import LocalParam

DENSE_SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (50, 24),
    "h0.attn": (72, 24),
    "h0.proj": (24, 24),
    "h0.norm": (24,),
    "h0.fc1": (96, 24),
    "h0.fc2": (24, 96),
    "h1.attn": (72, 24),
    "h1.proj": (24, 24),
    "h1.fc1": (96, 24),
    "h1.fc1_bias": (96,),
    "h1.fc2": (24, 96),
    "odd": (37, 53),
    "conv": (8, 3, 3, 3),
    "lm_head.weight": (50, 24),
}
"""Sizes chosen so ZeRO-1 boundaries at DP 2 and 4 cut matrices at odd offsets."""


def make_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator) * 0.1 for n, s in shapes.items()}


def make_grads(shapes: dict[str, tuple[int, ...]], step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(s, generator=generator) for n, s in shapes.items()}


def dense_dp_locals(full: dict[str, torch.Tensor], config: MuonConfig) -> list[LocalParam]:
    """Pure data parallelism: every rank holds every parameter whole."""
    locals_ = []
    for name, tensor in full.items():
        route = route_param(name, tensor, config)
        shape = (tensor.shape[0], tensor[0].numel()) if tensor.ndim >= 2 else (0, 0)
        locals_.append(LocalParam(name, tensor, route, shape))
    return locals_


# --- TP=2: Megatron-like layouts built from separate reference matrices -----------------

HEADS_PER_GROUP, HEAD_DIM, QUERY_GROUPS, HIDDEN, FFN = 2, 6, 2, 24, 48

TP_SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (50, HIDDEN),
    "q": (QUERY_GROUPS * HEADS_PER_GROUP * HEAD_DIM, HIDDEN),
    "k": (QUERY_GROUPS * HEAD_DIM, HIDDEN),
    "v": (QUERY_GROUPS * HEAD_DIM, HIDDEN),
    "proj": (HIDDEN, QUERY_GROUPS * HEADS_PER_GROUP * HEAD_DIM),
    "norm": (HIDDEN,),
    "gate": (FFN, HIDDEN),
    "up": (FFN, HIDDEN),
    "fc2": (HIDDEN, FFN),
    "fc2_bias": (HIDDEN,),
}
"""The unsharded reference: Q, K, V and gate, up as separate matrices."""


def interleaved_qkv(full: dict[str, torch.Tensor], groups: range) -> torch.Tensor:
    """Megatron's fused QKV rows for the given query groups: per group [q heads; k; v]."""
    q_rows = HEADS_PER_GROUP * HEAD_DIM
    parts = []
    for g in groups:
        parts += [
            full["q"][g * q_rows : (g + 1) * q_rows],
            full["k"][g * HEAD_DIM : (g + 1) * HEAD_DIM],
            full["v"][g * HEAD_DIM : (g + 1) * HEAD_DIM],
        ]
    return torch.cat(parts)


def tp_locals(
    full: dict[str, torch.Tensor], tp_rank: int, tp_size: int, config: MuonConfig
) -> list[LocalParam]:
    """One TP rank's tensors: column-parallel QKV and gated fc1, row-parallel proj and fc2."""
    t, n = tp_rank, tp_size

    def rows(x: torch.Tensor) -> torch.Tensor:
        step = x.shape[0] // n
        return x[t * step : (t + 1) * step]

    def cols(x: torch.Tensor) -> torch.Tensor:
        step = x.shape[1] // n
        return x[:, t * step : (t + 1) * step]

    groups_per_rank = QUERY_GROUPS // n
    qkv = interleaved_qkv(full, range(t * groups_per_rank, (t + 1) * groups_per_rank))
    fc1 = torch.cat([rows(full["gate"]), rows(full["up"])])
    column = TensorParallel(t, n, 0)
    row = TensorParallel(t, n, 1)
    return [
        LocalParam("embed.weight", rows(full["embed.weight"]), "adamw"),
        LocalParam(
            "qkv",
            qkv,
            "muon",
            tuple(qkv.shape),
            column,
            qkv_blocks(groups_per_rank, HEADS_PER_GROUP, HEAD_DIM, tp=column),
        ),
        LocalParam("proj", cols(full["proj"]), "muon", tuple(cols(full["proj"]).shape), row),
        LocalParam("norm", full["norm"], "adamw"),
        LocalParam("fc1", fc1, "muon", tuple(fc1.shape), column, gated_blocks(fc1.shape[0])),
        LocalParam("fc2", cols(full["fc2"]), "muon", tuple(cols(full["fc2"]).shape), row),
        LocalParam("fc2_bias", full["fc2_bias"], "adamw"),
    ]


# --- EP=2: grouped experts ---------------------------------------------------------------

EXPERTS, EXPERT_FFN = 4, 32

MOE_SHAPES: dict[str, tuple[int, ...]] = {
    "router": (EXPERTS, HIDDEN),
    "attn": (3 * HIDDEN, HIDDEN),
    "norm": (HIDDEN,),
    **{f"experts.{e}.fc1": (EXPERT_FFN, HIDDEN) for e in range(EXPERTS)},
    **{f"experts.{e}.fc2": (HIDDEN, EXPERT_FFN) for e in range(EXPERTS)},
}


def moe_locals(
    full: dict[str, torch.Tensor], ep_rank: int, ep_size: int, config: MuonConfig
) -> list[LocalParam]:
    """Dense params whole (group "dense"); this EP rank's experts grouped (group "expert")."""
    dense = [
        LocalParam(n, full[n], route_param(n, full[n], config), tuple(full[n].shape))
        if full[n].ndim == 2
        else LocalParam(n, full[n], "adamw")
        for n in ("router", "attn", "norm")
    ]
    per_rank = EXPERTS // ep_size
    mine = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    fc1 = torch.cat([full[f"experts.{e}.fc1"] for e in mine])
    fc2 = torch.cat([full[f"experts.{e}.fc2"] for e in mine])
    first = ep_rank * per_rank
    return [
        *dense,
        LocalParam(
            "experts.fc1",
            fc1,
            "muon",
            tuple(fc1.shape),
            blocks=expert_blocks(fc1.shape[0], per_rank, first),
            group="expert",
        ),
        LocalParam(
            "experts.fc2",
            fc2,
            "muon",
            tuple(fc2.shape),
            blocks=expert_blocks(fc2.shape[0], per_rank, first),
            group="expert",
        ),
    ]


LocalsFn = Callable[[dict[str, torch.Tensor]], list[LocalParam]]
