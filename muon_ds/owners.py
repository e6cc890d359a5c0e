"""Who orthogonalises each matrix: one owner, or a team of ranks of one node.

Pure, part of the planner (``muon_ds.plan``): greedy longest-processing-time over the
matrices, largest first, each rank's load counted as Newton-Schulz FLOPs plus its team
collectives weighed at ``TeamOptions.flops_per_byte``; the team arithmetic and geometry
live in ``muon_ds.teams``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from dataclasses import dataclass

from muon_ds.matrices import MatrixPlan
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
class TeamOptions:
    """Whether and how the planner may split a matrix over a team of ranks."""

    max_size: int = 1
    """Largest team (``MuonConfig.owner_team_max``); 1: every matrix has one owner."""

    nodes: tuple[int, ...] = ()
    """Node of each group rank: a team's members share one. Empty: one node per rank."""

    flops_per_byte: float = 0.0
    """Newton-Schulz FLOPs one byte of team collective costs as much time as
    (``MuonConfig.team_flops_per_byte``)."""


def assign(
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
    assigner = functools.partial(
        _Assigner, matrices, prior, imbalance_limit, teams, steps, wire_bytes
    )
    narrow = assigner(widest=False)
    placed = narrow.run()
    if max(narrow.load) <= narrow.cap or not any(m.team for m in placed):
        return placed
    wide = assigner(widest=True)
    widened = wide.run()
    return widened if max(wide.load) < max(narrow.load) else placed


def _held(matrix: MatrixPlan) -> dict[int, int]:
    """Elements of ``matrix`` each holder holds."""
    held: dict[int, int] = defaultdict(int)
    for piece in matrix.pieces:
        held[piece.holder] += piece.numel
    return held


def _largest_holder(matrix: MatrixPlan) -> int:
    held = _held(matrix)
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
        held = _held(matrix)
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
