"""The pure planner: who orthogonalises which matrix, and what moves where.

Input: every rank's ``ShardView``s of one exchange group (DP, DP x TP, or expert-DP).
Output: a ``Plan`` that every rank computes identically from the same input:

* each logical matrix gets one *owner*, so Newton-Schulz runs once per matrix;
* owners are the rank holding most of the matrix (fewest bytes), unless that would push
  the rank's Newton-Schulz FLOPs past ``imbalance_limit`` x the mean, in which case the
  matrix goes where it fits (greedy longest-processing-time over FLOPs). A rank's FLOPs
  include what it already owns in other groups' plans (``prior_flops``; ``plan_groups``
  keeps that count in an ``NsLedger`` over every group of a model): an MoE rank owns
  dense matrices and experts, and only their sum is its Newton-Schulz time;
* a matrix whose owner holds all of it moves nothing (``Plan.local``); the others are
  packed, largest first, into buckets of at most ``bucket_bytes`` on the wire, so the next
  bucket's exchange overlaps this bucket's Newton-Schulz;
* the pieces (contiguous runs of a matrix held by one rank) and their order on the wire
  are fixed here, so the executor never negotiates and predicted bytes are exact.

No torch, no communication: testable alone, and cheap to run at every rank.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from muon_ds.layout import ShardView
from muon_ds.matrices import MatrixPlan, PlanError, Segment, logical_matrices
from muon_ds.teams import (
    TeamShape,
    band_order,
    best_mode,
    equal_cuts,
    make_team,
    ring_bytes,
    segments,
)


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


@dataclass(frozen=True)
class TeamOptions:
    """Whether and how the planner may split a matrix over a team of ranks."""

    max_size: int = 1
    """Largest team (``MuonConfig.owner_team_max``); 1: every matrix has one owner."""

    nodes: tuple[int, ...] = ()
    """Node of each group rank: a team's members share one. Empty: one node per rank."""

    flops_per_byte: float = 0.0
    """Newton-Schulz FLOPs one byte of team collective costs as much time as
    (``MuonConfig.team_flops_per_byte``)."""


def build_plan(
    views_by_rank: Sequence[Sequence[ShardView]],
    *,
    ns_steps: int,
    imbalance_limit: float,
    bucket_bytes: int,
    wire_bytes: int,
    prior_flops: Sequence[float] | None = None,
    ns_algorithm: str = "standard",
    teams: TeamOptions = TeamOptions(),
) -> Plan:
    """Plan the exchange of one group from every rank's Muon shard views.

    ``ns_algorithm`` (``MuonConfig.ns_algorithm``) decides each whole matrix's FLOPs.
    ``prior_flops[r]``: Newton-Schulz load group rank ``r`` already has from other plans,
    balanced against together with this group's (zeros when omitted).
    """
    world = len(views_by_rank)
    prior = list(prior_flops) if prior_flops is not None else [0] * world
    if len(prior) != world or any(f < 0 for f in prior):
        raise PlanError(f"prior_flops={prior} must hold one count >= 0 per rank ({world})")
    if teams.nodes and len(teams.nodes) != world:
        raise PlanError(f"nodes={teams.nodes} must name one node per rank ({world})")
    unowned = logical_matrices(views_by_rank, ns_steps, ns_algorithm)
    matrices = tuple(_assign(unowned, prior, imbalance_limit, teams, ns_steps, wire_bytes))
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


def _assign(
    matrices: list[MatrixPlan],
    prior: list[float],
    imbalance_limit: float,
    teams: TeamOptions,
    steps: int,
    wire_bytes: int,
) -> list[MatrixPlan]:
    """Owners and teams: smallest teams first; if that breaks the balance limit, every team
    as wide as its node allows (a narrow early team can leave no room for a later matrix),
    whichever leaves the most-loaded rank lighter."""
    narrow = _Assigner(matrices, prior, imbalance_limit, teams, steps, wire_bytes, widest=False)
    placed = narrow.run()
    if max(narrow.load) <= narrow.cap or not any(m.team for m in placed):
        return placed
    wide = _Assigner(matrices, prior, imbalance_limit, teams, steps, wire_bytes, widest=True)
    widened = wide.run()
    return widened if max(wide.load) < max(narrow.load) else placed


def _largest_holder(matrix: MatrixPlan) -> int:
    held: dict[int, int] = defaultdict(int)
    for piece in matrix.pieces:
        held[piece.holder] += piece.numel
    return min(held, key=lambda r: (-held[r], r))


