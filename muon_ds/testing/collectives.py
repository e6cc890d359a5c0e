"""Count every torch.distributed collective a process issues, whoever issues it.

DeepSpeed (its torch backend), Megatron, FSDP2 and muon_ds all reach the network through
``torch.distributed.<op>``, so wrapping those attributes sees each one's traffic with one
counter, the same way for every contender. ``install()`` must run before any framework
initialises its communication (DeepSpeed's backend caches some functions at init).
Object collectives (setup-time metadata) are counted by calls only; the tensor
collectives they make internally go through ``distributed_c10d``'s own globals, which are
not wrapped, so nothing is counted twice.

Two byte counts per op:

* ``payload``: bytes of the tensor handed to the op (the input of an all-reduce, reduce
  or reduce-scatter, the output of an all-gather, what a rank sends to others in an
  all-to-all or a send). Exact.
* ``wire``: bytes one rank puts on the network under the ring/bus model of nccl-tests'
  bus bandwidth: all-reduce ``2(P-1)/P`` of the tensor, all-gather and reduce-scatter
  ``(P-1)/P`` of the full tensor, reduce and broadcast ``1x``, all-to-all and sends what
  leaves the rank. A model, but one model for every contender, so ratios are fair.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

Arguments = dict[str, Any]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _ring(a: Arguments, total: int, factor: int = 1) -> tuple[int, int]:
    size = dist.get_world_size(a.get("group"))
    return total, factor * (size - 1) * total // size


def _all_to_all_single(a: Arguments) -> tuple[int, int]:
    source = a["input"]
    me = dist.get_rank(a.get("group"))
    splits = a.get("input_split_sizes")
    if splits:
        row_numel = source[0].numel() if source.dim() > 1 else 1
        own = splits[me] * row_numel * source.element_size()
    else:
        own = _nbytes(source) // dist.get_world_size(a.get("group"))
    sent = _nbytes(source) - own
    return sent, sent


def _all_to_all(a: Arguments) -> tuple[int, int]:
    me = dist.get_rank(a.get("group"))
    sent = sum(_nbytes(t) for i, t in enumerate(a["input_tensor_list"]) if i != me)
    return sent, sent


def _sent(a: Arguments) -> tuple[int, int]:
    return _nbytes(a["tensor"]), _nbytes(a["tensor"])


def _nothing(a: Arguments) -> tuple[int, int]:
    return 0, 0


SIZERS: dict[str, Callable[[Arguments], tuple[int, int]]] = {
    "all_reduce": lambda a: _ring(a, _nbytes(a["tensor"]), factor=2),
    "reduce": _sent,
    "broadcast": _sent,
    "all_gather_into_tensor": lambda a: _ring(a, _nbytes(a["output_tensor"])),
    "all_gather_single": lambda a: _ring(a, _nbytes(a["output_tensor"])),
    "all_gather": lambda a: _ring(a, sum(_nbytes(t) for t in a["tensor_list"])),
    "reduce_scatter_tensor": lambda a: _ring(a, _nbytes(a["input"])),
    "reduce_scatter_single": lambda a: _ring(a, _nbytes(a["input"])),
    "reduce_scatter": lambda a: _ring(a, sum(_nbytes(t) for t in a["input_list"])),
    "all_to_all_single": _all_to_all_single,
    "all_to_all": _all_to_all,
    "send": _sent,
    "isend": _sent,
    "recv": _nothing,
    "irecv": _nothing,
    "all_gather_object": _nothing,
    "broadcast_object_list": _nothing,
    "barrier": _nothing,
}
"""Op -> ``(payload, wire)`` bytes of one call, from its bound arguments. The ``_single``
ops are newer torch's names of the ``_tensor`` ones (which now call them through
``distributed_c10d``'s globals, so nothing is counted twice); FSDP2 calls them. An op this
torch does not have is left alone."""


@dataclass
class CollectiveCounter:
    """Calls, payload bytes and modelled wire bytes per op since the last ``reset``."""

    calls: Counter = field(default_factory=Counter)
    payload: Counter = field(default_factory=Counter)
    wire: Counter = field(default_factory=Counter)
    paused: bool = False

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()
        self.wire.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{op: {"calls", "payload", "wire"}}`` of every op seen since the reset."""
        return {
            op: {"calls": self.calls[op], "payload": self.payload[op], "wire": self.wire[op]}
            for op in sorted(self.calls)
        }

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Leave uncounted what runs inside (the benchmark's own bookkeeping)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    def _record(self, op: str, arguments: Arguments) -> None:
        if self.paused:
            return
        payload, wire = SIZERS[op](arguments)
        self.calls[op] += 1
        self.payload[op] += payload
        self.wire[op] += wire


def install() -> CollectiveCounter:
    """Wrap ``torch.distributed``'s collectives (once per process); return the counter."""
    existing = getattr(dist, "_muon_ds_collective_counter", None)
    if existing is not None:
        return existing
    counter = CollectiveCounter()
    for op in SIZERS:
        original = getattr(dist, op, None)
        if original is not None:
            setattr(dist, op, _wrap(op, original, counter))
    dist._muon_ds_collective_counter = counter  # type: ignore[attr-defined]
    return counter


def _wrap(op: str, original: Callable[..., Any], counter: CollectiveCounter) -> Callable[..., Any]:
    signature = inspect.signature(original)

    def counted(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        counter._record(op, bound.arguments)
        return original(*args, **kwargs)

    counted.__wrapped__ = original  # type: ignore[attr-defined]
    return counted
