"""The pure planner: who orthogonalises which matrix, and what moves where.

Input: every rank's ``ShardView``s of one exchange group (DP, DP x TP, or expert-DP).
Output: a ``Plan`` that every rank computes identically from the same input:

* each logical matrix gets one *owner*, or a *team* of ranks of one node that share its
  Newton-Schulz (``muon_ds.owners``), so Newton-Schulz runs once per matrix;
* owners are the rank holding most of the matrix (fewest bytes), unless that would push
  the rank's Newton-Schulz load past ``imbalance_limit`` x the mean, in which case the
  matrix goes where it fits, or to a team when it fits on no one rank (greedy
  longest-processing-time). A rank's load includes what it already has from other
  groups' plans (``prior_flops``; ``plan_groups`` keeps that count in an ``NsLedger`` over
  every group of a model): an MoE rank owns dense matrices and experts, and only their
  sum is its Newton-Schulz time;
* a matrix whose owner holds all of it moves nothing (``Plan.local``); the others are
  packed, largest first, into buckets of at most ``bucket_bytes`` on the wire, so the next
  bucket's exchange overlaps this bucket's Newton-Schulz;
* the segments (rectangles of a matrix one rank holds and one rank orthogonalises), their
  order on the wire and every team collective are fixed here, so the executor never
  negotiates and predicted bytes, calls and FLOPs are exact.

No torch, no communication: testable alone, and cheap to run at every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from muon_ds.layout import ShardView
from muon_ds.matrices import MatrixPlan, PlanError, Segment, logical_matrices
from muon_ds.owners import TeamOptions, assign
from muon_ds.teams import ring_bytes


@dataclass(frozen=True)
class Transfer:
    """What one rank sends to and receives from each peer in one bucket, in wire order."""

    send: tuple[tuple[Segment, ...], ...]
    recv: tuple[tuple[Segment, ...], ...]

    def send_counts(self) -> list[int]:
        return [sum(s.numel for s in segments) for segments in self.send]

    def recv_counts(self) -> list[int]:
        return [sum(s.numel for s in segments) for segments in self.recv]


@dataclass(frozen=True)
class Plan:
    """The exchange plan of one group; identical on every rank of it."""

    world: int
    matrices: tuple[MatrixPlan, ...]
    local: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]

    def owned(self, rank: int, indices: Sequence[int]) -> list[int]:
        """The matrices of ``indices`` that ``rank`` orthogonalises whole."""
        return [
            i for i in indices if self.matrices[i].team is None and self.matrices[i].owner == rank
        ]

    def teamed(self, rank: int, indices: Sequence[int]) -> list[int]:
        """The matrices of ``indices`` whose team ``rank`` is in, in ``indices`` order."""
        return [i for i in indices if self.matrices[i].team and rank in self.matrices[i].ranks]

    def gather(self, rank: int, bucket: int) -> Transfer:
        """Segments ``rank`` sends (``send[d]``) and receives as owner or member (``recv[s]``).

        The scatter back is the same transfer reversed: what was received is sent back.
        Wire order inside a message is the bucket's matrix order, then segment order.
        """
        send: list[list[Segment]] = [[] for _ in range(self.world)]
        recv: list[list[Segment]] = [[] for _ in range(self.world)]
        for index in self.buckets[bucket]:
            for segment in self.matrices[index].segments:
                if segment.holder == segment.member:
                    continue
                if segment.holder == rank:
                    send[segment.member].append(segment)
                if segment.member == rank:
                    recv[segment.holder].append(segment)
        return Transfer(tuple(map(tuple, send)), tuple(map(tuple, recv)))

    def bytes_sent(self, rank: int, wire_bytes: int) -> int:
        """Bytes ``rank`` puts on the exchange per step: its segments to owners and team
        members, their updates back (team collectives: ``team_traffic``)."""
        moved = 0
        for m in self.matrices:
            for s in m.segments:
                if s.holder != s.member and rank in (s.holder, s.member):
                    moved += s.numel
        return moved * wire_bytes

    def team_traffic(self, rank: int) -> dict[str, tuple[int, int]]:
        """Per step, ``{"team_sum" | "team_gather": (calls, payload bytes)}`` of ``rank``'s
        team collectives (payload: what it hands each collective)."""
        teams = [m.team for m in self.matrices if m.team and rank in m.team.members]
        return {
            "team_sum": (sum(t.sums for t in teams), sum(t.sum_bytes for t in teams)),
            "team_gather": (sum(t.gathers for t in teams), sum(t.gather_bytes for t in teams)),
        }

    def ns_matrices(self, rank: int) -> int:
        """Matrices ``rank`` orthogonalises whole."""
        return len(self.owned(rank, range(len(self.matrices))))

    def ns_flops(self, rank: int) -> int:
        return sum(m.flops_of(rank) for m in self.matrices)

    def load(self, rank: int, flops_per_byte: float) -> float:
        """``rank``'s Newton-Schulz FLOPs plus its team collectives' ring bytes weighed at
        ``flops_per_byte``: what the planner balances."""
        wire = sum(ring_bytes(m.team) for m in self.matrices if m.team and rank in m.team.members)
        return self.ns_flops(rank) + flops_per_byte * wire

    def imbalance(self) -> float:
        """max / mean Newton-Schulz FLOPs over the group's ranks (1.0 is perfect)."""
        loads = [self.ns_flops(r) for r in range(self.world)]
        mean = sum(loads) / self.world
        return max(loads) / mean if mean else 1.0


