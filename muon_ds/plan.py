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
from muon_ds.math.newton_schulz import newton_schulz_flops


class PlanError(ValueError):
    """The ranks' shard views do not describe a consistent sharding."""


@dataclass(frozen=True)
class Piece:
    """A contiguous run of one matrix's elements that one rank holds.

    ``[lo, hi)`` is a flat range of TP rank ``tp_rank``'s local tensor; ``staging`` is
    where the run lands in the owner's flat staging buffer of the matrix.
    """

    matrix: int
    holder: int
    tp_rank: int
    lo: int
    hi: int
    staging: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class MatrixPlan:
    """One logical matrix: its shape, owner and pieces.

    The owner's staging buffer holds, TP rank after TP rank, that rank's blocks of the
    matrix row after row. With ``tp_dim == 0`` (or no TP) it is the matrix itself,
    ``[rows, cols]``; with ``tp_dim == 1`` it is ``[tp_size, rows, cols / tp_size]``.
    """

    name: str
    key: int
    rows: int
    cols: int
    tp_size: int
    tp_dim: int
    owner: int
    flops: int
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def is_local(self) -> bool:
        return all(p.holder == self.owner for p in self.pieces)


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
) -> Plan:
    """Plan the exchange of one group from every rank's Muon shard views.

    ``prior_flops[r]``: Newton-Schulz FLOPs group rank ``r`` already owns in other plans,
    balanced against together with this group's (zeros when omitted).
    """
    world = len(views_by_rank)
    prior = list(prior_flops) if prior_flops is not None else [0] * world
    if len(prior) != world or any(f < 0 for f in prior):
        raise PlanError(f"prior_flops={prior} must hold one count >= 0 per rank ({world})")
    unowned = _logical_matrices(views_by_rank, ns_steps)
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
                )
            except PlanError as error:
                raise PlanError(f"group {name!r} (ranks {list(ranks)}): {error}") from None
            ledger.charge(ranks, plan)
            plans[name, ranks] = plan
    return plans


def _logical_matrices(
    views_by_rank: Sequence[Sequence[ShardView]], ns_steps: int
) -> list[MatrixPlan]:
    """Group views by parameter, check they tile it, cut it into matrices (no owners yet)."""
    by_name: dict[str, list[tuple[int, ShardView]]] = defaultdict(list)
    for rank, views in enumerate(views_by_rank):
        for view in views:
            if view.route == "muon":
                by_name[view.name].append((rank, view))
    matrices: list[MatrixPlan] = []
    for name in sorted(by_name):
        matrices += _split_param(name, by_name[name], ns_steps)
    return matrices


def _split_param(
    name: str, holders: list[tuple[int, ShardView]], ns_steps: int
) -> list[MatrixPlan]:
    first = holders[0][1]
    tp_size, tp_dim = first.tp.size, first.tp.dim
    rows_local, cols_local = first.matrix_shape
    blocks_by_tp: dict[int, tuple] = {}
    ranges_by_tp: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for rank, view in holders:
        if (view.matrix_shape, view.tp.size, view.tp.dim, view.group) != (
            first.matrix_shape,
            tp_size,
            tp_dim,
            first.group,
        ):
            raise PlanError(
                f"parameter {name!r}: rank {rank} describes it as matrix_shape="
                f"{view.matrix_shape}, tp size/dim={view.tp.size}/{view.tp.dim}, group="
                f"{view.group!r}, but rank {holders[0][0]} as {first.matrix_shape}, "
                f"{tp_size}/{tp_dim}, {first.group!r}; every rank must agree"
            )
        if not 0 <= view.tp.rank < tp_size:
            raise PlanError(f"parameter {name!r}: rank {rank} has tp rank {view.tp.rank}")
        blocks = view.matrix_blocks()
        if blocks_by_tp.setdefault(view.tp.rank, blocks) != blocks:
            raise PlanError(
                f"parameter {name!r}: ranks holding TP rank {view.tp.rank} disagree on its blocks"
            )
        ranges_by_tp[view.tp.rank].append((view.start, view.end, rank))

    numel = rows_local * cols_local
    for t in range(tp_size):
        _check_tiling(name, t, sorted(ranges_by_tp.get(t, [])), numel)
        _check_blocks(name, blocks_by_tp[t], rows_local)

    keys = sorted({b.key for blocks in blocks_by_tp.values() for b in blocks})
    matrices = []
    for key in keys:
        rows_by_tp = [
            sum(b.end - b.start for b in blocks_by_tp[t] if b.key == key) for t in range(tp_size)
        ]
        if tp_dim == 1 and len(set(rows_by_tp)) != 1:
            raise PlanError(
                f"parameter {name!r}: matrix {key} has {rows_by_tp} rows on the TP ranks; a "
                "row-parallel (tp dim 1) matrix needs the same rows on every TP rank"
            )
        if tp_dim == 1:
            rows, cols = rows_by_tp[0], cols_local * tp_size
        else:
            rows, cols = sum(rows_by_tp), cols_local
        pieces: list[Piece] = []
        staging = 0
        for t in range(tp_size):
            for block in blocks_by_tp[t]:
                if block.key != key:
                    continue
                lo, hi = block.start * cols_local, block.end * cols_local
                for start, end, rank in sorted(ranges_by_tp[t]):
                    a, b = max(lo, start), min(hi, end)
                    if a < b:
                        pieces.append(Piece(-1, rank, t, a, b, staging + a - lo))
                staging += hi - lo
        flops = newton_schulz_flops(rows, cols, ns_steps)
        matrices.append(
            MatrixPlan(name, key, rows, cols, tp_size, tp_dim, -1, flops, tuple(pieces))
        )
    return matrices


def _check_tiling(name: str, tp_rank: int, ranges: list[tuple[int, int, int]], numel: int) -> None:
    """The ranks' ranges of one TP-local tensor cover [0, numel) exactly once."""
    covered = 0
    for start, end, rank in ranges:
        if start != covered or end < start:
            what = "overlaps" if start < covered else "leaves a gap before"
            raise PlanError(
                f"parameter {name!r} (TP rank {tp_rank}): rank {rank}'s range [{start}, {end}) "
                f"{what} element {covered}; the ranks' ranges must tile [0, {numel}) exactly"
            )
        covered = end
    if covered != numel:
        raise PlanError(
            f"parameter {name!r} (TP rank {tp_rank}): elements [{covered}, {numel}) are held "
            "by no rank; the ranks' ranges must tile the whole parameter"
        )


def _check_blocks(name: str, blocks: tuple, rows: int) -> None:
    """Blocks are disjoint and cover every row, so every element is in one matrix."""
    covered = sorted((b.start, b.end) for b in blocks)
    position = 0
    for start, end in covered:
        if start != position or end <= start:
            break
        position = end
    if position != rows or len(covered) != len(blocks):
        raise PlanError(
            f"parameter {name!r}: row blocks {[(b.key, b.start, b.end) for b in blocks]} "
            f"must cover rows [0, {rows}) once, without overlap"
        )


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