class _Assigner:
    """Owners and teams, largest matrix first (greedy longest-processing-time).

    A matrix goes to the rank holding most of it unless that pushes the rank past
    ``cap`` (the imbalance limit times the mean load); else to the least busy rank if it
    fits there; else to the smallest team that fits (``widest``: the widest team), on
    the node holding most of it; else wherever the busiest rank it lands on ends lightest.
    A rank's busyness counts the matrices it holds most of that are still to be placed:
    taking another rank's matrix must not crowd out its own, which would then move too.
    """

    def __init__(
        self,
        matrices: list[MatrixPlan],
        prior: list[float],
        imbalance_limit: float,
        teams: TeamOptions,
        steps: int,
        wire_bytes: int,
        *,
        widest: bool,
    ) -> None:
        self.matrices = matrices
        self.world = len(prior)
        self.load = [float(f) for f in prior]
        # Work each rank will be offered as the largest holder of a matrix not yet placed:
        # a rank is only as free as what is left after its own matrices.
        self.reserved = [0.0] * self.world
        self.home = [_largest_holder(m) for m in matrices]
        for matrix, home in zip(matrices, self.home, strict=True):
            self.reserved[home] += matrix.flops
        self.cap = imbalance_limit * (sum(m.flops for m in matrices) + sum(prior)) / self.world
        self.options, self.steps, self.wire_bytes = teams, steps, wire_bytes
        self.by_node: dict[int, list[int]] = defaultdict(list)
        for rank, node in enumerate(teams.nodes or range(self.world)):
            self.by_node[node].append(rank)
        largest = min(teams.max_size, max(map(len, self.by_node.values())))
        self.sizes = [largest] if widest and largest > 1 else list(range(2, largest + 1))

    def run(self) -> list[MatrixPlan]:
        placed: list[MatrixPlan] = list(self.matrices)
        for i in sorted(range(len(placed)), key=lambda i: (-placed[i].flops, i)):
            placed[i] = self._place(i)
        return placed

    def _place(self, i: int) -> MatrixPlan:
        matrix = self.matrices[i]
        self.reserved[self.home[i]] -= matrix.flops
        held: dict[int, int] = defaultdict(int)
        for piece in matrix.pieces:
            held[piece.holder] += piece.numel
        by_locality = sorted(held, key=lambda r: (-held[r], self.load[r], r))
        fitting = [r for r in by_locality if self.load[r] + matrix.flops <= self.cap]
        if fitting:
            return self._own(i, fitting[0])
        solo = min(range(self.world), key=lambda r: (self._busy(r), -held.get(r, 0), r))
        best: tuple[float, tuple[list[int], str] | None] = (self._busy(solo) + matrix.flops, None)
        if best[0] <= self.cap:
            return self._own(i, solo)
        for k in self.sizes:
            mode, member_load = best_mode(
                TeamShape.of(matrix), k, self.steps, self.wire_bytes, self.options.flops_per_byte
            )
            members = self._members(held, k, member_load)
            if members is None:
                continue
            worst = max(self.load[r] for r in members) + member_load
            if worst <= self.cap:
                return self._team(i, members, mode)
            if worst < best[0]:
                best = (worst, (members, mode))
        return self._own(i, solo) if best[1] is None else self._team(i, *best[1])

    def _busy(self, rank: int) -> float:
        return self.load[rank] + self.reserved[rank]

    def _members(self, held: dict[int, int], k: int, member_load: float) -> list[int] | None:
        """``k`` ranks of one node for a team: the first node (most of the matrix first)
        where all fit under the cap, holders first; else the node where the most-loaded
        member ends lightest. None if no node has ``k`` ranks."""
        nodes = sorted(
            self.by_node, key=lambda n: (-sum(held.get(r, 0) for r in self.by_node[n]), n)
        )
        fallback: tuple[float, list[int]] | None = None
        for node in nodes:
            ranks = self.by_node[node]
            if len(ranks) < k:
                continue
            chosen = sorted(
                ranks,
                key=lambda r: (
                    self.load[r] + member_load > self.cap,
                    -held.get(r, 0),
                    self.load[r],
                    r,
                ),
            )[:k]
            worst = max(self.load[r] for r in chosen) + member_load
            if worst <= self.cap:
                return chosen
            if fallback is None or worst < fallback[0]:
                fallback = (worst, chosen)
        return None if fallback is None else fallback[1]

    def _own(self, i: int, owner: int) -> MatrixPlan:
        matrix = self.matrices[i]
        self.load[owner] += matrix.flops
        return self._finish(i, dataclasses.replace(matrix, owner=owner))

    def _team(self, i: int, members: list[int], mode: str) -> MatrixPlan:
        matrix = self.matrices[i]
        cuts = equal_cuts(TeamShape.of(matrix).n, len(members))
        team = make_team(
            matrix, band_order(matrix, members, cuts), mode, self.steps, self.wire_bytes
        )
        wire = self.options.flops_per_byte * ring_bytes(team)
        for rank, flops in zip(team.members, team.member_flops, strict=True):
            self.load[rank] += flops + wire
        return self._finish(i, dataclasses.replace(matrix, owner=team.members[0], team=team))

    @staticmethod
    def _finish(i: int, matrix: MatrixPlan) -> MatrixPlan:
        pieces = tuple(dataclasses.replace(p, matrix=i) for p in matrix.pieces)
        matrix = dataclasses.replace(matrix, pieces=pieces)
        return dataclasses.replace(matrix, segments=segments(i, matrix))
