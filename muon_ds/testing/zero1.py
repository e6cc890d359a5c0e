"""ZeRO-1's even element-wise partition, the layout tests and the scale model shard by.

DeepSpeed and Megatron both concatenate a group's parameters into one flat buffer, pad it
to a multiple of the data-parallel size and give each rank an equal contiguous range,
cutting through parameters wherever a boundary falls. The adapters read the real
partitions from the frameworks; this is the rule for code that has no framework at hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    """The part of one parameter a rank holds."""

    param: int
    """Index of the parameter in the sequence that was split."""

    start: int
    """First flat element of the parameter held (inclusive)."""

    end: int
    """Last flat element held, exclusive."""

    offset: int
    """Where ``start`` lies in the rank's shard."""


def shard_numel(total: int, ranks: int) -> int:
    """Elements per rank: the total rounded up to a multiple of ``ranks``, divided."""
    return -(-total // ranks)


def even_split(numels: Sequence[int], ranks: int) -> list[list[Slice]]:
    """Each rank's slices of the parameters (of ``numels`` elements) laid end to end."""
    per_rank = shard_numel(sum(numels), ranks)
    slices: list[list[Slice]] = [[] for _ in range(ranks)]
    position = 0
    for index, numel in enumerate(numels):
        first, last = position // per_rank, -(-(position + numel) // per_rank)
        for rank in range(first, min(ranks, last)):
            lo = max(rank * per_rank, position)
            hi = min((rank + 1) * per_rank, position + numel)
            if lo < hi:
                slices[rank].append(
                    Slice(index, lo - position, hi - position, lo - rank * per_rank)
                )
        position += numel
    return slices
