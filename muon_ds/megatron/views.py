"""Where Megatron keeps the shards: ``ShardView``s from a DistributedOptimizer's ranges.

Megatron's distributed optimizer gives each rank one flat fp32 main-param shard per
model parameter piece it owns (``shard_fp32_groups`` / ``shard_fp32_from_float16_groups``)
and records which elements of the TP-local parameter that piece is (``param_range_map``).
That is exactly a ``ShardView`` with offset 0 in a buffer of its own; this module only
translates Megatron's names, TP attributes and fused layouts into the core's terms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from muon_ds.config import MuonConfig
from muon_ds.layout import (
    NOT_SPLIT,
    ROUTE_ATTR,
    Route,
    RowBlock,
    ShardView,
    TensorParallel,
    expert_blocks,
    gated_blocks,
    qkv_blocks,
    route_param,
)

QkvSplit = Literal["qkv", "per_head", "none"]
"""How a fused ``linear_qkv`` weight is cut: Q, K, V matrices; one matrix per head; whole."""

TpMode = Literal["whole", "blockwise"]
"""A TP-split weight is orthogonalised as the whole logical matrix, once (muon_ds's
default), or each TP rank's block alone (Megatron's ``--muon-tp-mode blockwise``)."""

DENSE, DENSE_TP, EXPERT, EXPERT_TP = "dense", "dense_tp", "expert", "expert_tp"
"""Exchange group names: DP (whole-on-each-TP-rank params), DP x TP (TP-split params),
expert-DP (expert params whole on each expert-TP rank), expert-DP x expert-TP (expert
params split over expert TP)."""

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_TE_GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.weight(\d+)$")
"""TEGroupedMLP (``--moe-grouped-gemm`` with Transformer Engine) keeps one weight per
expert, ``experts.linear_fc1.weight{i}``: the same matrix as SequentialMLP's."""
_TE_SINGLE_GROUPED_EXPERTS = re.compile(r"\.experts\.linear_fc([12])\.weight$")
"""TEGroupedMLP with ``moe_single_grouped_weight`` (TE >= 2.14) keeps all local experts in
one 3-D ``experts.linear_fc1.weight``, ``[experts, rows, cols]``: expert ``i`` is
``weight[i]``, the matrix ``weight{i}`` would be."""
_LEGACY_GROUPED_EXPERT = re.compile(r"\.experts\.weight[12]$")
"""Legacy GroupedMLP's ``weight1``/``weight2`` (all local experts side by side in one 2-D
tensor). megatron-core 0.19.2 no longer has that module; a port of it would otherwise
pass as one 2-D matrix and be orthogonalised whole, so it is refused by name."""


@dataclass(frozen=True)
class ModelLayout:
    """What the views need to know about the model and this rank's place in it.

    ``heads``/``query_groups``/``head_dim`` describe attention (TransformerConfig's
    num_attention_heads, num_query_groups, kv_channels); ``gated`` is
    ``gated_linear_unit``. TP and EP coordinates come from ``parallel_state``.
    """

    heads: int
    query_groups: int
    head_dim: int
    gated: bool
    tp: TensorParallel
    expert_tp: TensorParallel
    ep_rank: int
    local_experts: int
    qkv_split: QkvSplit = "qkv"
    tp_mode: TpMode = "whole"


def megatron_route(name: str, param: torch.Tensor, config: MuonConfig) -> Route:
    """Moonlight's rule plus Megatron's own tag for embeddings and the output head.

    An explicit ``muon_ds_route`` tag wins; otherwise a parameter Megatron marks
    ``is_embedding_or_output_parameter`` stays on AdamW whatever its name, and the rest
    follows ``route_param`` (name patterns, then ndim). The MoE router is a 2-D weight
    and goes to Muon unless the config's patterns say otherwise.
    """
    if getattr(param, ROUTE_ATTR, None) is None and getattr(
        param, "is_embedding_or_output_parameter", False
    ):
        return "adamw"
    return route_param(name, param, config)


