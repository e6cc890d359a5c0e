"""Parallel layouts and the shard views production builds for them.

Planned by production's own planner (``muon_ds.plan.plan_groups``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from benchmarks.scale_model.specs import Model, ParamSpec, transformer_params
from muon_ds.config import MuonConfig
from muon_ds.layout import NOT_SPLIT, RowBlock, ShardView, TensorParallel, gated_blocks, qkv_blocks
from muon_ds.plan import NsLedger, Plan, experts_planned_first, plan_groups
from muon_ds.testing.zero1 import even_split, shard_numel

DENSE_CORE, EXPERT_CORE = ("dense", "dense_tp"), ("expert",)
"""The groups each optimizer core of muon_ds's Megatron adapter plans."""

Sharding = Literal["zero1", "zero3", "fsdp2"]
SHARDINGS: tuple[str, ...] = get_args(Sharding)
SHARDING_NAMES = {"zero1": "ZeRO-1", "zero3": "ZeRO-3", "fsdp2": "FSDP2"}


@dataclass(frozen=True)
class Layout:
    """GPUs, TP and EP sizes, and how the framework shards each DP group's params.

    ``sharding``: "zero1" (one flat buffer split evenly, DeepSpeed ZeRO-1/2 and Megatron's
    distributed optimizer), "zero3" (DeepSpeed ZeRO-3: every param split on its own into
    flat ranges) or "fsdp2" (PyTorch FSDP2's ``Shard(0)``: every param split on its own
    into row ranges).
    """

    gpus: int
    tp: int = 1
    ep: int = 1
    sharding: Sharding = "zero1"

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding {self.sharding!r} is not one of {', '.join(SHARDINGS)}")

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def expert_dp(self) -> int:
        return self.gpus // self.ep

    def label(self) -> str:
        experts = f", EP{self.ep} (EDP{self.expert_dp})" * (self.ep > 1)
        return f"DP{self.dp}xTP{self.tp}{experts}, {SHARDING_NAMES[self.sharding]}"


def check_layout(model: Model, layout: Layout, gpus_per_node: int) -> None:
    """Refuse layouts the shards cannot describe, naming what is wrong and what is allowed."""
    s = model.shape
    problems = []
    if layout.gpus < 1 or layout.tp < 1 or layout.ep < 1:
        problems.append("gpus, tp and ep must be >= 1")
    elif layout.gpus % layout.tp or gpus_per_node % layout.tp:
        problems.append(f"tp={layout.tp} must divide gpus and gpus_per_node={gpus_per_node}")
    elif layout.gpus % layout.ep:
        problems.append(f"ep={layout.ep} must divide gpus={layout.gpus}")
    if layout.ep > 1 and (not s.experts or s.experts % layout.ep):
        problems.append(f"ep={layout.ep} must divide the {s.experts} routed experts")
    if layout.tp > 1:
        sizes = {"heads": s.heads, "ffn": s.ffn, "hidden": s.hidden}
        if model.mla is None:
            sizes["query_groups"] = s.query_groups
        if s.shared_experts:
            sizes["shared expert ffn"] = s.shared_experts * s.expert_ffn
        problems += [
            f"tp={layout.tp} must divide {k}={v}" for k, v in sizes.items() if v % layout.tp
        ]
    if problems:
        raise ValueError(f"{model.key} on {layout}: " + "; ".join(problems))


@dataclass(frozen=True)
class LocalParam:
    """A Muon param as one TP rank holds it: the ``ShardView`` fields that do not vary."""

    name: str
    matrix_shape: tuple[int, int]
    tp: TensorParallel
    blocks: tuple[RowBlock, ...]
    group: str


