"""Test-only CUDA stand-ins that let Megatron-core 0.19.2 run on CPU gloo ranks.

Megatron's DDP, distributed optimizer and grad clipping call CUDA APIs or hard-code
``device='cuda'`` (see ENVIRONMENT.md, "Megatron-core on CPU"). These six shims redirect
exactly those calls; muon_ds itself never needs them. ``install()`` patches torch
process-wide, so call it only inside spawned test ranks, never in the pytest process.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


class _Stream:
    """What Megatron calls on ``torch.cuda.current_stream()`` during grad sync."""

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> None:
        pass


def _on_cpu(factory: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


def install() -> None:
    """Apply the six shims; each rank calls it once, before building any Megatron object."""
    from megatron.core.tensor_parallel import random

    # 1. DDP buffers, RoPE and TP buffers allocate on torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"
    # 2. Literal device='cuda' in optimizer.py, clip_grads.py, utils.
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    # 3. DistributedOptimizer / clip_grads test param.type() == 'torch.cuda.*Tensor'.
    cpu_type = torch.Tensor.type

    def cuda_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = cpu_type(self, *args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if (
            not args
            and not kwargs
            and caller.startswith("megatron")
            and result.startswith("torch.")
            and not result.startswith("torch.cuda.")
        ):
            return "torch.cuda." + result[len("torch.") :]
        return result

    torch.Tensor.type = cuda_type
    # 4. start_grad_sync waits on the current stream.
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()

    # 5. Attention forks the CUDA RNG tracker even with dropout 0.
    @contextlib.contextmanager
    def fork(self: Any, name: str | None = None) -> Iterator[None]:
        yield

    random.CudaRNGStatesTracker.fork = fork
    # 6. Safeguards: never hit in these tests, harmless if a code path adds them.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None
