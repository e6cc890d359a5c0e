"""What the DeepSpeed and FSDP2 contenders build their per-rank records from.

One definition of a measured step's bytes, of optimizer-state bytes and of the state an
optimizer ideally keeps, so the two frameworks' contenders are counted the same way and
their rows in one table can be compared.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

MUON_STATE_BYTES = 4
"""Bytes per element Muon ideally keeps: its fp32 momentum."""
ADAMW_STATE_BYTES = 8
"""Bytes per element AdamW ideally keeps: its two fp32 moments."""


def synchronized_now() -> float:
    """Wall time after the device has finished what was queued (a no-op wait on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: FSDP2 keeps state as DTensors, whose ``numel`` is
    the whole tensor's, not what the rank stores."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of momenta and moments this rank stores (scalar step counters left out)."""
    return sum(
        local_tensor(t).numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.numel() > 1
    )


def ideal_state_bytes(held: Iterable[tuple[int, bool]]) -> int:
    """The state an optimizer needs for the elements this rank steps, given as
    ``(elements, whether Muon steps them)`` per parameter: 4 bytes an element for Muon,
    8 for AdamW. Anything above it is a copy or a moment Muon does not need."""
    return sum(n * (MUON_STATE_BYTES if muon else ADAMW_STATE_BYTES) for n, muon in held)


def exact_mean(values: list[int]) -> int | float:
    """The mean, as an int when it is one (counts then compare exactly in the JSON)."""
    total = sum(values)
    return total // len(values) if total % len(values) == 0 else total / len(values)


def per_step(snapshots: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int | float]]:
    """Each op's calls and bytes summed over the measured steps, divided by their number."""
    ops = sorted({op for snapshot in snapshots for op in snapshot})
    return {
        op: {
            key: exact_mean([s.get(op, {}).get(key, 0) for s in snapshots])
            for key in ("calls", "payload", "wire")
        }
        for op in ops
    }


def counts_constant(snapshots: list[Any], ns_per_step: list[Any]) -> bool:
    """Whether every measured step moved the same bytes and ran the same Newton-Schulz."""
    return all(s == snapshots[0] for s in snapshots) and len(set(ns_per_step)) == 1


@dataclass
class Measured:
    """What the measured steps cost this rank: each step's collective counts and
    (Newton-Schulz calls, FLOPs, own exchange bytes), and the step and iteration times."""

    snapshots: list[dict[str, dict[str, int]]]
    ns_per_step: list[tuple[int, int, int]]
    step_times: list[float]
    iteration_times: list[float]
    loss: torch.Tensor

    def counted_fields(self) -> dict[str, Any]:
        """The record fields every contender reports the same way: counts per step (exact
        means) and the medians of its times."""
        ns = self.ns_per_step
        return {
            "collectives_per_step": per_step(self.snapshots),
            "counts_constant": counts_constant(self.snapshots, ns),
            "ns_calls_per_step": exact_mean([c for c, _, _ in ns]),
            "ns_flops_per_step": exact_mean([f for _, f, _ in ns]),
            "own_exchange_bytes_per_step": exact_mean([x for _, _, x in ns]),
            "optimizer_step_seconds": statistics.median(self.step_times),
            "iteration_seconds": statistics.median(self.iteration_times),
            "optimizer_step_seconds_each": self.step_times,
            "iteration_seconds_each": self.iteration_times,
        }
