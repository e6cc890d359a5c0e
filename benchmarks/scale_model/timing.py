"""From counted bytes and FLOPs to time, at stated rates.

The optimizer's share of a training step, per scheme.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.scale_model.costs import (
    Cost,
    algorithm1_cost,
    megatron_cost,
    megatron_layout,
    muon_ds_cost,
    whole_params,
)
from benchmarks.scale_model.layouts import (
    Layout,
    adamw_elements,
    build_groups,
    check_layout,
    local_param,
    plan_muon_ds,
)
from benchmarks.scale_model.specs import (
    ADAMW_BYTES_PER_ELEMENT,
    MODELLED_BF16_UNITS,
    MUON_BYTES_PER_ELEMENT,
    Model,
    active_params,
    transformer_params,
)
from muon_ds.config import MuonConfig
from muon_ds.device import choose_ns_dtype


@dataclass(frozen=True)
class Rates:
    """Everything the time model assumes; printed with every run."""

    global_batch: int = 1024
    seq_len: int = 4096
    peak_tflops: float = 989.0
    mfu: float = 0.40
    ns_efficiency: float = 0.40
    nvlink_gbps: float = 450.0
    ib_gbps: float = 50.0
    hbm_tbps: float = 3.35
    gpus_per_node: int = 8
    collective_latency_us: float = 15.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ValueError(f"{field.name}={value} is not allowed: it must be > 0")
        for name in ("mfu", "ns_efficiency"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} is a fraction of peak: (0, 1]")

    def describe(self) -> list[str]:
        peak = self.peak_tflops
        return [
            f"global batch {self.global_batch} x seq {self.seq_len} = "
            f"{self.global_batch * self.seq_len:,} tokens per step",
            f"bf16 dense peak {peak:g} TFLOP/s per GPU; model MFU {self.mfu:.0%} "
            f"({self.mfu * peak:g} TFLOP/s); Newton-Schulz at {self.ns_efficiency:.0%} of peak "
            f"({self.ns_efficiency * peak:g} TFLOP/s)",
            f"NVLink {self.nvlink_gbps:g} GB/s per direction per GPU inside a node of "
            f"{self.gpus_per_node}; InfiniBand {self.ib_gbps:g} GB/s per direction per GPU "
            "between nodes",
            f"HBM {self.hbm_tbps:g} TB/s; elementwise update {MUON_BYTES_PER_ELEMENT} B per "
            f"Muon element, {ADAMW_BYTES_PER_ELEMENT} B per AdamW element",
            f"{self.collective_latency_us:g} us per team collective call, on top of its bytes",
        ]

    def team_flops_per_byte(self) -> float:
        """Newton-Schulz FLOPs per byte of NVLink: what the planner weighs team traffic at."""
        return self.ns_efficiency * self.peak_tflops * 1e12 / (self.nvlink_gbps * 1e9)


RATE_HELP = {
    "global_batch": "sequences per step over all GPUs",
    "seq_len": "tokens per sequence",
    "peak_tflops": "bf16 dense peak per GPU, TFLOP/s",
    "mfu": "model FLOPs utilisation of the training step, fraction of peak",
    "ns_efficiency": "Newton-Schulz throughput, fraction of peak",
    "nvlink_gbps": "intra-node bandwidth per GPU per direction, GB/s",
    "ib_gbps": "inter-node bandwidth per GPU per direction, GB/s",
    "hbm_tbps": "memory bandwidth for the elementwise update, TB/s",
    "gpus_per_node": "GPUs per node (TP and owner teams stay inside one)",
    "collective_latency_us": "fixed time of one team collective call, microseconds",
}


@dataclass
class GlobalCost:
    """One scheme's counts over every global rank."""

    flows: dict[tuple[int, int], int]
    ns_flops: list[int]
    ns_calls: list[int]
    elements: list[tuple[int, int]]
    """(Muon, AdamW) shard elements per rank."""
    team_flows: dict[tuple[int, int], float] = dataclasses.field(
        default_factory=lambda: defaultdict(float)
    )
    team_calls: dict[int, int] = dataclasses.field(default_factory=lambda: defaultdict(int))

    def add(self, cost: Cost, ranks: Sequence[int]) -> None:
        for (src, dst), nbytes in cost.flows.items():
            self.flows[(ranks[src], ranks[dst])] += nbytes
        for (src, dst), nbytes in cost.team_flows.items():
            self.team_flows[(ranks[src], ranks[dst])] += nbytes
        for i, r in enumerate(ranks):
            self.ns_flops[r] += cost.ns_flops[i]
            self.ns_calls[r] += cost.ns_calls[i]
            self.team_calls[r] += cost.team_calls[i] if cost.team_calls else 0


