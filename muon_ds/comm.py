"""Runs a ``Plan`` with torch.distributed, counting every byte it moves.

One bucket is two ``all_to_all_single`` calls over the exchange group: holders send the
pieces of their momentum directions to owners (gather), owners send the orthogonalised
pieces back (scatter). Both are issued asynchronously, so while an owner runs
Newton-Schulz on one bucket the next bucket's gather is already in flight.

``all_ranks_finite`` is the other collective: the vote that skips a step on every rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from muon_ds.math import all_finite
from muon_ds.matrices import MatrixPlan, Piece
from muon_ds.plan import Plan


@dataclass
class CommCounter:
    """Bytes and calls of every collective muon_ds issues, and its Newton-Schulz work.

    ``bytes_sent[(op, group)]`` counts what this rank put on the wire to other ranks
    (its own slot of an all-to-all is not sent anywhere and is not counted).
    """

    bytes_sent: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    ns_matrices: int = 0
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
        self.ns_matrices = self.ns_flops = 0


Orthogonalize = Callable[[torch.Tensor], torch.Tensor]
"""Newton-Schulz of a ``[k, rows, cols]`` stack, as configured."""


@dataclass(frozen=True)
class Slot:
    """Elements ``[begin, end)`` of this rank's optimizer buffer ``buffer``."""

    buffer: int
    begin: int
    end: int


Deliver = Callable[[MatrixPlan, Slot, torch.Tensor], None]
"""Receives the orthogonal factor of one piece of a matrix that this rank holds."""


@dataclass(frozen=True)
class HeldRange:
    """Where this rank's flat range of one (TP-local) parameter lies in its buffers."""

    buffer: int
    """Index of the buffer holding it."""

    offset: int
    """Position of the range's first element in that buffer."""

    start: int
    """Flat index in the parameter of that first element."""


