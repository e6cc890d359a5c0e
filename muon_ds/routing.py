"""Which tensor went to Muon and which to AdamW: the report, and the routing checkpoints keep.

Framework-agnostic: an optimizer that routes parameters offers ``routed_tensors()`` (one
``RoutedTensor`` per parameter); ``routing_report`` finds that optimizer behind any
wrapper that keeps it as ``.optimizer`` (DeepSpeed's engine and ZeRO wrappers, Hugging
Face Accelerate's), so users get the table from whatever object their framework hands
them. Routing mistakes are silent in training curves (an embedding on Muon still trains),
so the report lists every tensor of ndim >= 2 on AdamW: the ones a user would check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from muon_ds.layout import ROUTES, Route

_WRAPPER_DEPTH = 8
"""How many ``.optimizer`` hops ``routing_report`` follows (HF -> Accelerate -> ZeRO -> ours)."""


@dataclass(frozen=True)
class RoutedTensor:
    """One parameter: its name, shape, route and the weight decay its group applies."""

    name: str
    shape: tuple[int, ...]
    route: Route
    weight_decay: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RoutingReport:
    """Every routed parameter of one optimizer, in its order."""

    tensors: tuple[RoutedTensor, ...]

    def count(self, route: Route) -> int:
        """How many tensors ``route`` updates."""
        return sum(t.route == route for t in self.tensors)

    def elements(self, route: Route) -> int:
        """How many elements ``route`` updates."""
        return sum(t.numel for t in self.tensors if t.route == route)

    def matrices_on_adamw(self) -> list[RoutedTensor]:
        """Tensors of ndim >= 2 that AdamW updates (embeddings, head, user overrides)."""
        return [t for t in self.tensors if t.route == "adamw" and len(t.shape) >= 2]

    def routes(self) -> dict[str, Route]:
        """Name -> route, what checkpoints record."""
        return {t.name: t.route for t in self.tensors}

    def lines(self) -> list[str]:
        """The report as printed: totals per route, then every matrix on AdamW."""
        totals = []
        for route in ROUTES:
            undecayed = sum(t.route == route and t.weight_decay == 0 for t in self.tensors)
            extra = f"; {undecayed} without weight decay" if undecayed else ""
            totals.append(
                f"{'Muon' if route == 'muon' else 'AdamW'} {self.count(route)} tensors "
                f"({self.elements(route):,} elements{extra})"
            )
        matrices = self.matrices_on_adamw()
        listed = ", ".join(f"{t.name} {list(t.shape)}" for t in matrices) or "none"
        return [
            f"muon_ds routing: {', '.join(totals)}",
            f"muon_ds routing: tensors of ndim >= 2 on AdamW ({len(matrices)}): {listed}",
        ]


def routing_report(optimizer: Any) -> RoutingReport:
    """The routing table of a muon_ds optimizer, or of whatever wraps one.

    Follows ``.optimizer`` through wrappers (a DeepSpeed engine or ZeRO optimizer, HF's
    ``trainer.optimizer``) to the first object offering ``routed_tensors()``.
    """
    seen = []
    current = optimizer
    for _ in range(_WRAPPER_DEPTH):
        if current is None:
            break
        seen.append(type(current).__name__)
        routed = getattr(current, "routed_tensors", None)
        if callable(routed):
            return RoutingReport(tuple(routed()))
        current = getattr(current, "optimizer", None)
    raise TypeError(
        f"routing_report: no muon_ds optimizer in {' -> '.join(seen)}; pass a muon_ds "
        "optimizer (muon_ds.Muon, muon_ds.deepspeed.OrthogonalizedZeroOptimizer) or an object that "
        "holds one as .optimizer (DeepSpeed's engine, HF's trainer.optimizer)"
    )


def print_on_rank0(lines: Sequence[str]) -> None:
    """Print ``lines`` once per job: on rank 0, or the only process."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print("\n".join(lines), flush=True)


_NAMES_SHOWN = 6


def routing_mismatch(saved: Mapping[str, str], current: Mapping[str, str]) -> str | None:
    """Why a checkpoint's routing (name -> route) cannot load into this run's, or None.

    Muon's momentum and AdamW's moments do not carry over between the two, so every
    parameter must keep its route; the message names those that did not.
    """
    saved_muon = {n for n, r in saved.items() if r == "muon"}
    current_muon = {n for n, r in current.items() if r == "muon"}
    if saved_muon == current_muon:
        return None

    def some(names: set[str]) -> str:
        if not names:
            return "none"
        shown = ", ".join(sorted(names)[:_NAMES_SHOWN])
        return f"{len(names)} ({shown}{', ...' if len(names) > _NAMES_SHOWN else ''})"

    return (
        "the checkpoint routes parameters to Muon and AdamW differently from this run: "
        f"saved on Muon but not on Muon now: {some(saved_muon - current_muon)}; on Muon now "
        f"but not saved on Muon: {some(current_muon - saved_muon)}. Muon's momentum and "
        "AdamW's moments do not carry over between the two: load with the routing the "
        "checkpoint was saved with (MuonConfig muon_patterns/adamw_patterns, "
        "muon_ds.set_route tags, the same model), or load the model weights alone and "
        "start the optimizer afresh"
    )


__all__ = [
    "RoutedTensor",
    "RoutingReport",
    "print_on_rank0",
    "routing_mismatch",
    "routing_report",
]
