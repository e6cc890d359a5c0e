"""Test-side stand-ins for a framework: ZeRO-1 sharding of flat buffers, and gloo ranks.

Only what the tests need to play DeepSpeed or Megatron: an unsharded "model" (a dict of
full tensors, the single-process reference's parameters), how each of its parameters is
held by TP/EP ranks, even element-wise ZeRO-1 shards of per-route flat buffers, and a
runner that starts real gloo processes.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muon_ds.layout import NOT_SPLIT, RowBlock, ShardView, TensorParallel
from muon_ds.testing.zero1 import even_split, shard_numel


@dataclass
class LocalParam:
    """A rank's (TP- or EP-local) part of one parameter, before ZeRO-1 sharding."""

    name: str
    values: torch.Tensor
    route: str
    matrix_shape: tuple[int, int] = (0, 0)
    tp: TensorParallel = NOT_SPLIT
    blocks: tuple[RowBlock, ...] = ()
    group: str = "dense"


@dataclass
class Zero1Shard:
    """One rank's flat fp32 shard buffers (one per group and route) and their views."""

    param_groups: list[dict[str, Any]]
    views: list[ShardView]
    # name -> (buffer index, offset in buffer, flat start in param, flat end) for grads
    slices: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def zero1_shard(
    params_by_group: dict[str, tuple[list[LocalParam], int, int]],
) -> Zero1Shard:
    """Flatten each group's params per route, pad to the DP size, keep this rank's range.

    ``params_by_group[group] = (params, dp_rank, dp_size)``: how DeepSpeed and Megatron
    shard: even, element-wise, cutting through parameters wherever the boundary falls.
    """
    shard = Zero1Shard([], [])
    for group in sorted(params_by_group):
        params, dp_rank, dp_size = params_by_group[group]
        for route in ("muon", "adamw"):
            members = [p for p in params if p.route == route]
            if not members:
                continue
            numels = [p.values.numel() for p in members]
            per_rank = shard_numel(sum(numels), dp_size)
            lo = dp_rank * per_rank
            flat = torch.cat([p.values.reshape(-1).float() for p in members])
            buffer = torch.zeros(per_rank)
            held = flat[lo : lo + per_rank]
            buffer[: held.numel()] = held
            index = len([b for g in shard.param_groups for b in g["params"]])
            shard.param_groups.append({"params": [buffer], "algorithm": route})
            for piece in even_split(numels, dp_size)[dp_rank]:
                p = members[piece.param]
                shard.views.append(
                    ShardView(
                        name=p.name,
                        matrix_shape=p.matrix_shape
                        if route == "muon"
                        else (1, numels[piece.param]),
                        start=piece.start,
                        end=piece.end,
                        buffer=index,
                        offset=piece.offset,
                        route=route,
                        tp=p.tp,
                        blocks=p.blocks,
                        group=group,
                    )
                )
                shard.slices[p.name] = (index, piece.offset, piece.start, piece.end)
    return shard


def move_shard(shard: Zero1Shard, device: torch.device) -> Zero1Shard:
    """The same shard with its buffers on ``device`` (a framework's shards live on its GPU)."""
    for group in shard.param_groups:
        group["params"] = [b.to(device) for b in group["params"]]
    return shard


def set_shard_grads(shard: Zero1Shard, local_grads: dict[str, torch.Tensor]) -> None:
    """Give each buffer the (already averaged) gradient of the elements it holds."""
    buffers = [b for g in shard.param_groups for b in g["params"]]
    for b in buffers:
        b.grad = torch.zeros_like(b)
    for name, (index, offset, start, end) in shard.slices.items():
        buffers[index].grad[offset : offset + end - start] = local_grads[name].reshape(-1)[
            start:end
        ]


def read_shard(shard: Zero1Shard, name: str) -> tuple[int, int, torch.Tensor] | None:
    """(start, end, values) of the elements of ``name`` this rank holds, or None."""
    if name not in shard.slices:
        return None
    buffers = [b for g in shard.param_groups for b in g["params"]]
    index, offset, start, end = shard.slices[name]
    return start, end, buffers[index][offset : offset + end - start].to("cpu", copy=True)


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple, queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException as error:  # reported to the parent, which raises it
        queue.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return per-rank results.

    Every rank's outcome is collected: results if all succeeded, else an AssertionError
    holding each failing rank's message (tests check that all ranks fail alike).
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            context.Process(target=_worker, args=(r, world, init_file, fn, args, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        outcomes = {}
        try:
            for _ in range(world):
                rank, status, payload = queue.get(timeout=timeout)
                outcomes[rank] = (status, payload)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    errors = {r: payload for r, (status, payload) in outcomes.items() if status == "error"}
    if errors:
        raise RankError(errors)
    return [outcomes[r][1] for r in range(world)]


class RankError(AssertionError):
    """Some ranks raised; ``errors[rank]`` is each one's message and traceback."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"rank {r}: {m}" for r, m in sorted(errors.items())))
