"""What each scheme moves and computes per group rank.

muon_ds's plans, Moonlight's Algorithm 1 and Megatron's whole-matrix layout.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from benchmarks.scale_model.specs import MEGATRON_ALIGN
from muon_ds.plan import Plan
from muon_ds.teams import ring_bytes


@dataclass
class Cost:
    """Bytes sent between ranks (``flows[(src, dst)]``: the exchange; ``team_flows``: team
    collectives, with ``team_calls`` per rank) and Newton-Schulz FLOPs and calls per rank
    (a team member's block counts as a call)."""

    flows: dict[tuple[int, int], int]
    ns_flops: list[int]
    ns_calls: list[int]
    team_flows: dict[tuple[int, int], float] = field(default_factory=lambda: defaultdict(float))
    team_calls: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, ranks: int) -> Cost:
        return cls(defaultdict(int), [0] * ranks, [0] * ranks, defaultdict(float), [0] * ranks)


def muon_ds_cost(plan: Plan, wire_bytes: int) -> Cost:
    """The plan as executed: each segment off its owner or member goes there and comes
    back; a team's collectives run as rings over its members in rank order."""
    cost = Cost.empty(plan.world)
    for m in plan.matrices:
        for rank in m.ranks:
            cost.ns_flops[rank] += m.flops_of(rank)
            cost.ns_calls[rank] += 1
        for s in m.segments:
            if s.holder != s.member:
                cost.flows[(s.holder, s.member)] += wire_bytes * s.numel
                cost.flows[(s.member, s.holder)] += wire_bytes * s.numel
        if m.team:
            ring = sorted(m.team.members)
            for i, rank in enumerate(ring):
                cost.team_flows[(rank, ring[(i + 1) % len(ring)])] += ring_bytes(m.team)
                cost.team_calls[rank] += m.team.sums + m.team.gathers
    return cost


def algorithm1_cost(plan: Plan, tp: int, wire_bytes: int) -> Cost:
    """Moonlight's Algorithm 1 on the plan's pieces (owners ignored).

    Every holder of part of a TP-local matrix receives the other holders' pieces (DP
    gather); for a TP-split matrix each then receives the other TP ranks' parts from its
    TP peers (group rank ``t + tp * d``, same d); every holder runs the full NS.
    """
    cost = Cost.empty(plan.world)
    # What each holder sends to every other holder of its part, summed per holder set
    # before the pairs are written out: under per-param sharding every matrix has up to
    # hundreds of holders, and the same sets recur layer after layer.
    to_each: dict[tuple[int, tuple[int, ...]], int] = defaultdict(int)
    for m in plan.matrices:
        held: dict[int, int] = defaultdict(int)
        part_of: dict[int, int] = {}
        for p in m.pieces:
            held[p.holder] += p.numel
            part_of[p.holder] = p.tp_rank
        by_part: dict[int, list[int]] = defaultdict(list)
        for h in sorted(held):
            by_part[part_of[h]].append(h)
        holders = {part: tuple(ranks) for part, ranks in by_part.items()}
        for h, numel in held.items():
            cost.ns_flops[h] += m.flops
            cost.ns_calls[h] += 1
            to_each[(h, holders[part_of[h]])] += wire_bytes * numel
            if m.tp_size > 1:
                d = h // tp
                for t in range(tp):
                    if t != part_of[h]:
                        cost.flows[(h, t + tp * d)] += wire_bytes * m.numel // m.tp_size
    for (h, peers), nbytes in to_each.items():
        for peer in peers:
            if peer != h:
                cost.flows[(h, peer)] += nbytes
    return cost


@dataclass(frozen=True)
class WholeParam:
    """A param as Megatron's layer-wise layout places it: whole, on one DP rank."""

    name: str
    numel: int
    """TP-local elements."""
    tp_split: bool
    flops: int
    """NS FLOPs of its logical matrices (whole, after any TP gather)."""
    matrices: int


def whole_params(plans: Iterable[Plan], order: Sequence[str]) -> list[WholeParam]:
    """The params of ``plans``' matrices in model ``order``, with their NS work."""
    by_name: dict[str, list] = defaultdict(list)
    for plan in plans:
        for m in plan.matrices:
            by_name[m.name].append(m)
    return [
        WholeParam(
            name,
            sum(m.numel // m.tp_size for m in by_name[name]),
            by_name[name][0].tp_size > 1,
            sum(m.flops for m in by_name[name]),
            len(by_name[name]),
        )
        for name in order
        if name in by_name
    ]


@dataclass(frozen=True)
class MegatronLayout:
    shard_of: dict[str, int]
    loads: list[int]
    """Real elements per DP rank."""
    shard_size: int
    """Every rank's padded shard."""
    padding: int
    """Elements of the buffer that are no parameter's."""


def megatron_layout(params: Sequence[WholeParam], dp: int) -> MegatronLayout:
    """Megatron 0.19's LayerWiseDistributedOptimizer layout of one buffer, one bucket.

    Backprop order, largest first (a stable sort), each param to the least-loaded shard
    (lowest index on ties) at a 64-aligned start; shards padded to the largest, rounded
    to the shard divisor lcm(64, lcm(dp, 128) / dp).
    """
    cursors = [0] * dp
    loads = [0] * dp
    shard_of = {}
    for p in sorted(reversed(params), key=lambda p: -p.numel):
        shard = min(range(dp), key=lambda s: cursors[s])
        cursors[shard] = -(-cursors[shard] // MEGATRON_ALIGN) * MEGATRON_ALIGN + p.numel
        loads[shard] += p.numel
        shard_of[p.name] = shard
    divisor = math.lcm(MEGATRON_ALIGN, math.lcm(dp, 128) // dp)
    shard_size = -(-max(cursors) // divisor) * divisor
    return MegatronLayout(shard_of, loads, shard_size, dp * shard_size - sum(loads))


def megatron_cost(
    params: Sequence[WholeParam], layout: MegatronLayout, tp: int, wire_bytes: int
) -> Cost:
    """Per rank ``t + tp * d`` of the buffer's DP x TP grid: NS of every param on shard d,
    repeated on every TP rank, and the duplicated mode's TP all-gather of split params."""
    dp = len(layout.loads)
    cost = Cost.empty(dp * tp)
    for p in params:
        d = layout.shard_of[p.name]
        for t in range(tp):
            cost.ns_flops[t + tp * d] += p.flops
            cost.ns_calls[t + tp * d] += p.matrices
            if p.tp_split:
                for peer in range(tp):
                    if peer != t:
                        cost.flows[(t + tp * d, peer + tp * d)] += wire_bytes * p.numel
    return cost
