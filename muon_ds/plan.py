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
from muon_ds.matrices import MatrixPlan, Piece, PlanError, logical_matrices


@dataclass(frozen=True)
class Transfer:
    """What one rank sends to and receives from each peer in one bucket, in wire order."""

    send: tuple[tuple[Piece, ...], ...]
    recv: tuple[tuple[Piece, ...], ...]

    def send_counts(self) -> list[int]:
        return [sum(p.numel for p in pieces) for pieces in self.send]

    def recv_counts(self) -> list[int]:
        return [sum(p.numel for p in pieces) for pieces in self.recv]


@dataclass(frozen=True)
class Plan:
    """The exchange plan of one group; identical on every rank of it."""

    world: int
    matrices: tuple[MatrixPlan, ...]
    local: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]

    def owned(self, rank: int, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if self.matrices[i].owner == rank]

    def gather(self, rank: int, bucket: int) -> Transfer:
        """Pieces ``rank`` sends to owners (``send[d]``) and receives as owner (``recv[s]``).

        The scatter back is the same transfer reversed: what was received is sent back.
        Wire order inside a message is the bucket's matrix order, then piece order.
        """
        send: list[list[Piece]] = [[] for _ in range(self.world)]
        recv: list[list[Piece]] = [[] for _ in range(self.world)]
        for index in self.buckets[bucket]:
            matrix = self.matrices[index]
            for piece in matrix.pieces:
                if piece.holder == matrix.owner:
                    continue
                if piece.holder == rank:
                    send[matrix.owner].append(piece)
                if matrix.owner == rank:
                    recv[piece.holder].append(piece)
        return Transfer(tuple(map(tuple, send)), tuple(map(tuple, recv)))

    def bytes_sent(self, rank: int, wire_bytes: int) -> int:
        """Bytes ``rank`` puts on the wire per step: its pieces to owners, updates back."""
        moved = 0
        for m in self.matrices:
            for p in m.pieces:
                if p.holder != m.owner and rank in (p.holder, m.owner):
                    moved += p.numel
        return moved * wire_bytes

    def ns_matrices(self, rank: int) -> int:
        return sum(m.owner == rank for m in self.matrices)

    def ns_flops(self, rank: int) -> int:
        return sum(m.flops for m in self.matrices if m.owner == rank)

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
    prior_flops: Sequence[int] | None = None,
    ns_algorithm: str = "standard",
) -> Plan:
    """Plan the exchange of one group from every rank's Muon shard views.

    ``ns_algorithm`` (``MuonConfig.ns_algorithm``) decides each matrix's FLOPs.
    ``prior_flops[r]``: Newton-Schulz FLOPs group rank ``r`` already owns in other plans,
    balanced against together with this group's (zeros when omitted).
    """
    world = len(views_by_rank)
    prior = list(prior_flops) if prior_flops is not None else [0] * world
    if len(prior) != world or any(f < 0 for f in prior):
        raise PlanError(f"prior_flops={prior} must hold one count >= 0 per rank ({world})")
    unowned = logical_matrices(views_by_rank, ns_steps, ns_algorithm)
    owners = _assign_owners(unowned, prior, imbalance_limit)
    matrices = tuple(
        dataclasses.replace(
            m,
            owner=owners[i],
            pieces=tuple(dataclasses.replace(p, matrix=i) for p in m.pieces),
        )
        for i, m in enumerate(unowned)
    )
    # Largest first: the first bucket's exchange then hides behind the local matrices'
    # Newton-Schulz, and each later one behind the previous bucket's.
    order = sorted(range(len(matrices)), key=lambda i: (-matrices[i].flops, i))
    local = tuple(i for i in order if matrices[i].is_local)
    buckets: list[list[int]] = []
    filled = bucket_bytes
    for i in order:
        if matrices[i].is_local:
            continue
        moved = wire_bytes * sum(p.numel for p in matrices[i].pieces if p.holder != owners[i])
        if filled + moved > bucket_bytes and filled > 0:
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

    flops: dict[int, int] = dataclasses.field(default_factory=dict)
    """Global rank -> Newton-Schulz FLOPs it owns (absent: none)."""

    def of(self, ranks: Sequence[int]) -> list[int]:
        return [self.flops.get(r, 0) for r in ranks]

    def charge(self, ranks: Sequence[int], plan: Plan) -> None:
        """Add what ``plan`` (over group ranks ``ranks``, in group order) has each own."""
        for group_rank, global_rank in enumerate(ranks):
            self.flops[global_rank] = self.flops.get(global_rank, 0) + plan.ns_flops(group_rank)


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
) -> dict[tuple[str, tuple[int, ...]], Plan]:
    """Plan every exchange group of a model, balancing against ``ledger`` and charging it.

    One name may hold several groups (the expert-DP group of each EP rank); each is
    planned alone. The order is fixed (names, then member tuples, sorted), so every rank
    that plans the same input charges the ledger identically and picks the same owners.
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
                )
            except PlanError as error:
                raise PlanError(f"group {name!r} (ranks {list(ranks)}): {error}") from None
            ledger.charge(ranks, plan)
            plans[name, ranks] = plan
    return plans


def _assign_owners(
    matrices: list[MatrixPlan], prior: list[int], imbalance_limit: float
) -> list[int]:
    """Largest holder unless it overflows its share of FLOPs; else where it fits best."""
    world = len(prior)
    flops = [m.flops for m in matrices]
    limit = imbalance_limit * (sum(flops) + sum(prior)) / world
    load = list(prior)
    owners = [0] * len(matrices)
    for i in sorted(range(len(matrices)), key=lambda i: (-flops[i], i)):
        held: dict[int, int] = defaultdict(int)
        for piece in matrices[i].pieces:
            held[piece.holder] += piece.numel
        by_locality = sorted(held, key=lambda r: (-held[r], load[r], r))
        fitting = [r for r in by_locality if load[r] + flops[i] <= limit]
        if fitting:
            owner = fitting[0]
        else:
            owner = min(range(world), key=lambda r: (load[r], -held.get(r, 0), r))
        owners[i] = owner
        load[owner] += flops[i]
    return owners