def global_name(name: str, layout: ModelLayout) -> str:
    """An expert's weight becomes ``experts.{global id}.linear_fc{1,2}.weight``, whether
    SequentialMLP (``local_experts.{i}``) or TEGroupedMLP (``weight{i}``) holds it: EP
    ranks never collide, and both implementations give one matrix per expert. A single
    grouped 3-D weight keeps its name; its blocks carry the global expert ids."""
    match = _LOCAL_EXPERT.search(name)
    if match is not None:
        expert = layout.ep_rank * layout.local_experts + int(match.group(1))
        return f"{name[: match.start()]}.{expert}.{name[match.end() :]}"
    match = _TE_GROUPED_EXPERT.search(name)
    if match is not None:
        expert = layout.ep_rank * layout.local_experts + int(match.group(2))
        return f"{name[: match.start()]}.experts.{expert}.{match.group(1)}.weight"
    return name


def is_expert(param: torch.Tensor) -> bool:
    """Megatron marks parameters reduced over the expert-DP group with ``allreduce=False``."""
    return not getattr(param, "allreduce", True)


def tensor_parallel(param: torch.Tensor, layout: ModelLayout) -> TensorParallel:
    """The TP split of a Column/RowParallel weight (``partition_dim`` 0 or 1), if any."""
    group = layout.expert_tp if is_expert(param) else layout.tp
    if group.size == 1 or not getattr(param, "tensor_model_parallel", False):
        return NOT_SPLIT
    return TensorParallel(group.rank, group.size, param.partition_dim)


def row_blocks(
    name: str, param: torch.Tensor, tp: TensorParallel, layout: ModelLayout
) -> tuple[RowBlock, ...]:
    """Logical matrices inside a fused weight: QKV per query group, gated fc1 gate/up.

    ``tp`` is the weight's TP split (how many query groups each TP rank holds)."""
    rows = param.shape[0]
    # Blockwise, each TP rank's heads are matrices of their own: no keys across TP ranks.
    keys_tp = NOT_SPLIT if layout.tp_mode == "blockwise" else tp
    if name.endswith("linear_qkv.weight") and layout.qkv_split != "none":
        if layout.query_groups % tp.size:
            raise NotImplementedError(
                f"{name}: {layout.query_groups} query groups do not divide over TP size "
                f"{tp.size}; muon_ds splits QKV only when each TP rank holds whole groups"
            )
        local_groups = layout.query_groups // tp.size
        per_group = layout.heads // layout.query_groups
        if rows != local_groups * (per_group + 2) * layout.head_dim:
            raise NotImplementedError(
                f"{name}: {rows} rows are not {local_groups} groups x ({per_group} query + K + "
                f"V heads) x {layout.head_dim}; attention output gates and MLA are not supported"
            )
        return qkv_blocks(
            local_groups,
            per_group,
            layout.head_dim,
            per_head=layout.qkv_split == "per_head",
            tp=keys_tp,
        )
    if name.endswith("linear_fc1.weight") and layout.gated:
        return gated_blocks(rows)
    return ()


