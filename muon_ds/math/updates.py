"""The Muon and AdamW update rules as pure tensor functions.

Both the single-process optimizer and the sharded one call these, on whole tensors or
on flat shard slices: everything here except the scale is elementwise, so it does not
care how a matrix is cut. Momentum is always fp32, whatever the parameter dtype.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
from torch.optim.adamw import adamw as _torch_adamw


def muon_direction(
    momentum: torch.Tensor, grad: torch.Tensor, *, mu: float, nesterov: bool
) -> torch.Tensor:
    """Update ``momentum`` in place (``M <- mu M + G``) and return what is orthogonalised.

    Moonlight's heavy-ball form, not the EMA (``lerp``) form of ``torch.optim.Muon``:
    the two differ by a factor (1 - mu) that Newton-Schulz normalises away.
    Returns ``G + mu M`` (Nesterov) or ``M``, in fp32.
    """
    grad = grad.to(momentum.dtype)
    momentum.mul_(mu).add_(grad)
    if nesterov:
        return grad.add(momentum, alpha=mu)
    return momentum.clone()


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2-D matrix a Muon parameter is orthogonalised as.

    ndim > 2 weights (conv kernels ``[out, in, k...]``, stacked blocks) are flattened to
    ``[shape[0], prod(shape[1:])]``: the first dim is the output, the rest its fan-in.
    """
    if len(shape) < 2:
        raise ValueError(f"a Muon matrix needs ndim >= 2, got shape {tuple(shape)}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def update_scale(rows: int, cols: int, mode: str) -> float:
    """Factor applied to the orthogonalised update of a rows x cols matrix.

    ``moonlight`` 0.2*sqrt(max(A, B)) gives the update the RMS of a typical AdamW update
    (about 0.2), so one lr and one wd serve both parts.
    """
    if mode == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    if mode == "keller":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "spectral":
        return math.sqrt(max(rows, cols))
    if mode == "none":
        return 1.0
    raise ValueError(
        f"scale_mode={mode!r} is not allowed: expected moonlight, keller, spectral or none"
    )


def apply_muon_update(
    param: torch.Tensor,
    orthogonal: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
) -> None:
    """``W <- W (1 - lr wd) - lr scale O``: decoupled decay with the unadjusted lr."""
    param.mul_(1.0 - lr * weight_decay)
    param.add_(orthogonal.to(param.dtype), alpha=-lr * scale)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: no NaN and no Inf in any of ``tensors`` (one sync when read)."""
    if not tensors:
        return torch.tensor(True)
    return torch.stack([t.isfinite().all() for t in tensors]).all()


MOMENTUM = "momentum_buffer"
"""State key of Muon's fp32 momentum, as in ``torch.optim``'s SGD and Muon."""


def ensure_state(
    state: MutableMapping[str, Any],
    param: torch.Tensor,
    algorithm: str,
    momentum_key: str = MOMENTUM,
) -> None:
    """Give ``param`` its fresh optimizer state for ``algorithm`` unless it has one.

    Muon: an fp32 momentum (whatever the param's dtype, so bf16 params do not round it);
    AdamW: ``adamw_state``. Every optimizer creates state through here, lazily at the first
    step or up front where a checkpoint must find tensors to load into.
    """
    if algorithm == "muon":
        if momentum_key not in state:
            state[momentum_key] = torch.zeros_like(param, dtype=torch.float32)
    elif not state:
        state.update(adamw_state(param))


def adamw_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh AdamW state for ``param``, laid out as ``torch.optim.AdamW`` lays it.

    The step count lives on the param's device where ``adamw_step`` takes torch's fused
    kernel, which reads it on the GPU (a CPU count there is a host pointer the kernel
    cannot read), and on the CPU otherwise. It is made by ``zeros``, not from a Python
    number: that would be a host-to-device copy, which waits for the GPU.
    """
    return {
        "step": torch.zeros(
            (), dtype=torch.float32, device=param.device if _fused([param]) else None
        ),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def _fused(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes ``params``: CUDA tensors of float dtypes."""
    return all(p.is_cuda for p in params) and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step through torch's own implementation (foreach, or fused on CUDA).

    Reusing torch's kernel keeps this part bit-identical to ``torch.optim.AdamW``.
    """
    if not params:
        return
    # A step count loaded onto the CPU (a checkpoint mapped there) would be a host
    # pointer inside the fused kernel: such a step takes torch's foreach path instead.
    fused = _fused(params) and all(step.is_cuda for step in steps)
    _torch_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=None if fused else False,
        fused=fused or None,
        amsgrad=False,
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
        capturable=False,
        differentiable=False,
        grad_scale=None,
        found_inf=None,
    )
