"""The one entry through which every optimizer orthogonalises: ``orthogonalize`` (whole
matrices) and ``orthogonalize_block`` (a team member's block).

``config.ns_backend`` picks the implementation: the fused Triton kernel
(``triton_newton_schulz``) or the torch reference of ``muon_ds.math``. The single-process
and the sharded optimizer never choose a path themselves. triton is optional: it is
imported only when the kernel is used, so muon_ds imports without it.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from muon_ds.config import MuonConfig
from muon_ds.device import gram_chain_dtype, resolve_ns_dtype
from muon_ds.math import newton_schulz
from muon_ds.math.gram_newton_schulz import gram_newton_schulz, uses_gram
from muon_ds.math.team_newton_schulz import TeamOps, team_newton_schulz


def orthogonalize(batch: torch.Tensor, config: MuonConfig) -> torch.Tensor:
    """Newton-Schulz of a ``[k, m, n]`` stack (or one ``[m, n]`` matrix) as ``config`` says,
    in ``config.ns_dtype`` resolved for the batch's device; through the Gram matrix where
    ``config.ns_algorithm`` says so for this shape (the planner counts the same FLOPs)."""
    dtype = resolve_ns_dtype(config.ns_dtype, batch.device)
    rows, cols = batch.shape[-2:]
    options = dict(
        steps=config.ns_steps, coefficients=config.ns_coefficients, eps=config.ns_eps, dtype=dtype
    )
    kernels = _kernels(batch) if _uses_kernel(batch, config, dtype) else None
    if uses_gram(rows, cols, config.ns_steps, config.ns_algorithm):
        gram = kernels.gram_newton_schulz_triton if kernels else gram_newton_schulz
        return gram(batch, **options, chain_dtype=gram_chain_dtype(dtype, batch.device))
    return (kernels.newton_schulz_triton if kernels else newton_schulz)(batch, **options)


def orthogonalize_block(
    block: torch.Tensor, team: TeamOps, mode: str, config: MuonConfig
) -> torch.Tensor:
    """This member's part of a team's Newton-Schulz (``muon_ds.math.team_newton_schulz``) of
    its wide block, in ``config.ns_dtype`` resolved for the block's device: the torch
    iteration ("standard"), whatever ``ns_algorithm`` and ``ns_backend`` say for whole
    matrices (the planner counts the same FLOPs)."""
    return team_newton_schulz(
        block,
        team,
        mode=mode,
        steps=config.ns_steps,
        coefficients=config.ns_coefficients,
        eps=config.ns_eps,
        dtype=resolve_ns_dtype(config.ns_dtype, block.device),
    )


def _uses_kernel(batch: torch.Tensor, config: MuonConfig, dtype: torch.dtype) -> bool:
    """Whether ``config.ns_backend`` selects the Triton kernels for ``batch`` in ``dtype``.

    ``auto`` takes them only where they pay: bf16 on a CUDA tensor, triton installed (in
    fp32 the kernels have no tensor-core path: fp32 is what "auto" resolves to on GPUs
    without bf16 tensor cores, and what tight tests force). ``triton`` insists, and also
    runs on the CPU when the kernel module was imported under TRITON_INTERPRET=1 (Triton's
    interpreter: how the tests run it).
    """
    if config.ns_backend == "auto":
        return batch.is_cuda and dtype == torch.bfloat16 and _triton_installed()
    return config.ns_backend == "triton"


def _kernels(batch: torch.Tensor) -> ModuleType:
    """The Triton Newton-Schulz module, or a clear error saying why it cannot run on
    ``batch``."""
    if not _triton_installed():
        raise RuntimeError(
            "ns_backend='triton' needs the triton package (pip install 'muon_ds[triton]'); "
            "use ns_backend='auto' or 'torch' to run the torch reference instead"
        )
    from muon_ds.kernels import triton_newton_schulz

    if not (batch.is_cuda or triton_newton_schulz.INTERPRETED):
        raise RuntimeError(
            f"ns_backend='triton' needs a CUDA tensor, got one on {batch.device}; set "
            "TRITON_INTERPRET=1 before importing muon_ds.kernels.triton_newton_schulz to run "
            "the kernel on the CPU (slow: for tests), or use ns_backend='auto' or 'torch'"
        )
    return triton_newton_schulz


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


__all__ = ["orthogonalize", "orthogonalize_block"]