class Exchange:
    """Executes one group's plan on this rank.

    ``locate[(name, tp_rank)]`` tells where this rank's part of a parameter lives. The
    wire carries the momentum direction and the bare orthogonal factor in the
    Newton-Schulz dtype, so sharding rounds nothing the single-process path does not.
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
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.group = group
        self.group_name = group_name
        self.locate = locate
        self.wire_dtype = wire_dtype
        self.counter = counter
        self.transfers = [plan.gather(rank, b) for b in range(len(plan.buckets))]

    def run(
        self,
        directions: Sequence[torch.Tensor],
        orthogonalize: Orthogonalize,
        deliver: Deliver,
    ) -> None:
        """Orthogonalise every matrix once and ``deliver`` each piece this rank holds.

        ``directions`` are the per-buffer flat fp32 tensors of momentum directions;
        ``deliver(matrix, slot, values)`` gets the orthogonal factor for ``slot``, a
        ``(buffer, begin, end)`` range of this rank's buffers.
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
            outgoing: dict[Piece, torch.Tensor] = {}
            owned = plan.owned(self.rank, plan.buckets[b])
            self._orthogonalize_owned(owned, incoming, directions, orthogonalize, deliver, outgoing)
            scatters.append((b, *self._start_scatter(b, outgoing, directions[0].device)))
        for b, work, returned in scatters:
            work.wait()
            for piece, values in self._split(returned, self.transfers[b].send).items():
                matrix = plan.matrices[piece.matrix]
                deliver(matrix, self._slot_of(matrix.name, piece), values)

    def _slot_of(self, name: str, piece: Piece) -> Slot:
        run = self.locate[(name, piece.tp_rank)]
        begin = run.offset + piece.lo - run.start
        return Slot(run.buffer, begin, begin + piece.numel)

    def _piece_values(
        self, buffers: Sequence[torch.Tensor], name: str, piece: Piece
    ) -> torch.Tensor:
        slot = self._slot_of(name, piece)
        return buffers[slot.buffer][slot.begin : slot.end]

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
            self._piece_values(directions, self.plan.matrices[p.matrix].name, p)
            for pieces in transfer.send
            for p in pieces
        ]
        send = _concat(chunks, self.wire_dtype, directions[0].device)
        return self._all_to_all("muon_gather", send, transfer.send_counts(), transfer.recv_counts())

    def _start_scatter(
        self, bucket: int, outgoing: dict[Piece, torch.Tensor], device: torch.device
    ) -> tuple[dist.Work, torch.Tensor]:
        transfer = self.transfers[bucket]
        chunks = [outgoing[p] for pieces in transfer.recv for p in pieces]
        send = _concat(chunks, self.wire_dtype, device)
        return self._all_to_all(
            "muon_scatter", send, transfer.recv_counts(), transfer.send_counts()
        )

    @staticmethod
    def _split(flat: torch.Tensor, by_peer: Sequence[Sequence[Piece]]) -> dict[Piece, torch.Tensor]:
        pieces = [p for peer in by_peer for p in peer]
        chunks = flat.split([p.numel for p in pieces]) if pieces else []
        return dict(zip(pieces, chunks, strict=True))

    def _orthogonalize_owned(
        self,
        owned: list[int],
        incoming: dict[Piece, torch.Tensor],
        directions: Sequence[torch.Tensor],
        orthogonalize: Orthogonalize,
        deliver: Deliver,
        outgoing: dict[Piece, torch.Tensor],
    ) -> None:
        """Assemble, batch by shape, orthogonalise; deliver own pieces, queue the others."""
        by_shape: dict[tuple[int, int], list[MatrixPlan]] = {}
        for index in owned:
            matrix = self.plan.matrices[index]
            by_shape.setdefault((matrix.rows, matrix.cols), []).append(matrix)
        for group in by_shape.values():
            result = orthogonalize(self._assemble(group, incoming, directions))
            self.counter.ns_matrices += len(group)
            self.counter.ns_flops += sum(m.flops for m in group)
            for matrix, orthogonal in zip(group, result, strict=True):
                flat = _unstage(matrix, orthogonal.to(self.wire_dtype))
                for piece in matrix.pieces:
                    values = flat[piece.staging : piece.staging + piece.numel]
                    if piece.holder == self.rank:
                        deliver(matrix, self._slot_of(matrix.name, piece), values)
                    else:
                        outgoing[piece] = values

    def _assemble(
        self,
        group: list[MatrixPlan],
        incoming: dict[Piece, torch.Tensor],
        directions: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Same-shape matrices as one ``[k, rows, cols]`` stack in the wire dtype.

        Each piece is copied once, straight into its matrix's row of the stack (one
        conversion to the NS dtype); only TP column-split matrices need a second copy,
        to permute their TP blocks into the logical column order.
        """
        staging = torch.empty(
            len(group), group[0].numel, dtype=self.wire_dtype, device=directions[0].device
        )
        for matrix, row in zip(group, staging, strict=True):
            for piece in matrix.pieces:
                source = (
                    self._piece_values(directions, matrix.name, piece)
                    if piece.holder == self.rank
                    else incoming[piece]
                )
                row[piece.staging : piece.staging + piece.numel].copy_(source)
        if not any(_permuted(m) for m in group):
            return staging.view(len(group), group[0].rows, group[0].cols)
        return torch.stack([_stage(m, row) for m, row in zip(group, staging, strict=True)])


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


def _permuted(matrix: MatrixPlan) -> bool:
    """Whether staging order differs from the logical matrix's (TP-split columns)."""
    return matrix.tp_dim == 1 and matrix.tp_size > 1


def _stage(matrix: MatrixPlan, staging: torch.Tensor) -> torch.Tensor:
    """Flat staging buffer -> the logical matrix (a view for tp_dim 0, a copy for dim 1)."""
    if _permuted(matrix):
        local_cols = matrix.cols // matrix.tp_size
        return (
            staging.view(matrix.tp_size, matrix.rows, local_cols)
            .permute(1, 0, 2)
            .reshape(matrix.rows, matrix.cols)
        )
    return staging.view(matrix.rows, matrix.cols)


def _unstage(matrix: MatrixPlan, orthogonal: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_stage``: the logical matrix back to staging (flat) order."""
    if _permuted(matrix):
        local_cols = matrix.cols // matrix.tp_size
        return orthogonal.view(matrix.rows, matrix.tp_size, local_cols).permute(1, 0, 2).reshape(-1)
    return orthogonal.reshape(-1)


def _concat(chunks: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not chunks:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([c.to(dtype) for c in chunks])