def shard_views(
    param_groups: Sequence[dict],
    model_params: Sequence[Sequence[torch.nn.Parameter]],
    param_ranges: Mapping[torch.nn.Parameter, tuple[int, int]],
    names: Mapping[torch.nn.Parameter, str],
    layout: ModelLayout,
) -> list[ShardView]:
    """This rank's Muon views: one per main-param shard, in ``param_groups`` order.

    ``param_groups`` are the inner optimizer's groups of main shards (each buffer is one
    shard, so every view has offset 0); ``model_params[i][j]`` is the model parameter of
    ``param_groups[i]["params"][j]`` and ``param_ranges`` its ``[start, end)`` in the
    flattened TP-local parameter.
    """
    views = []
    buffer = 0
    for group, models in zip(param_groups, model_params, strict=True):
        for model_param in models:
            if group["algorithm"] == "muon":
                name = global_name(names[model_param], layout)
                split = tensor_parallel(model_param, layout)
                tp = NOT_SPLIT if layout.tp_mode == "blockwise" else split
                start, end = param_ranges[model_param]
                expert = is_expert(model_param)
                if expert:
                    exchange = EXPERT_TP if tp.size > 1 else EXPERT
                else:
                    exchange = DENSE_TP if tp.size > 1 else DENSE
                if model_param.ndim == 3 and expert and _TE_SINGLE_GROUPED_EXPERTS.search(name):
                    experts, rows, cols = model_param.shape
                    matrix_shape = (experts * rows, cols)
                    blocks = _single_grouped_blocks(name, model_param, layout)
                else:
                    _refuse_unsplittable(name, model_param)
                    matrix_shape = (model_param.shape[0], model_param[0].numel())
                    blocks = row_blocks(name, model_param, split, layout)
                # Megatron marks gated fc1 stride 2: each TP rank holds [gate_t; up_t],
                # which is exactly the two row blocks.
                stride = getattr(model_param, "partition_stride", 1)
                if tp.size > 1 and stride not in (1, len(blocks)):
                    raise NotImplementedError(
                        f"{name}: TP partition_stride {stride} with {len(blocks)} row blocks "
                        "is a layout muon_ds does not know"
                    )
                views.append(
                    ShardView(
                        name=name,
                        matrix_shape=matrix_shape,
                        start=start,
                        end=end,
                        buffer=buffer,
                        offset=0,
                        route="muon",
                        tp=tp,
                        blocks=blocks,
                        group=exchange,
                    )
                )
            buffer += 1
    return views


def _single_grouped_blocks(
    name: str, param: torch.Tensor, layout: ModelLayout
) -> tuple[RowBlock, ...]:
    """A 3-D ``[experts, rows, cols]`` grouped weight: each expert's matrix (gate and up
    apart for a gated fc1), keyed by global expert so EP ranks' experts never merge."""
    experts = param.shape[0]
    if layout.expert_tp.size > 1:
        raise NotImplementedError(
            f"{name}: 3-D grouped expert weights with expert tensor parallelism (size "
            f"{layout.expert_tp.size}) are not supported; use --expert-tensor-parallel-size 1 "
            "or per-expert weights (SequentialMLP, or TEGroupedMLP without "
            "moe_single_grouped_weight)"
        )
    if experts != layout.local_experts:
        raise NotImplementedError(
            f"{name}: a 3-D grouped expert weight {tuple(param.shape)} holds {experts} "
            f"experts but this EP rank has {layout.local_experts} local experts"
        )
    return expert_blocks(
        experts * param.shape[1],
        experts,
        layout.ep_rank * layout.local_experts,
        gated=layout.gated and name.endswith("linear_fc1.weight"),
    )


def _refuse_unsplittable(name: str, param: torch.Tensor) -> None:
    """Layouts whose logical matrices these views cannot cut out: never train them wrong."""
    if _LEGACY_GROUPED_EXPERT.search(name):
        raise NotImplementedError(
            f"{name}: legacy GroupedMLP weights (all local experts in one tensor) are not "
            "supported; use --moe-grouped-gemm with Transformer Engine (TEGroupedMLP, one "
            "weight per expert) or SequentialMLP"
        )
    if param.ndim > 2:
        raise NotImplementedError(
            f"{name}: a {param.ndim}-D weight {tuple(param.shape)} is routed to Muon, but "
            "muon_ds does not know which matrices it holds (the 3-D weights it splits are "
            "TEGroupedMLP's single grouped experts.linear_fc1/2.weight); route it to AdamW with "
            "muon_ds.set_route(param, 'adamw') or an adamw pattern"
        )


__all__ = [
    "DENSE",
    "DENSE_TP",
    "EXPERT",
    "EXPERT_TP",
    "ModelLayout",
    "QkvSplit",
    "TpMode",
    "global_name",
    "megatron_route",
    "shard_views",
]