def local_param(spec: ParamSpec, model: Model, tp: int, tp_rank: int) -> LocalParam:
    rows, cols = spec.shape
    split = spec.tp_dim is not None and tp > 1
    if split:
        rows, cols = (rows // tp, cols) if spec.tp_dim == 0 else (rows, cols // tp)
    blocks: tuple[RowBlock, ...] = ()
    if spec.fused == "gated":
        blocks = gated_blocks(rows)
    elif spec.fused == "qkv":
        s = model.shape
        blocks = qkv_blocks(s.query_groups // tp, s.heads // s.query_groups, s.head_dim)
    group = "expert" if spec.expert is not None else "dense_tp" if split else "dense"
    tp_split = TensorParallel(tp_rank, tp, spec.tp_dim) if split else NOT_SPLIT
    return LocalParam(spec.name, (rows, cols), tp_split, blocks, group)


def _view(param: LocalParam, start: int, end: int, offset: int) -> ShardView:
    """Elements ``[start, end)`` of ``param``'s TP-local matrix, at ``offset`` in buffer 0."""
    return ShardView(
        param.name,
        param.matrix_shape,
        start,
        end,
        0,
        offset,
        tp=param.tp,
        blocks=param.blocks,
        group=param.group,
    )


def _numel(param: LocalParam) -> int:
    return param.matrix_shape[0] * param.matrix_shape[1]


def zero1_views(params: Sequence[LocalParam], ranks: int) -> list[list[ShardView]]:
    """ZeRO-1: the params concatenated into one flat buffer, split evenly over ``ranks``.

    Boundaries fall wherever the even split puts them, so a matrix straddles only the
    few ranks whose ranges meet it.
    """
    return [
        [_view(params[s.param], s.start, s.end, s.offset) for s in rank]
        for rank in even_split([_numel(p) for p in params], ranks)
    ]


def zero3_views(params: Sequence[LocalParam], ranks: int) -> list[list[ShardView]]:
    """DeepSpeed ZeRO-3: each param split on its own into flat ranges of
    ceil(numel / ranks) elements, rank r's from r times that, padding at the end.

    So every matrix of at least ``ranks`` elements spans all ranks. A rank's partition
    lays its ranges end to end, each in its padded size (DeepSpeed's ``grad_position``
    offsets into the sub-group's flat fp32 partition).
    """
    return _per_param_views(params, ranks, [1] * len(params))


def fsdp2_views(params: Sequence[LocalParam], ranks: int) -> list[list[ShardView]]:
    """PyTorch FSDP2's ``Shard(0)``: each param split on its own into ceil(rows / ranks)
    whole rows, rank r's from r times that (``torch.chunk``), of its TP-local matrix.

    Whole rows of the 2-D view are contiguous flat ranges, so the views are flat ranges
    as ZeRO-3's, cut at row boundaries. FSDP2 keeps each param's rows in its own tensor;
    here they lie end to end in one buffer, which changes no count.
    """
    return _per_param_views(params, ranks, [p.matrix_shape[1] for p in params])


def _per_param_views(
    params: Sequence[LocalParam], ranks: int, grain: Sequence[int]
) -> list[list[ShardView]]:
    """Each param cut on its own into ``ranks`` chunks of ceil(units / ranks) units of
    ``grain`` elements; a rank whose chunk is all padding holds no view of that param."""
    views: list[list[ShardView]] = [[] for _ in range(ranks)]
    offset = 0
    for param, unit in zip(params, grain, strict=True):
        numel = _numel(param)
        chunk = shard_numel(numel // unit, ranks) * unit
        for rank in range(min(ranks, -(-numel // chunk))):
            views[rank].append(_view(param, rank * chunk, min(numel, (rank + 1) * chunk), offset))
        offset += chunk
    return views


SHARDERS: dict[str, Callable[[Sequence[LocalParam], int], list[list[ShardView]]]] = {
    "zero1": zero1_views,
    "zero3": zero3_views,
    "fsdp2": fsdp2_views,
}
"""Each sharding's views of a DP group's params."""


def adamw_elements(params: Sequence[LocalParam], ranks: int, sharding: Sharding) -> list[int]:
    """The AdamW elements each rank's optimizer steps.

    DeepSpeed steps its whole flat partition, padding included: ZeRO-1's even shard, or
    ZeRO-3's padded range of every param. FSDP2's local tensors hold only real rows.
    """
    if sharding == "fsdp2":
        return [sum(v.numel for v in views) for views in fsdp2_views(params, ranks)]
    numels = [_numel(p) for p in params]
    if sharding == "zero3":
        return [sum(shard_numel(n, ranks) for n in numels)] * ranks
    return [shard_numel(sum(numels), ranks)] * ranks


@dataclass(frozen=True)
class Group:
    """One exchange group: every copy's views and global ranks.

    Copy ``k``'s group rank ``i`` holds ``views[k][i]`` and is global rank
    ``replicas[k][i]``. ``copies`` says the copies hold the same matrices (TP copies of
    replicated params, sharing one views object) rather than different ones (the experts
    of different EP ranks).
    """

    name: str
    views: tuple[tuple[tuple[ShardView, ...], ...], ...]
    replicas: tuple[tuple[int, ...], ...]
    copies: bool


def build_groups(model: Model, layout: Layout) -> list[Group]:
    """The exchange groups of ``layout``, every copy with its own views."""
    specs = [s for s in transformer_params(model) if s.muon]
    tp, dp, ep = layout.tp, layout.dp, layout.ep
    groups = []
    # Dense buffer: TP rank t's dense Muon params; its DP rank d is global rank t + tp * d.
    shard = SHARDERS[layout.sharding]
    by_tp = [
        shard([local_param(s, model, tp, t) for s in specs if s.expert is None], dp)
        for t in range(tp)
    ]
    tp_split = tuple(
        tuple(v for v in by_tp[t][d] if v.group == "dense_tp") for d in range(dp) for t in range(tp)
    )
    if any(tp_split):
        groups.append(Group("dense_tp", (tp_split,), (tuple(range(layout.gpus)),), copies=False))
    # Every TP rank's buffer has the same TP-local sizes, so its replicated params sit at
    # the same places: TP rank 0's views are every TP rank's.
    whole = tuple(tuple(v for v in by_tp[0][d] if v.group == "dense") for d in range(dp))
    if any(whole):
        replicas = tuple(tuple(t + tp * d for d in range(dp)) for t in range(tp))
        groups.append(Group("dense", (whole,) * tp, replicas, copies=True))
    if model.shape.experts:
        local = model.shape.experts // ep
        views = tuple(
            tuple(
                map(
                    tuple,
                    shard(
                        [
                            local_param(s, model, 1, 0)
                            for s in specs
                            if s.expert is not None and s.expert // local == e
                        ],
                        layout.expert_dp,
                    ),
                )
            )
            for e in range(ep)
        )
        replicas = tuple(tuple(e + ep * j for j in range(layout.expert_dp)) for e in range(ep))
        groups.append(Group("expert", views, replicas, copies=False))
    return groups


def plan_muon_ds(
    groups: Sequence[Group], config: MuonConfig, wire_bytes: int, gpus_per_node: int = 8
) -> tuple[dict[str, list[Plan]], list[float]]:
    """Every copy of every group planned by production's own ``plan_groups``.

    One ledger per model, as muon_ds's Megatron adapter keeps: one core plans "expert", the
    other "dense" then "dense_tp" (sorted names), the experts' first when teams are on
    (``muon_ds.plan.experts_planned_first``); each group's copies in sorted order of their
    global ranks, each plan balanced against the Newton-Schulz load its ranks already have.
    Teams (``config.owner_team_max``) stay inside nodes of ``gpus_per_node`` consecutive
    ranks.
    Returns each group's plans in ``replicas`` order and the ledger (load per global rank).
    """
    world = 1 + max(r for g in groups for ranks in g.replicas for r in ranks)
    ledger = NsLedger()
    planned = {}
    experts_first = experts_planned_first(config.owner_team_max)
    for core in (EXPERT_CORE, DENSE_CORE) if experts_first else (DENSE_CORE, EXPERT_CORE):
        planned |= plan_groups(
            {g.name: dict(zip(g.replicas, g.views, strict=True)) for g in groups if g.name in core},
            ledger,
            ns_steps=config.ns_steps,
            ns_algorithm=config.ns_algorithm,
            imbalance_limit=config.owner_imbalance_limit,
            bucket_bytes=int(config.exchange_bucket_mb * 2**20),
            wire_bytes=wire_bytes,
            max_team=config.owner_team_max,
            nodes={r: r // gpus_per_node for r in range(world)},
            flops_per_byte=config.team_flops_per_byte,
        )
    plans = {g.name: [planned[g.name, ranks] for ranks in g.replicas] for g in groups}
    return plans, ledger.of(range(world))