@dataclass(frozen=True)
class SchemeResult:
    optimizer_ms: float
    share: float
    exchange_ms: float
    team_ms: float
    ns_ms: float
    elementwise_ms: float
    """The four parts of the slowest rank's time."""
    max_bytes_sent: int
    max_inter_node_bytes_sent: int
    total_bytes_sent: int
    max_ns_tflop: float
    ns_redundancy: float
    """NS FLOPs over all ranks / each logical matrix's NS FLOPs once."""
    ns_call_redundancy: float
    ns_imbalance: float
    """max / mean NS FLOPs over ranks."""
    mean_ns_ms: float
    """NS time at the mean load: what perfect balance would give."""
    floor_ms: float
    """What no placement of the same shards can beat: each logical matrix's Newton-Schulz
    FLOPs once (at its ``ns_algorithm`` count; teams split FLOPs, never shed them) spread
    evenly over every rank, plus the mean elementwise update, with exchange and team
    traffic free. The slowest rank takes at least the mean rank's time, and that is at
    least this."""
    floor_share: float
    padding: float | None = None
    """Megatron: padding elements / parameter elements of its Muon buffers."""


def evaluate(
    cost: GlobalCost, rates: Rates, compute_s: float, logical_flops: int, logical_calls: int
) -> SchemeResult:
    world = len(cost.ns_flops)
    sent, seconds = _link_seconds(cost.flows, world, rates)
    _, team_seconds = _link_seconds(cost.team_flows, world, rates)
    ns_rate = rates.ns_efficiency * rates.peak_tflops * 1e12
    parts = []
    for r in range(world):
        exchange = seconds[r]
        team = team_seconds[r] + cost.team_calls[r] * rates.collective_latency_us * 1e-6
        muon, adamw = cost.elements[r]
        elementwise = (muon * MUON_BYTES_PER_ELEMENT + adamw * ADAMW_BYTES_PER_ELEMENT) / (
            rates.hbm_tbps * 1e12
        )
        total = exchange + team + cost.ns_flops[r] / ns_rate + elementwise
        parts.append((total, exchange, team, r, elementwise))
    total, exchange, team, slowest, elementwise = max(parts)
    mean_flops = sum(cost.ns_flops) / world
    mean_elementwise = sum(part[-1] for part in parts) / world
    floor = logical_flops / world / ns_rate + mean_elementwise
    return SchemeResult(
        optimizer_ms=1e3 * total,
        share=total / (compute_s + total),
        exchange_ms=1e3 * exchange,
        team_ms=1e3 * team,
        ns_ms=1e3 * cost.ns_flops[slowest] / ns_rate,
        elementwise_ms=1e3 * elementwise,
        max_bytes_sent=int(max(sum(s) for s in sent)),
        max_inter_node_bytes_sent=int(max(s[1] for s in sent)),
        total_bytes_sent=sum(cost.flows.values()),
        max_ns_tflop=max(cost.ns_flops) / 1e12,
        ns_redundancy=sum(cost.ns_flops) / logical_flops,
        ns_call_redundancy=sum(cost.ns_calls) / logical_calls,
        ns_imbalance=max(cost.ns_flops) / mean_flops if mean_flops else 1.0,
        mean_ns_ms=1e3 * mean_flops / ns_rate,
        floor_ms=1e3 * floor,
        floor_share=floor / (compute_s + floor),
    )


