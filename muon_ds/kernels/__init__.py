"""The one entry through which every optimizer orthogonalises: ``orthogonalize``.

Today it runs the torch reference of ``muon_ds.math``; the fused Triton kernel plugs in
here, so the single-process and the sharded optimizer never choose a path themselves.
"""

from __future__ import annotations

import torch

from muon_ds.config import MuonConfig
from muon_ds.math import newton_schulz

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def orthogonalize(batch: torch.Tensor, config: MuonConfig) -> torch.Tensor:
    """Newton-Schulz of a ``[k, m, n]`` stack (or one ``[m, n]`` matrix) as ``config`` says."""
    return newton_schulz(
        batch,
        steps=config.ns_steps,
        coefficients=config.ns_coefficients,
        eps=config.ns_eps,
        dtype=_DTYPES[config.ns_dtype],
    )


__all__ = ["orthogonalize"]
