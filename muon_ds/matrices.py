"""The logical matrices a group's shard views describe, and the pieces each rank holds.

Pure: views in, checked and cut into ``MatrixPlan``s without owners (the planner assigns
those). A fused parameter (QKV, gate/up, experts) becomes one matrix per row block; a
TP-split one becomes one logical matrix whose pieces come from every TP rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from muon_ds.layout import ShardView
from muon_ds.math.gram_newton_schulz import ns_flops


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
class Segment:
    """A rectangle of one matrix that a holder sends to the rank orthogonalising it.

    ``rows x width`` elements: at the holder from flat index ``lo`` of its TP-local tensor
    with row stride ``holder_stride``; at ``member`` from flat index ``staging`` of its
    staging buffer with row stride ``staging_stride``. The update comes back the same way.
    A whole-matrix owner's segments are its pieces (one row each).
    """

    matrix: int
    holder: int
    member: int
    tp_rank: int
    lo: int
    staging: int
    rows: int
    width: int
    holder_stride: int
    staging_stride: int

    @property
    def numel(self) -> int:
        return self.rows * self.width


@dataclass(frozen=True)
class Team:
    """The ranks orthogonalising one matrix together, each a block of its long side.

    Member ``members[j]`` holds long-side positions ``[cuts[j], cuts[j + 1])``: rows of a
    tall matrix (``rows > cols``), else columns; its staging buffer is that block of the
    logical matrix, row-major. Collectives per step (``muon_ds.math.team_newton_schulz``):
    one sum of the ``m x m`` Gram matrix's upper triangle (after one fp32 sum for the norm)
    and, in ``"split"`` mode, one gather of ``B``'s rows, in ascending rank order.
    """

    members: tuple[int, ...]
    cuts: tuple[int, ...]
    mode: str
    member_flops: tuple[int, ...]
    """Newton-Schulz FLOPs of each member, in ``members`` order."""
    sum_bytes: int
    """Bytes each member hands to the team sums per step of the optimizer (payload)."""
    gather_bytes: int
    """Bytes each member hands to the team gathers per step of the optimizer (payload)."""
    sums: int
    gathers: int
    """Collective calls per optimizer step."""

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class MatrixPlan:
    """One logical matrix: its shape, owner (or team), pieces and segments.

    A whole-matrix owner's staging buffer holds, TP rank after TP rank, that rank's blocks
    of the matrix row after row. With ``tp_dim == 0`` (or no TP) it is the matrix itself,
    ``[rows, cols]``; with ``tp_dim == 1`` it is ``[tp_size, rows, cols / tp_size]``. A
    team member's staging buffer is its block (``Team``). ``owner`` is the team's first
    member for a team matrix.
    """

    name: str
    key: int
    rows: int
    cols: int
    tp_size: int
    tp_dim: int
    owner: int
    flops: int
    """Newton-Schulz FLOPs of the matrix orthogonalised whole by one rank."""
    pieces: tuple[Piece, ...]
    team: Team | None = None
    segments: tuple[Segment, ...] = ()

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def is_local(self) -> bool:
        return self.team is None and all(p.holder == self.owner for p in self.pieces)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks orthogonalising it: its owner, or its team's members."""
        return self.team.members if self.team else (self.owner,)

    def flops_of(self, rank: int) -> int:
        """Newton-Schulz FLOPs ``rank`` spends on this matrix."""
        if self.team is None:
            return self.flops if rank == self.owner else 0
        if rank not in self.team.members:
            return 0
        return self.team.member_flops[self.team.members.index(rank)]


def logical_matrices(
    views_by_rank: Sequence[Sequence[ShardView]], ns_steps: int, ns_algorithm: str = "standard"
) -> list[MatrixPlan]:
    """Group views by parameter, check they tile it, cut it into matrices (no owners yet)."""
    by_name: dict[str, list[tuple[int, ShardView]]] = defaultdict(list)
    for rank, views in enumerate(views_by_rank):
        for view in views:
            if view.route == "muon":
                by_name[view.name].append((rank, view))
    matrices: list[MatrixPlan] = []
    for name in sorted(by_name):
        matrices += _split_param(name, by_name[name], ns_steps, ns_algorithm)
    return matrices


def _split_param(
    name: str, holders: list[tuple[int, ShardView]], ns_steps: int, ns_algorithm: str
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
        flops = ns_flops(rows, cols, ns_steps, ns_algorithm)
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
