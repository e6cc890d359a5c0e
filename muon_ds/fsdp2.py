"""muon_ds over PyTorch FSDP2 (``fully_shard``): Muon on the shards FSDP2 already keeps.

FSDP2 shards every parameter along dim 0 over its mesh (``Shard(0)``, ``torch.chunk``
sizes: the first ranks hold ``ceil(rows / W)`` rows, the last fewer or none), so a rank's
local tensor is one contiguous row range of the parameter: a ``ShardView``. The step is
``ShardedMuonCore`` over those local tensors, exchanging over the mesh's shard group
(each matrix orthogonalised once per replica, by its owner or team); AdamW runs on the
local shards. Under HSDP (``Replicate(), Shard(0)`` on a 2-D mesh) every replica holds
the same shards and all-reduced gradients, so each runs the same step within its own
shard group, as HSDP's AdamW does.

State lives in ``self.state[param]`` as DTensors with the parameter's mesh and
placements, as torch's own optimizers keep it under FSDP2, so
``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` /
``set_optimizer_state_dict``) saves it by name and reshards it to another world size.
A parameter without a gradient is stepped with a zero gradient on every rank (its
momentum decays), as under ZeRO: no rank waits for another's exchange.

Covered: FSDP (1-D mesh, ``Shard(0)``) and HSDP. Refused with a clear error: other
placements (``Shard`` on another dim, a mesh with tensor parallelism), plain tensors,
parameters on different meshes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from muon_ds.closure import loss_from_closure
from muon_ds.config import MuonConfig
from muon_ds.layout import ShardView, group_key, split_param_group, tag_embeddings
from muon_ds.math import matrix_shape
from muon_ds.sharded import ShardedMuonCore


class FSDPMuon(torch.optim.Optimizer):
    """Muon + AdamW for a model sharded with ``fully_shard`` (FSDP or HSDP).

    Takes the model itself (names and module types route embeddings and the head to AdamW,
    as ``muon_ds.Muon``), a ``MuonConfig`` and overrides of its fields. ``lr`` and
    ``weight_decay`` are read from the groups at every step, so LR schedulers work. A
    non-finite gradient on any rank skips the step on every rank.
    """

    def __init__(
        self, model: torch.nn.Module, config: MuonConfig | None = None, **overrides: Any
    ) -> None:
        config = config or MuonConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.skipped_steps = 0
        tag_embeddings(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        mesh = _mesh_of(named)
        groups = split_param_group(
            {"params": named}, lambda member: group_key(*member, self.config)
        )
        defaults = {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
        super().__init__(groups, defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._algorithms = [g["algorithm"] for g in self.param_groups for _ in g["params"]]
        self._locals = [_local_flat(p) for p in self._params]
        names = [n for g in self.param_groups for n in g["param_names"]]
        views = [
            view
            for index, (name, p) in enumerate(zip(names, self._params, strict=True))
            if self._algorithms[index] == "muon"
            for view in _view(name, p, index)
        ]
        # The shard dim's group: under HSDP each replica exchanges within its own.
        shards = mesh.get_group(mesh.ndim - 1)
        self.core = ShardedMuonCore(
            self._locals, self._algorithms, views, self.config, {"dense": shards}
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = loss_from_closure(closure)
        for local, p in zip(self._locals, self._params, strict=True):
            local.grad = None if p.grad is None else p.grad.to_local().reshape(-1)
        lr_and_decay = [
            (g["lr"], g["weight_decay"]) for g in self.param_groups for _ in g["params"]
        ]
        pairs = list(zip(self._locals, self._params, strict=True))
        state = {local: _local_state(self.state[p]) for local, p in pairs}
        if not self.core.run(lr_and_decay, state):
            self.skipped_steps += 1
        for local, p in pairs:
            # Existing entries were updated in place through their local views; only what
            # the step created (the first step's state) needs wrapping as DTensors.
            for key, value in state[local].items():
                if key not in self.state[p]:
                    self.state[p][key] = _sharded(value, p)
            local.grad = None
        return loss


SUPPORTED = {1: (Shard(0),), 2: (Replicate(), Shard(0))}
"""Mesh dims -> the placements covered: FSDP's ``Shard(0)``, and HSDP's replicas of it."""


def _mesh_of(named: list[tuple[str, torch.Tensor]]) -> Any:
    """The one mesh every parameter is placed on as ``SUPPORTED`` says, or a clear error."""
    meshes = []
    for name, p in named:
        if not isinstance(p, DTensor):
            raise ValueError(
                f"FSDPMuon: parameter {name!r} is a plain tensor, not an FSDP2 DTensor; apply "
                "torch.distributed.fsdp.fully_shard to the model (and its blocks) first"
            )
        if SUPPORTED.get(p.device_mesh.ndim) != tuple(p.placements):
            raise ValueError(
                f"FSDPMuon: parameter {name!r} is placed {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh; supported: (Shard(dim=0),) on a 1-D mesh "
                "(FSDP) or (Replicate(), Shard(dim=0)) on a 2-D one (HSDP), not tensor "
                "parallelism or Shard on other dims"
            )
        meshes.append(p.device_mesh)
    if not meshes:
        raise ValueError("FSDPMuon: the model has no parameter that requires a gradient")
    if any(m != meshes[0] for m in meshes):
        raise ValueError("FSDPMuon: the parameters lie on different meshes; use one mesh")
    return meshes[0]


def _local_flat(p: DTensor) -> torch.Tensor:
    """This rank's rows of ``p``, flattened: a view of the parameter's own storage."""
    local = p.to_local().detach()
    if local.dtype != torch.float32:
        raise ValueError(
            f"FSDPMuon: parameters must be fp32 (FSDP2's sharded master weights), got "
            f"{local.dtype}; use MixedPrecisionPolicy for bf16 compute"
        )
    return local.view(-1)


def _view(name: str, p: DTensor, index: int) -> list[ShardView]:
    """This rank's row range of ``p`` as a ``ShardView`` (none when it holds no rows)."""
    rows, cols = matrix_shape(p.shape)
    shard_dim = p.device_mesh.ndim - 1
    world = p.device_mesh.size(shard_dim)
    chunk = -(-p.shape[0] // world)
    first = min(p.shape[0], p.device_mesh.get_local_rank(shard_dim) * chunk)
    held = p.to_local().shape[0]
    if held != min(chunk, p.shape[0] - first):
        raise ValueError(
            f"FSDPMuon: parameter {name!r} holds {held} rows on this rank; torch.chunk "
            f"sharding of {p.shape[0]} rows over {world} ranks gives {chunk} from row {first}"
        )
    if held == 0:
        return []
    return [ShardView(name, (rows, cols), first * cols, (first + held) * cols, index, 0)]


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    """A parameter's state with its DTensors as flat local views (shared storage)."""
    return {
        key: value.to_local().reshape(-1) if isinstance(value, DTensor) else value
        for key, value in state.items()
    }


def _sharded(value: Any, p: DTensor) -> Any:
    """A new local state tensor as a DTensor shaped and placed like ``p``; AdamW's step
    count (one scalar, the same on every rank) as it is."""
    if not (isinstance(value, torch.Tensor) and value.dim() == 1):
        return value
    local = value.view(p.to_local().shape)
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
