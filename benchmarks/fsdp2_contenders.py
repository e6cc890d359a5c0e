"""FSDP2 contenders of the communication benchmark: AdamW and muon_ds on ``fully_shard``.

Both train the plain-torch model of ``benchmarks.torch_models`` sharded with
``torch.distributed.fsdp.fully_shard`` on a 1-D device mesh over every rank (each decoder
block its own FSDP group, then the root: embedding, final norm, head), fp32 parameters
(no ``MixedPrecisionPolicy``), from the same seed on the same tokens, with the same lr,
weight decay, AdamW betas (0.9, 0.95) and eps 1e-8 as the DeepSpeed contenders and
gradient clipping off:

* ``fsdp2_adamw``: ``torch.optim.AdamW(fused=True)`` over the ``Shard(0)`` DTensor
  parameters (torch's fused kernel runs on CPU and CUDA DTensors alike).
* ``muon_ds_fsdp2``: ``muon_ds.fsdp2.FSDPMuon``: Moonlight's Muon, each matrix
  orthogonalised once by its owner over the mesh's process group, Newton-Schulz and the
  exchange in the dtype ``ns_dtype="auto"`` resolves to on the device (named in the
  notes); AdamW on the local shards of the rest.

FSDP2 gathers and reduce-scatters through ``torch.distributed.all_gather_single`` and
``reduce_scatter_single``, which the collective counter wraps like every other op.
Optimizer time: ``optimizer.step()`` (FSDP2 gathers nothing there: the next forward
all-gathers the updated shards); iteration: forward + backward + step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import torch_models
from benchmarks.records import (
    Measured,
    ideal_state_bytes,
    local_tensor,
    state_bytes,
    synchronized_now,
)
from benchmarks.run_options import RunOptions, tokens
from benchmarks.shapes import ModelShape
from muon_ds.testing import collectives

ADAMW_BETAS, ADAMW_EPS = (0.9, 0.95), 1e-8
OPTIMIZERS = {"fsdp2_adamw": "adamw", "muon_ds_fsdp2": "muon_ds"}
"""Contender -> the optimizer it steps the same sharded model with."""


def _device() -> torch.device:
    """This rank's device: its GPU where there is one (``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _sharded_model(shape: ModelShape, options: RunOptions, device: torch.device) -> Any:
    """The model on ``device``, each block and then the root sharded over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = torch_models.build(shape, options.seed).to(device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(contender: str, model: Any, options: RunOptions) -> torch.optim.Optimizer:
    if OPTIMIZERS[contender] == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=options.lr,
            betas=ADAMW_BETAS,
            eps=ADAMW_EPS,
            weight_decay=options.weight_decay,
            fused=True,
        )
    from muon_ds import MuonConfig
    from muon_ds.fsdp2 import FSDPMuon

    config = MuonConfig(
        lr=options.lr,
        weight_decay=options.weight_decay,
        adamw_betas=ADAMW_BETAS,
        adamw_eps=ADAMW_EPS,
    )
    return FSDPMuon(model, config)


def _muon_routed(optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameters the optimizer orthogonalises, read from its own param groups."""
    return [
        name
        for group in optimizer.param_groups
        if group.get("algorithm") == "muon"
        for name in group["param_names"]
    ]


