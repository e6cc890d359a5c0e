"""Owner teams: the cost of splitting one matrix's Newton-Schulz over k ranks, and the
rectangles that carry each member its block.

Pure, like the planner that uses it (``muon_ds.plan``). When one matrix's Newton-Schulz
is more than a rank's fair share, a team of ``k`` ranks on one node shares it
(``muon_ds.math.team_newton_schulz``): each member holds an equal block of the long side
and pays ``team_member_flops`` plus the team's ``m x m`` collectives. The planner weighs
those collectives as FLOPs at ``flops_per_byte`` (how many Newton-Schulz FLOPs a rank does
in the time one byte crosses the node's links: ``MuonConfig.team_flops_per_byte``), so
one number compares both.

A holder's pieces are flat ranges of the matrix in staging order; a member's block is a
band of rows (tall matrix) or columns (wide or square). ``segments`` cuts each piece into
the rectangles that fall in each member's band: at most three rectangles per piece (a
partial row, whole rows, a partial row), each cut by at most every band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from muon_ds.math.team_newton_schulz import TEAM_MODES, split_rows, team_member_flops
from muon_ds.matrices import MatrixPlan, Piece, Segment, Team

NORM_BYTES = 4
"""The fp32 sum of squares each member hands to the team once per step."""


@dataclass(frozen=True)
class TeamShape:
    """A matrix as a team sees it: short side ``m``, long side ``n``, and which is rows."""

    m: int
    n: int
    long_rows: bool

    @classmethod
    def of(cls, matrix: MatrixPlan) -> TeamShape:
        # Newton-Schulz transposes a tall matrix only (a square one stays as it is).
        long_rows = matrix.rows > matrix.cols
        return cls(min(matrix.rows, matrix.cols), max(matrix.rows, matrix.cols), long_rows)


def equal_cuts(n: int, k: int) -> tuple[int, ...]:
    """``k`` contiguous blocks of ``n`` positions, sizes differing by at most one."""
    return tuple(j * n // k for j in range(k + 1))


def team_cost(
    shape: TeamShape, k: int, mode: str, steps: int, wire_bytes: int, flops_per_byte: float
) -> tuple[list[int], int, int, float]:
    """(FLOPs of the member at each gather index, sum and gather payload bytes per member,
    the largest member's load in FLOPs with the ring traffic of its collectives added).

    Blocks are ``equal_cuts``; the load is an upper bound over which block a member gets.
    """
    widest = -(-shape.n // k)
    flops = [
        team_member_flops(shape.m, widest, _rows(shape.m, k, i), steps, mode) for i in range(k)
    ]
    triangle = shape.m * (shape.m + 1) // 2 * wire_bytes
    sum_bytes = NORM_BYTES + steps * triangle
    chunk = -(-shape.m // k) * shape.m * wire_bytes
    gather_bytes = steps * chunk if mode == "split" else 0
    wire = _ring(k, sum_bytes, gather_bytes)
    return flops, sum_bytes, gather_bytes, max(flops) + flops_per_byte * wire


def best_mode(
    shape: TeamShape, k: int, steps: int, wire_bytes: int, flops_per_byte: float
) -> tuple[str, float]:
    """The team mode with the lighter largest member, and that member's load."""
    loads = {
        mode: team_cost(shape, k, mode, steps, wire_bytes, flops_per_byte)[3] for mode in TEAM_MODES
    }
    mode = min(TEAM_MODES, key=lambda name: (loads[name], name))
    return mode, loads[mode]


def make_team(
    matrix: MatrixPlan,
    members: Sequence[int],
    mode: str,
    steps: int,
    wire_bytes: int,
) -> Team:
    """``members`` (group ranks, in band order) as a ``Team`` of ``matrix``, blocks equal."""
    shape = TeamShape.of(matrix)
    k = len(members)
    cuts = equal_cuts(shape.n, k)
    gather_order = sorted(members)
    flops = tuple(
        team_member_flops(
            shape.m,
            cuts[j + 1] - cuts[j],
            _rows(shape.m, k, gather_order.index(rank)),
            steps,
            mode,
        )
        for j, rank in enumerate(members)
    )
    _, sum_bytes, gather_bytes, _ = team_cost(shape, k, mode, steps, wire_bytes, 0.0)
    return Team(
        members=tuple(members),
        cuts=cuts,
        mode=mode,
        member_flops=flops,
        sum_bytes=sum_bytes,
        gather_bytes=gather_bytes,
        sums=steps + 1,
        gathers=steps if mode == "split" else 0,
    )


def ring_bytes(team: Team) -> float:
    """Bytes each member puts on the wire per step for ``team``'s collectives, as ring
    algorithms move them: 2 (k - 1) / k of a sum's payload, k - 1 chunks of a gather."""
    return _ring(team.size, team.sum_bytes, team.gather_bytes)


def _ring(k: int, sum_bytes: int, gather_bytes: int) -> float:
    return 2 * (k - 1) * sum_bytes / k + (k - 1) * gather_bytes


def _rows(m: int, k: int, index: int) -> int:
    lo, hi = split_rows(m, k, index)
    return hi - lo


# -- geometry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rect:
    """Logical rows ``[r0, r1)`` x columns ``[c0, c1)`` of a matrix, held contiguously by
    one rank: element ``(r0, c0)`` at flat ``lo`` of its TP-local tensor, rows ``stride``
    apart."""

    r0: int
    r1: int
    c0: int
    c1: int
    lo: int
    stride: int


def piece_rects(matrix: MatrixPlan, piece: Piece) -> list[Rect]:
    """The piece (a flat run in staging order) as at most three rectangles."""
    permuted = matrix.tp_dim == 1 and matrix.tp_size > 1
    width = matrix.cols // matrix.tp_size if permuted else matrix.cols
    first_col = piece.tp_rank * width if permuted else 0
    position = piece.staging - (piece.tp_rank * matrix.rows * width if permuted else 0)
    end, lo = position + piece.numel, piece.lo
    rects = []
    while position < end:
        row, col = divmod(position, width)
        if col == 0 and end - position >= width:
            rows = (end - position) // width
            rects.append(Rect(row, row + rows, first_col, first_col + width, lo, width))
            step = rows * width
        else:
            step = min(width - col, end - position)
            rects.append(Rect(row, row + 1, first_col + col, first_col + col + step, lo, width))
        position += step
        lo += step
    return rects


def band_overlap(matrix: MatrixPlan, rect: Rect, lo: int, hi: int) -> int:
    """Elements of ``rect`` inside the long-side band ``[lo, hi)``."""
    if TeamShape.of(matrix).long_rows:
        return max(0, min(rect.r1, hi) - max(rect.r0, lo)) * (rect.c1 - rect.c0)
    return max(0, min(rect.c1, hi) - max(rect.c0, lo)) * (rect.r1 - rect.r0)


def segments(index: int, matrix: MatrixPlan) -> tuple[Segment, ...]:
    """Every piece of ``matrix`` cut into the segments its owner or members receive."""
    if matrix.team is None:
        return tuple(
            Segment(
                index,
                p.holder,
                matrix.owner,
                p.tp_rank,
                p.lo,
                p.staging,
                1,
                p.numel,
                p.numel,
                p.numel,
            )
            for p in matrix.pieces
        )
    team = matrix.team
    long_rows = TeamShape.of(matrix).long_rows
    found = []
    for piece in matrix.pieces:
        for rect in piece_rects(matrix, piece):
            for j, member in enumerate(team.members):
                a, b = team.cuts[j], team.cuts[j + 1]
                if not band_overlap(matrix, rect, a, b):
                    continue
                if long_rows:
                    r0, r1 = max(rect.r0, a), min(rect.r1, b)
                    lo = rect.lo + (r0 - rect.r0) * rect.stride
                    staging, stride = (r0 - a) * matrix.cols + rect.c0, matrix.cols
                    rows, width = r1 - r0, rect.c1 - rect.c0
                else:
                    c0, c1 = max(rect.c0, a), min(rect.c1, b)
                    lo = rect.lo + c0 - rect.c0
                    staging, stride = rect.r0 * (b - a) + c0 - a, b - a
                    rows, width = rect.r1 - rect.r0, c1 - c0
                found.append(
                    Segment(
                        index,
                        piece.holder,
                        member,
                        piece.tp_rank,
                        lo,
                        staging,
                        rows,
                        width,
                        rect.stride,
                        stride,
                    )
                )
    return tuple(found)


def band_order(matrix: MatrixPlan, members: Sequence[int], cuts: Sequence[int]) -> list[int]:
    """``members`` ordered so band ``j`` goes to the member holding most of it (greedy,
    band by band; ties to the lower rank): the fewest elements move."""
    held: dict[int, list[Rect]] = {}
    for piece in matrix.pieces:
        if piece.holder in members:
            held.setdefault(piece.holder, []).extend(piece_rects(matrix, piece))
    free = sorted(members)
    order = []
    for j in range(len(members)):
        best = max(
            free,
            key=lambda r: (
                sum(band_overlap(matrix, rect, cuts[j], cuts[j + 1]) for rect in held.get(r, [])),
                -r,
            ),
        )
        order.append(best)
        free.remove(best)
    return order
