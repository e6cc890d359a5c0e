"""CUDA stand-ins that let Megatron-core 0.19.2 (and its ``pretrain()``) run on CPU gloo ranks.

For the CPU demo and the tests only: Megatron's DDP, distributed optimizer, grad clipping
and training loop call CUDA APIs or hard-code ``device='cuda'`` (see ENVIRONMENT.md,
"Megatron-core on CPU"). ``install()`` redirects exactly those calls; muon_ds itself never
needs them, and ``pretrain_gpt.py`` installs them only under ``--cpu``. They patch torch
and Megatron process-wide, so call ``install()`` inside a rank (a spawned test rank, a
``--cpu`` launch), never in the pytest process.

Shims 1-6 are what Megatron's DDP and optimizers need (the Megatron tests); 7-13 are the
further calls ``megatron.training``'s ``validate_args`` and ``pretrain()`` make. Install
them before Megatron parses the command line (validate_args is one of the callers).
"""

from __future__ import annotations

import contextlib
import functools
import os
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
    """Apply the shims; each rank calls it once, before building any Megatron object."""
    from megatron.core.tensor_parallel import random
    from megatron.training import arguments, initialize, training

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
    # 6. Safeguards: harmless no-ops if a code path reaches them.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None
    # 7. pretrain() calls initialize_megatron(), which asserts CUDA unless allow_no_cuda.
    training.initialize_megatron = functools.partial(
        initialize.initialize_megatron, allow_no_cuda=True
    )
    # 8. It sets up parallel_state and the RNG tracker only "if torch.cuda.device_count() > 0":
    #    the CPU is that one device.
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *args, **kwargs: None
    # 9. get_model() moves each model chunk to the current device: it is already there.
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    # 10. get_model() wraps DDP on a side stream.
    torch.cuda.Stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    # 11. pretrain() warms up Megatron's fused CUDA kernels (bias-GeLU, bias-dropout-add).
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    # 12. The RNG tracker (seeding) and the rerun state machine (around every step) save
    #     and restore the CUDA generator; there is none (they save the CPU one too).
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *args, **kwargs: None
    # 13. validate_args reads the GPU architecture when TP > 1 and then asks for one CUDA
    #     connection queue; without a GPU there is no architecture and no queue to limit.
    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
