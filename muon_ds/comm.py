"""Runs a ``Plan`` with torch.distributed, counting every byte it moves.

One bucket is two ``all_to_all_single`` calls over the exchange group: holders send the
segments of their momentum directions to owners and team members (gather), these send the
orthogonalised segments back (scatter). Both are issued asynchronously, so while an owner
runs Newton-Schulz on one bucket the next bucket's gather is already in flight. A team
orthogonalises its matrix with collectives over its own process group, issued in the
plan's order (bucket, then matrix) on every rank, so no two teams can wait on each other.

``all_ranks_finite`` is the other collective: the vote that skips a step on every rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from muon_ds.math import all_finite
from muon_ds.math.team_newton_schulz import TeamOps
from muon_ds.matrices import MatrixPlan, Segment
from muon_ds.plan import Plan
from muon_ds.staging import HeldRange, Slot, permuted, stage, staged, unstage
from muon_ds.teams import TeamShape


@dataclass
class CommCounter:
    """Bytes and calls of every collective muon_ds issues, and its Newton-Schulz work.

    ``bytes_sent[(op, group)]`` counts what this rank put on the wire to other ranks
    (its own slot of an all-to-all is not sent anywhere and is not counted).
    """

    bytes_sent: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    ns_matrices: int = 0
    ns_team_blocks: int = 0
    """Team blocks orthogonalised (one per team this rank is in, per step)."""
    ns_flops: int = 0

    def record(self, op: str, group: str, nbytes: int) -> None:
        self.bytes_sent[(op, group)] += nbytes
        self.calls[(op, group)] += 1

    def exchange_bytes(self) -> int:
        """Bytes of the matrix exchange (gathers and scatters) only, every group."""
        return sum(n for (op, _), n in self.bytes_sent.items() if op.startswith("muon_"))

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()
        self.ns_matrices = self.ns_team_blocks = self.ns_flops = 0


Orthogonalize = Callable[[torch.Tensor], torch.Tensor]
"""Newton-Schulz of a ``[k, rows, cols]`` stack, as configured."""

OrthogonalizeBlock = Callable[[torch.Tensor, TeamOps, str], torch.Tensor]
"""Team Newton-Schulz of this member's wide block, with the team's ops, in a team mode."""


Deliver = Callable[[MatrixPlan, Slot, torch.Tensor], None]
"""Receives the orthogonal factor (``[rows, width]``) of one segment this rank holds."""


class Exchange:
    """Executes one group's plan on this rank.

    ``locate[(name, tp_rank)]`` tells where this rank's part of a parameter lives;
    ``members[i]`` is group rank i's global rank; ``team_groups`` holds a process group per
    team this rank is in, keyed by the team's global ranks, ascending. The wire carries the
    momentum direction and the bare orthogonal factor in the Newton-Schulz dtype, so
    sharding rounds nothing the single-process path does not.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        rank: int,
        group: dist.ProcessGroup | None,
        group_name: str,
        locate: dict[tuple[str, int], HeldRange],
        wire_dtype: torch.dtype,
        counter: CommCounter,
        members: Sequence[int] = (),
        team_groups: Mapping[tuple[int, ...], dist.ProcessGroup] | None = None,
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.group = group
        self.group_name = group_name
        self.locate = locate
        self.wire_dtype = wire_dtype
        self.counter = counter
        self.members = tuple(members)
        self.team_groups = dict(team_groups or {})
        self.transfers = [plan.gather(rank, b) for b in range(len(plan.buckets))]

    def run(
        self,
        directions: Sequence[torch.Tensor],
        orthogonalize: Orthogonalize,
        deliver: Deliver,
        orthogonalize_block: OrthogonalizeBlock | None = None,
    ) -> None:
        """Orthogonalise every matrix once and ``deliver`` each segment this rank holds.

        ``directions`` are the per-buffer flat fp32 tensors of momentum directions;
        ``deliver(matrix, slot, values)`` gets the orthogonal factor for ``slot``, a
        rectangle of this rank's buffers. ``orthogonalize_block`` runs this rank's part of
        a team's Newton-Schulz (needed when the plan has teams).
        """
        plan = self.plan
        pending = self._start_gather(0, directions) if plan.buckets else None
        self._orthogonalize_owned(
            plan.owned(self.rank, plan.local), {}, directions, orthogonalize, deliver, {}
        )
        scatters = []
        for b in range(len(plan.buckets)):
            assert pending is not None
            work, received = pending
            if b + 1 < len(plan.buckets):
                pending = self._start_gather(b + 1, directions)
            work.wait()
            incoming = self._split(received, self.transfers[b].recv)
            outgoing: dict[Segment, torch.Tensor] = {}
            owned = plan.owned(self.rank, plan.buckets[b])
            self._orthogonalize_owned(owned, incoming, directions, orthogonalize, deliver, outgoing)
            for index in plan.teamed(self.rank, plan.buckets[b]):
                assert orthogonalize_block is not None, "a plan with teams needs a block step"
                self._orthogonalize_block(
                    index, incoming, directions, orthogonalize_block, deliver, outgoing
                )
            scatters.append((b, *self._start_scatter(b, outgoing, directions[0].device)))
        for b, work, returned in scatters:
            work.wait()
            for segment, values in self._split(returned, self.transfers[b].send).items():
                matrix = plan.matrices[segment.matrix]
                deliver(matrix, self._slot_of(matrix.name, segment), values)

    def _slot_of(self, name: str, segment: Segment) -> Slot:
        run = self.locate[(name, segment.tp_rank)]
        begin = run.offset + segment.lo - run.start
        return Slot(run.buffer, begin, segment.rows, segment.width, segment.holder_stride)

    def _held_values(
        self, buffers: Sequence[torch.Tensor], name: str, segment: Segment
    ) -> torch.Tensor:
        slot = self._slot_of(name, segment)
        return slot.view(buffers[slot.buffer])

    def _all_to_all(
        self, op: str, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> tuple[dist.Work, torch.Tensor]:
        received = torch.empty(sum(recv_counts), dtype=self.wire_dtype, device=send.device)
        work = dist.all_to_all_single(
            received, send, recv_counts, send_counts, group=self.group, async_op=True
        )
        self.counter.record(op, self.group_name, send.numel() * send.element_size())
        return work, received

    def _start_gather(
        self, bucket: int, directions: Sequence[torch.Tensor]
    ) -> tuple[dist.Work, torch.Tensor]:
        transfer = self.transfers[bucket]
        chunks = [
            self._held_values(directions, self.plan.matrices[s.matrix].name, s)
            for segments in transfer.send
            for s in segments
        ]
        send = _pack(chunks, self.wire_dtype, directions[0].device)
        return self._all_to_all("muon_gather", send, transfer.send_counts(), transfer.recv_counts())

    def _start_scatter(
        self, bucket: int, outgoing: dict[Segment, torch.Tensor], device: torch.device
    ) -> tuple[dist.Work, torch.Tensor]:
        transfer = self.transfers[bucket]
        chunks = [outgoing[s] for segments in transfer.recv for s in segments]
        send = _pack(chunks, self.wire_dtype, device)
        return self._all_to_all(
            "muon_scatter", send, transfer.recv_counts(), transfer.send_counts()
        )

    @staticmethod
    def _split(
        flat: torch.Tensor, by_peer: Sequence[Sequence[Segment]]
    ) -> dict[Segment, torch.Tensor]:
        segments = [s for peer in by_peer for s in peer]
        chunks = flat.split([s.numel for s in segments]) if segments else []
        return {s: chunk.view(s.rows, s.width) for s, chunk in zip(segments, chunks, strict=True)}

    def _source(
        self,
        matrix: MatrixPlan,
        segment: Segment,
        incoming: dict[Segment, torch.Tensor],
        directions: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """A segment's direction values: this rank's own, or as received."""
        if segment.holder == self.rank:
            return self._held_values(directions, matrix.name, segment)
        return incoming[segment]

    def _orthogonalize_owned(
        self,
        owned: list[int],
        incoming: dict[Segment, torch.Tensor],
        directions: Sequence[torch.Tensor],
        orthogonalize: Orthogonalize,
        deliver: Deliver,
        outgoing: dict[Segment, torch.Tensor],
    ) -> None:
        """Assemble, batch by shape, orthogonalise; deliver own segments, queue the others."""
        by_shape: dict[tuple[int, int], list[MatrixPlan]] = {}
        for index in owned:
            matrix = self.plan.matrices[index]
            by_shape.setdefault((matrix.rows, matrix.cols), []).append(matrix)
        for group in by_shape.values():
            result = orthogonalize(self._assemble(group, incoming, directions))
            self.counter.ns_matrices += len(group)
            self.counter.ns_flops += sum(m.flops for m in group)
            for matrix, orthogonal in zip(group, result, strict=True):
                self._hand_out(
                    matrix, unstage(matrix, orthogonal.to(self.wire_dtype)), deliver, outgoing
                )

    def _orthogonalize_block(
        self,
        index: int,
        incoming: dict[Segment, torch.Tensor],
        directions: Sequence[torch.Tensor],
        orthogonalize_block: OrthogonalizeBlock,
        deliver: Deliver,
        outgoing: dict[Segment, torch.Tensor],
    ) -> None:
        """This rank's block of a team matrix: assemble, iterate with the team, hand out."""
        matrix = self.plan.matrices[index]
        team = matrix.team
        assert team is not None
        j = team.members.index(self.rank)
        width = team.cuts[j + 1] - team.cuts[j]
        long_rows = TeamShape.of(matrix).long_rows
        shape = (width, matrix.cols) if long_rows else (matrix.rows, width)
        block = torch.empty(shape, dtype=self.wire_dtype, device=directions[0].device)
        staging = block.view(-1)
        for segment in matrix.segments:
            if segment.member == self.rank:
                staged(staging, segment).copy_(self._source(matrix, segment, incoming, directions))
        ops = self._team_ops(team.members)
        wide = orthogonalize_block(block.mT if long_rows else block, ops, team.mode)
        result = (wide.mT if long_rows else wide).to(self.wire_dtype).contiguous()
        self.counter.ns_team_blocks += 1
        self.counter.ns_flops += team.member_flops[j]
        self._hand_out(matrix, result.view(-1), deliver, outgoing)

    def _hand_out(
        self,
        matrix: MatrixPlan,
        staging: torch.Tensor,
        deliver: Deliver,
        outgoing: dict[Segment, torch.Tensor],
    ) -> None:
        """Each segment this rank orthogonalised: delivered here or queued for its holder."""
        for segment in matrix.segments:
            if segment.member != self.rank:
                continue
            values = staged(staging, segment)
            if segment.holder == self.rank:
                deliver(matrix, self._slot_of(matrix.name, segment), values)
            else:
                outgoing[segment] = values

    def _team_ops(self, team: Sequence[int]) -> TeamOps:
        """The team's sum and gather over its process group, counted."""
        ranks = tuple(sorted(self.members[r] for r in team))
        group = self.team_groups[ranks]

        def sum_(tensor: torch.Tensor) -> None:
            dist.all_reduce(tensor, group=group)
            self.counter.record("team_sum", self.group_name, tensor.numel() * tensor.element_size())

        def gather_rows(part: torch.Tensor, out: torch.Tensor) -> None:
            dist.all_gather(list(out.chunk(len(ranks))), part, group=group)
            self.counter.record("team_gather", self.group_name, part.numel() * part.element_size())

        index = dist.get_group_rank(group, self.members[self.rank])
        return TeamOps(sum_, gather_rows, index, len(ranks))

    def _assemble(
        self,
        group: list[MatrixPlan],
        incoming: dict[Segment, torch.Tensor],
        directions: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Same-shape matrices as one ``[k, rows, cols]`` stack in the wire dtype.

        Each segment is copied once, straight into its matrix's row of the stack (one
        conversion to the NS dtype); only TP column-split matrices need a second copy,
        to permute their TP blocks into the logical column order.
        """
        staging = torch.empty(
            len(group), group[0].numel, dtype=self.wire_dtype, device=directions[0].device
        )
        for matrix, row in zip(group, staging, strict=True):
            for segment in matrix.segments:
                source = self._source(matrix, segment, incoming, directions)
                staged(row, segment).copy_(source)
        if not any(permuted(m) for m in group):
            return staging.view(len(group), group[0].rows, group[0].cols)
        return torch.stack([stage(m, row) for m, row in zip(group, staging, strict=True)])


def all_ranks_finite(
    tensors: Sequence[torch.Tensor], device: torch.device, counter: CommCounter | None = None
) -> bool:
    """Whether every rank's ``tensors`` hold no NaN and no Inf.

    One int32 MAX all-reduce over the world (none on a single process), made on ``device``
    (NCCL reduces CUDA tensors only), so every rank reaches the same verdict and skips a
    step together; ``counter`` records its bytes.
    """
    bad = (~all_finite(list(tensors))).to(device=device, dtype=torch.int32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if counter is not None:
            counter.record("finite_check", "world", bad.element_size())
    return not bool(bad.item())


def _pack(chunks: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[rows, width]`` chunks, flattened one after another into one ``dtype`` tensor
    (each copied and converted once)."""
    packed = torch.empty(sum(c.numel() for c in chunks), dtype=dtype, device=device)
    position = 0
    for chunk in chunks:
        packed[position : position + chunk.numel()].view(chunk.shape).copy_(chunk)
        position += chunk.numel()
    return packed
