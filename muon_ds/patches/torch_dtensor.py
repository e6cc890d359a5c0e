"""The one read of torch's DTensor internals ``muon_ds.fsdp2`` needs, guarded like every patch.

``strided_shard``
    ``torch.distributed.tensor.placement_types._StridedShard`` (its ``dim`` and
    ``split_factor``): the placement FSDP2 gives the data-parallel mesh dim of a parameter
    whose rows tensor parallelism has already split (``ColwiseParallel``). That dim then
    shards the rows of each TP rank's chunk, not the parameter's rows: rank ``(d, t)`` holds
    chunk ``d`` of TP chunk ``t``, where a plain ``Shard(0)`` there would mean chunk ``t``
    of chunk ``d``. Read in torch 2.14, where the class is private and not a ``Shard``.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import placement_types

from muon_ds.patches import require_attribute, require_version

TORCH_RANGE = ("2.14", "2.15")
"""``[low, below)`` of the torch versions ``strided_shard`` was read in and tested with."""


def strided_shard(placement: Any) -> tuple[int, int] | None:
    """``(dim, split_factor)`` of a ``_StridedShard`` placement; ``None`` for any other."""
    strided = getattr(placement_types, "_StridedShard", None)
    if strided is None or not isinstance(placement, strided):
        return None
    patch = "muon_ds.patches.torch_dtensor.strided_shard"
    require_version("torch", *TORCH_RANGE, patch)
    dim = require_attribute(placement, "dim", patch)
    return int(dim), int(require_attribute(placement, "split_factor", patch))


__all__ = ["TORCH_RANGE", "strided_shard"]