def _link_seconds(
    flows: dict[tuple[int, int], float], world: int, rates: Rates
) -> tuple[list[list[float]], list[float]]:
    """Bytes each rank sends [inside, across] nodes, and the seconds its links take: the
    larger of sent and received, per link class, at NVLink and InfiniBand speed."""
    node = [r // rates.gpus_per_node for r in range(world)]
    sent = [[0.0, 0.0] for _ in range(world)]
    recv = [[0.0, 0.0] for _ in range(world)]
    for (src, dst), nbytes in flows.items():
        link = int(node[src] != node[dst])
        sent[src][link] += nbytes
        recv[dst][link] += nbytes
    bandwidth = (rates.nvlink_gbps * 1e9, rates.ib_gbps * 1e9)
    seconds = [
        sum(max(sent[r][k], recv[r][k]) / bandwidth[k] for k in (0, 1)) for r in range(world)
    ]
    return sent, seconds


SCHEMES = ("muon_ds", "moonlight_alg1", "megatron_whole")


def model_layout(
    model: Model, layout: Layout, rates: Rates, config: MuonConfig
) -> dict[str, object]:
    """Every scheme's counts and times for one model on one layout."""
    check_layout(model, layout, rates.gpus_per_node)
    wire_bytes = choose_ns_dtype(config.ns_dtype, MODELLED_BF16_UNITS).itemsize
    specs = transformer_params(model)
    groups = build_groups(model, layout)
    config = dataclasses.replace(config, team_flops_per_byte=rates.team_flops_per_byte())
    plans, _ = plan_muon_ds(groups, config, wire_bytes, rates.gpus_per_node)
    world, tp, dp = layout.gpus, layout.tp, layout.dp

    # Each logical matrix once: TP copies of a replicated matrix are the same matrix.
    logical_flops = logical_calls = 0
    for g in groups:
        for plan in plans[g.name][: 1 if g.copies else None]:
            logical_flops += sum(m.flops for m in plan.matrices)
            logical_calls += len(plan.matrices)

    # AdamW params (TP rank 0's: every TP rank's have the same sizes) on each DP rank.
    adamw = [local_param(s, model, tp, 0) for s in specs if not s.muon]
    adamw_by_dp = adamw_elements(adamw, dp, layout.sharding)

    def shard_elements() -> list[list[int]]:
        elements = [[0, adamw_by_dp[r // tp]] for r in range(world)]
        for g in groups:
            for copy_views, replica in zip(g.views, g.replicas, strict=True):
                for i, views in enumerate(copy_views):
                    elements[replica[i]][0] += sum(v.numel for v in views)
        return elements

    def blank(elements: list[list[int]]) -> GlobalCost:
        return GlobalCost(defaultdict(int), [0] * world, [0] * world, [tuple(e) for e in elements])

    muon_ds = blank(shard_elements())
    alg1 = blank(shard_elements())
    for g in groups:
        group_tp = tp if g.name == "dense_tp" else 1
        for plan, replica in zip(plans[g.name], g.replicas, strict=True):
            muon_ds.add(muon_ds_cost(plan, wire_bytes), replica)
            alg1.add(algorithm1_cost(plan, group_tp, wire_bytes), replica)

    # Megatron: one layer-wise buffer for the dense Muon params (split or not), one for
    # each EP rank's experts; padding is what the layout adds to both.
    order = [s.name for s in specs]
    dense = whole_params([plans[n][0] for n in ("dense_tp", "dense") if n in plans], order)
    dense_layout = megatron_layout(dense, dp)
    adamw_shard = adamw_elements(adamw, dp, "zero1")[0]  # its distributed optimizer's
    megatron_elements = [[dense_layout.loads[r // tp], adamw_shard] for r in range(world)]
    padding, buffer_numel = dense_layout.padding * tp, sum(p.numel for p in dense) * tp
    megatron = GlobalCost(defaultdict(int), [0] * world, [0] * world, [])
    megatron.add(megatron_cost(dense, dense_layout, tp, wire_bytes), range(world))
    if "expert" in plans:
        expert_replicas = next(g for g in groups if g.name == "expert").replicas
        for plan, replica in zip(plans["expert"], expert_replicas, strict=True):
            experts = whole_params([plan], order)
            expert_layout = megatron_layout(experts, layout.expert_dp)
            megatron.add(megatron_cost(experts, expert_layout, 1, wire_bytes), replica)
            for j, r in enumerate(replica):
                megatron_elements[r][0] += expert_layout.loads[j]
            padding += expert_layout.padding
            buffer_numel += sum(p.numel for p in experts)
    megatron.elements = [tuple(e) for e in megatron_elements]

    n_active = active_params(model, specs)
    tokens_per_gpu = rates.global_batch * rates.seq_len / world
    compute_s = 6 * n_active * tokens_per_gpu / (rates.mfu * rates.peak_tflops * 1e12)
    results = {
        name: evaluate(cost, rates, compute_s, logical_flops, logical_calls)
        for name, cost in zip(SCHEMES, (muon_ds, alg1, megatron), strict=True)
    }
    results["megatron_whole"] = dataclasses.replace(
        results["megatron_whole"], padding=padding / buffer_numel
    )
    return {
        "model": model.key,
        "gpus": world,
        "tp": tp,
        "ep": layout.ep,
        "dp": dp,
        "sharding": layout.sharding,
        "expert_dp": layout.expert_dp if model.shape.experts else None,
        "layout": layout.label(),
        "params": sum(s.numel for s in specs),
        "active_params": n_active,
        "logical_matrices": logical_calls,
        "tokens_per_gpu": tokens_per_gpu,
        "compute_s": compute_s,
        "plans": {
            g.name: {
                "ranks": len(g.replicas[0]),
                "copies": len(g.replicas),
                "planned": len({id(p) for p in plans[g.name]}),
                "matrices": [len(p.matrices) for p in plans[g.name]],
                "local_matrices": [len(p.local) for p in plans[g.name]],
                "buckets": [len(p.buckets) for p in plans[g.name]],
            }
            for g in groups
        },
        "schemes": {name: dataclasses.asdict(r) for name, r in results.items()},
    }