def build_plan(
    views_by_rank: Sequence[Sequence[ShardView]],
    *,
    ns_steps: int,
    imbalance_limit: float,
    bucket_bytes: int,
    wire_bytes: int,
    prior_flops: Sequence[float] | None = None,
    ns_algorithm: str = "standard",
    teams: TeamOptions | None = None,
) -> Plan:
    """Plan the exchange of one group from every rank's Muon shard views.

    ``ns_algorithm`` (``MuonConfig.ns_algorithm``) decides each whole matrix's FLOPs.
    ``prior_flops[r]``: Newton-Schulz load group rank ``r`` already has from other plans,
    balanced against together with this group's (zeros when omitted).
    """
    world = len(views_by_rank)
    teams = teams or TeamOptions()
    prior = list(prior_flops) if prior_flops is not None else [0] * world
    if len(prior) != world or any(f < 0 for f in prior):
        raise PlanError(f"prior_flops={prior} must hold one count >= 0 per rank ({world})")
    if teams.nodes and len(teams.nodes) != world:
        raise PlanError(f"nodes={teams.nodes} must name one node per rank ({world})")
    unowned = logical_matrices(views_by_rank, ns_steps, ns_algorithm)
    matrices = tuple(assign(unowned, prior, imbalance_limit, teams, ns_steps, wire_bytes))
    # Largest first: the first bucket's exchange then hides behind the local matrices'
    # Newton-Schulz, and each later one behind the previous bucket's.
    order = sorted(range(len(matrices)), key=lambda i: (-matrices[i].flops, i))
    local = tuple(i for i in order if matrices[i].is_local)
    buckets: list[list[int]] = []
    filled = 0
    for i in order:
        if matrices[i].is_local:
            continue
        # A team whose members hold their blocks already moves nothing, yet needs a bucket.
        moved = wire_bytes * sum(s.numel for s in matrices[i].segments if s.holder != s.member)
        if not buckets or (filled + moved > bucket_bytes and filled > 0):
            buckets.append([])
            filled = 0
        buckets[-1].append(i)
        filled += moved
    return Plan(world, matrices, local, tuple(map(tuple, buckets)))


@dataclass
class NsLedger:
    """Newton-Schulz FLOPs per step each global rank owns, over every plan made so far.

    One ledger serves every plan of one model (DeepSpeed's param groups, Megatron's dense
    and expert optimizers, each exchange group), so owners balance each rank's total, the
    time its Newton-Schulz takes, not each group's share alone.
    """

    flops: dict[int, float] = dataclasses.field(default_factory=dict)
    """Global rank -> its Newton-Schulz load (``Plan.load``: FLOPs, team collectives
    weighed as FLOPs) (absent: none)."""

    def of(self, ranks: Sequence[int]) -> list[float]:
        return [self.flops.get(r, 0) for r in ranks]

    def charge(self, ranks: Sequence[int], plan: Plan, flops_per_byte: float) -> None:
        """Add what ``plan`` (over group ranks ``ranks``, in group order) loads each with."""
        for group_rank, global_rank in enumerate(ranks):
            load = plan.load(group_rank, flops_per_byte)
            self.flops[global_rank] = self.flops.get(global_rank, 0) + load


def experts_planned_first(owner_team_max: int) -> bool:
    """Whether an MoE model's expert matrices are planned before its dense ones.

    Each plan is greedy, largest matrix first, and balances against the load earlier plans
    left. With teams (``owner_team_max`` > 1) a dense matrix too big for one rank splits,
    so the experts, most of the work, go first and the dense matrices fill around them:
    planned first, with only the dense work to share, every dense matrix would look too
    big and form a team it does not need. Without teams the dense matrices, the largest
    whole ones, go first (longest processing time first).
    """
    return owner_team_max > 1


GroupViews = Mapping[str, Mapping[tuple[int, ...], Sequence[Sequence[ShardView]]]]
"""Exchange-group name -> member global ranks (group order) -> each member's views."""


def plan_groups(
    views: GroupViews,
    ledger: NsLedger,
    *,
    ns_steps: int,
    imbalance_limit: float,
    bucket_bytes: int,
    wire_bytes: int,
    ns_algorithm: str = "standard",
    max_team: int = 1,
    nodes: Mapping[int, int] | None = None,
    flops_per_byte: float = 0.0,
) -> dict[tuple[str, tuple[int, ...]], Plan]:
    """Plan every exchange group of a model, balancing against ``ledger`` and charging it.

    One name may hold several groups (the expert-DP group of each EP rank); each is
    planned alone. The order is fixed (names, then member tuples, sorted), so every rank
    that plans the same input charges the ledger identically and picks the same owners.
    ``nodes`` maps each global rank to its node (teams stay inside one); without it no
    two ranks share a node and every matrix has one owner.
    """
    plans = {}
    for name in sorted(views):
        for ranks in sorted(views[name]):
            try:
                plan = build_plan(
                    views[name][ranks],
                    ns_steps=ns_steps,
                    imbalance_limit=imbalance_limit,
                    bucket_bytes=bucket_bytes,
                    wire_bytes=wire_bytes,
                    prior_flops=ledger.of(ranks),
                    ns_algorithm=ns_algorithm,
                    teams=TeamOptions(
                        max_team,
                        tuple(nodes[r] for r in ranks) if nodes else (),
                        flops_per_byte,
                    ),
                )
            except PlanError as error:
                raise PlanError(f"group {name!r} (ranks {list(ranks)}): {error}") from None
            ledger.charge(ranks, plan, flops_per_byte)
            plans[name, ranks] = plan
    return plans
