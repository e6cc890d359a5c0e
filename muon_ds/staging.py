"""Where a matrix's elements sit on each side of the exchange.

At a holder: a ``Slot`` of its flat optimizer buffers (found through a ``HeldRange`` of
each parameter). At an owner or team member: its flat staging buffer, where a
whole-matrix owner keeps TP column blocks in TP order (``stage`` / ``unstage`` give the
logical matrix and back) and a member keeps its block row-major. A segment is a
``rows x width`` rectangle on both sides (``rectangle``, ``staged``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from muon_ds.matrices import MatrixPlan, Segment


@dataclass(frozen=True)
class HeldRange:
    """Where this rank's flat range of one (TP-local) parameter lies in its buffers."""

    buffer: int
    """Index of the buffer holding it."""

    offset: int
    """Position of the range's first element in that buffer."""

    start: int
    """Flat index in the parameter of that first element."""


@dataclass(frozen=True)
class Slot:
    """A ``rows x width`` rectangle of this rank's optimizer buffer ``buffer``: from flat
    element ``begin``, rows ``stride`` apart (one row: a plain range)."""

    buffer: int
    begin: int
    rows: int
    width: int
    stride: int

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The rectangle of the flat tensor ``flat``, as a ``[rows, width]`` view."""
        return rectangle(flat, self.begin, self.rows, self.width, self.stride)


def permuted(matrix: MatrixPlan) -> bool:
    """Whether staging order differs from the logical matrix's (TP-split columns)."""
    return matrix.tp_dim == 1 and matrix.tp_size > 1


def stage(matrix: MatrixPlan, staging: torch.Tensor) -> torch.Tensor:
    """Flat staging buffer -> the logical matrix (a view for tp_dim 0, a copy for dim 1)."""
    if permuted(matrix):
        local_cols = matrix.cols // matrix.tp_size
        return (
            staging.view(matrix.tp_size, matrix.rows, local_cols)
            .permute(1, 0, 2)
            .reshape(matrix.rows, matrix.cols)
        )
    return staging.view(matrix.rows, matrix.cols)


def unstage(matrix: MatrixPlan, orthogonal: torch.Tensor) -> torch.Tensor:
    """Inverse of ``stage``: the logical matrix back to staging (flat) order."""
    if permuted(matrix):
        local_cols = matrix.cols // matrix.tp_size
        return orthogonal.view(matrix.rows, matrix.tp_size, local_cols).permute(1, 0, 2).reshape(-1)
    return orthogonal.reshape(-1)


def rectangle(flat: torch.Tensor, begin: int, rows: int, width: int, stride: int) -> torch.Tensor:
    """``rows x width`` elements of the flat tensor ``flat`` from ``begin``, rows ``stride``
    apart, as a view."""
    span = flat[begin : begin + (rows - 1) * stride + width]
    return span.as_strided((rows, width), (stride, 1))


def staged(staging: torch.Tensor, segment: Segment) -> torch.Tensor:
    """Where ``segment`` lies in its owner's or member's flat staging buffer (a view)."""
    return rectangle(staging, segment.staging, segment.rows, segment.width, segment.staging_stride)
