"""CUDA stand-ins that let Megatron-core 0.19 (and its ``pretrain()``) run on CPU gloo ranks.

For CPU runs only (the tests, the CPU demo, the CPU benchmarks, ``python -m
muon_ds.megatron.run --cpu``): Megatron's DDP, distributed optimizer, grad clipping and
training loop call CUDA APIs or hard-code ``device='cuda'`` (see ENVIRONMENT.md,
"Megatron-core on CPU"). ``install()`` redirects exactly those calls; muon_ds itself never
needs them, and no GPU run loads this module. They patch torch and Megatron process-wide,
so call ``install()`` inside a rank (a spawned test rank, a CPU launch), never in the
pytest process, and before Megatron parses the command line (``validate_args`` is one of
the callers).

Shims 1-6 are what Megatron's DDP and optimizers need (the Megatron tests); 7-13 are the
further calls ``megatron.training``'s ``validate_args`` and ``pretrain()`` make; 14 is
Megatron-LM's ``pretrain_gpt.py``'s own (its batches go to the GPU with ``.cuda()``). Written
for the megatron-core range of ``muon_ds.patches.megatron.MEGATRON_CORE`` (the Megatron
calls listed were found by running 0.19.2; the torch functions replaced are the same in
every torch muon_ds supports, so torch's version is not checked). ``install()`` checks the
version and that every replaced attribute exists before replacing any, so a refused
install leaves torch and Megatron untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from muon_ds.patches import require_attribute
from muon_ds.patches.megatron import require_megatron

PATCH = "muon_ds.patches.megatron_cpu.install"
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")
_installed = False


class _Stream:
    """What Megatron calls on ``torch.cuda.current_stream()`` during grad sync."""

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> None:
        pass


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``factory`` with a CUDA ``device=`` turned into the CPU."""

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


def _cuda_type(cpu_type: Callable[..., Any]) -> Callable[..., Any]:
    """``Tensor.type()`` answering ``torch.cuda.*`` to callers in ``megatron.*`` only."""

    @functools.wraps(cpu_type)
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

    return cuda_type


@contextlib.contextmanager
def _no_fork(self: Any, name: str | None = None) -> Iterator[None]:
    yield


def _constant(value: Any) -> Callable[[Any], Callable[..., Any]]:
    """A replacement that ignores the original and returns ``value`` when called."""
    return lambda original: lambda *args, **kwargs: value


def _shims() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """``(owner, attribute, make)``: ``owner.attribute`` becomes ``make(original)``."""
    from megatron.core.tensor_parallel import random
    from megatron.training import arguments, training

    return [
        # 1. DDP buffers, RoPE and TP buffers allocate on torch.cuda.current_device().
        (torch.cuda, "current_device", _constant("cpu")),
        # 2. Literal device='cuda' in optimizer.py, clip_grads.py, utils.
        *((torch, name, _on_cpu) for name in _FACTORIES),
        # 3. DistributedOptimizer / clip_grads test param.type() == 'torch.cuda.*Tensor'.
        (torch.Tensor, "type", _cuda_type),
        # 4. start_grad_sync waits on the current stream.
        (torch.cuda, "current_stream", lambda original: lambda *a, **k: _Stream()),
        # 5. Attention forks the CUDA RNG tracker even with dropout 0.
        (random.CudaRNGStatesTracker, "fork", lambda original: _no_fork),
        # 6. Safeguards: harmless no-ops if a code path reaches them.
        (torch.cuda, "synchronize", _constant(None)),
        (torch.cuda, "empty_cache", _constant(None)),
        # 7. pretrain() calls initialize_megatron(), which asserts CUDA unless allow_no_cuda.
        (
            training,
            "initialize_megatron",
            lambda original: functools.partial(original, allow_no_cuda=True),
        ),
        # 8. It sets up parallel_state and the RNG tracker only "if
        #    torch.cuda.device_count() > 0": the CPU is that one device.
        (torch.cuda, "device_count", _constant(1)),
        (torch.cuda, "set_device", _constant(None)),
        #    torch's own CUDA check must still say no: with PYTORCH_NVML_BASED_CUDA_CHECK=1
        #    (which importing DeepSpeed sets, and children inherit) is_available() is
        #    device_count() > 0, and torch.compile (Megatron's MoE router) then calls CUDA.
        (torch.cuda, "is_available", _constant(False)),
        # 9. get_model() moves each model chunk to the current device: it is already there.
        (torch.nn.Module, "cuda", lambda original: lambda self, *a, **k: self),
        # 10. get_model() wraps DDP on a side stream.
        (torch.cuda, "Stream", lambda original: lambda *a, **k: _Stream()),
        (torch.cuda, "stream", lambda original: lambda stream: contextlib.nullcontext()),
        # 11. pretrain() warms up Megatron's fused CUDA kernels (bias-GeLU, bias-dropout-add).
        (training, "set_jit_fusion_options", _constant(None)),
        # 12. The RNG tracker (seeding) and the rerun state machine (around every step) save
        #     and restore the CUDA generator; there is none (they save the CPU one too).
        (
            torch.cuda,
            "get_rng_state",
            lambda original: lambda *a, **k: torch.empty(0, dtype=torch.uint8),
        ),
        (torch.cuda, "set_rng_state", _constant(None)),
        # 13. validate_args reads the GPU architecture when TP > 1 and then asks for one
        #     CUDA connection queue (set below); without a GPU there is no architecture.
        (arguments, "get_device_arch_version", _constant(0)),
        # 14. Megatron-LM's own pretrain_gpt.py moves each batch with Tensor.cuda().
        (torch.Tensor, "cuda", lambda original: lambda self, *a, **k: self),
    ]


def install() -> None:
    """Apply the shims, once per process (later calls do nothing), before building any
    Megatron object. Checks first, then patches: a ``PatchError`` leaves all untouched."""
    global _installed
    if _installed:
        return
    require_megatron(PATCH)
    shims = _shims()
    originals = [require_attribute(owner, name, PATCH) for owner, name, _ in shims]
    for (owner, name, make), original in zip(shims, originals, strict=True):
        setattr(owner, name, make(original))
    # 13, continued: without a GPU there is no connection queue to limit.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _installed = True


__all__ = ["PATCH", "install"]