def _ns_totals(optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """muon_ds's Newton-Schulz calls, FLOPs and exchange bytes so far (AdamW: none)."""
    core = getattr(optimizer, "core", None)
    if core is None:
        return 0, 0, 0
    return core.counter.ns_matrices, core.counter.ns_flops, core.counter.exchange_bytes()


def _train(
    model: Any,
    optimizer: torch.optim.Optimizer,
    shape: ModelShape,
    options: RunOptions,
    device: torch.device,
) -> Measured:
    """``warmup + steps`` iterations; counts and times of the measured ones."""
    counter = collectives.install()
    rank = dist.get_rank()
    measured = Measured([], [], [], [], torch.zeros(()))
    for step in range(options.warmup + options.steps):
        batch = tokens(shape, options, step, rank).to(device)
        counter.reset()
        before = _ns_totals(optimizer)
        start = synchronized_now()
        measured.loss = model(batch)
        measured.loss.backward()
        backward_done = synchronized_now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = synchronized_now()
        after = _ns_totals(optimizer)
        if step >= options.warmup:
            measured.snapshots.append(counter.snapshot())
            measured.ns_per_step.append(tuple(a - b for a, b in zip(after, before, strict=True)))
            measured.step_times.append(end - backward_done)
            measured.iteration_times.append(end - start)
    return measured


def _run(contender: str, rank: int, world: int, shape: ModelShape, options: RunOptions) -> dict:
    if options.layout not in ("", f"DP={world}"):
        raise ValueError(f"FSDP2 contenders run DP={world} only, not {options.layout!r}")
    counter = collectives.install()
    device = _device()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model = _sharded_model(shape, options, device)
    expected = torch_models.muon_matrices(model)
    optimizer = _optimizer(contender, model, options)
    routed = _muon_routed(optimizer)
    if routed and sorted(routed) != sorted(expected):
        raise RuntimeError(f"{contender} routes {len(routed)} matrices to Muon, not {expected}")
    measured = _train(model, optimizer, shape, options, device)
    with counter.pause():
        final_loss = measured.loss.detach().float().clone()
        dist.all_reduce(final_loss)
    return _record(contender, rank, world, shape, model, optimizer, expected, measured) | {
        "device": str(device),
        "final_loss": final_loss.item() / world,
    }


def _muon_ds_fields(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The Newton-Schulz dtype and the plans' bytes per step (muon_ds only)."""
    core = getattr(optimizer, "core", None)
    if core is None:
        return {"ns_dtype": "none", "plan_exchange_bytes_per_step": 0}
    return {
        "ns_dtype": str(core.ns_dtype).removeprefix("torch."),
        "plan_exchange_bytes_per_step": sum(core.planned_bytes().values()),
    }


def _record(
    contender: str,
    rank: int,
    world: int,
    shape: ModelShape,
    model: Any,
    optimizer: torch.optim.Optimizer,
    expected: list[str],
    measured: Measured,
) -> dict[str, Any]:
    muon = set(expected) if OPTIMIZERS[contender] == "muon_ds" else set()
    held = [(local_tensor(p).numel(), n in muon) for n, p in model.named_parameters()]
    fields = _muon_ds_fields(optimizer)
    notes = {
        "adamw": "torch AdamW (fused) on each rank's FSDP2 Shard(0) rows.",
        "muon_ds": (
            "FSDPMuon: Moonlight's Muon, NS once per matrix by its owner; NS and wire in "
            f"{fields['ns_dtype']} (ns_dtype 'auto'); AdamW on the local shards of the rest."
        ),
    }[OPTIMIZERS[contender]]
    return {
        "contender": contender,
        "framework": "fsdp2",
        "model": shape.name,
        "layout": f"DP={world}",
        "world": world,
        "rank": rank,
        **fields,
        **measured.counted_fields(),
        "logical_matrices": len(expected),
        "state_bytes": state_bytes(optimizer),
        "ideal_state_bytes": ideal_state_bytes(held),
        "param_count": sum(p.numel() for p in model.parameters()),  # DTensors: global sizes
        "notes": notes + " Optimizer time = optimizer.step() + zero_grad(); iteration = "
        "forward + backward + step.",
    }


def _contender(name: str) -> Callable[[int, int, ModelShape, RunOptions], dict]:
    def run(rank: int, world: int, shape: ModelShape, options: RunOptions) -> dict:
        return _run(name, rank, world, shape, options)

    run.__name__ = name
    return run


CONTENDERS: dict[str, Callable[[int, int, ModelShape, RunOptions], dict]] = {
    name: _contender(name) for name in OPTIMIZERS
}


def LAYOUTS(model: str, world: int) -> list[str]:  # noqa: N802  (the interface's name)
    """FSDP over every rank (a 1-D mesh), for either model."""
    return [f"DP={world}"]
