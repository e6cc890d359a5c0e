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

Under tensor parallelism (a 2-D data-parallel x tensor-parallel mesh, FSDP2 applied over
``parallelize_module``'s ``ColwiseParallel`` / ``RowwiseParallel``), each rank holds a
row range of its TP-local shard: a ``ShardView`` with its ``TensorParallel`` split; the
logical matrix is gathered over every DP and TP rank to its owner, as under Megatron's
TP, and TP-replicated parameters exchange within each TP rank's data-parallel group.

Covered: FSDP (1-D mesh, ``Shard(0)``), HSDP, and FSDP x TP (``COVERED``). Refused with
a clear error: other placements (``Shard`` on another dim, uneven TP splits, 3-D meshes),
plain tensors, parameters sharded over different groups of ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from muon_ds.closure import loss_from_closure
from muon_ds.config import MuonConfig
from muon_ds.layout import (
    NOT_SPLIT,
    ShardView,
    TensorParallel,
    group_key,
    split_param_group,
    tag_embeddings,
)
from muon_ds.math import matrix_shape
from muon_ds.patches.torch_dtensor import strided_shard
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
        layouts = _layouts_of(named)
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
            for view in _view(name, p, index, layouts[name])
        ]
        self.core = ShardedMuonCore(
            self._locals, self._algorithms, views, self.config, _exchange_groups(layouts)
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


@dataclass(frozen=True)
class _Layout:
    """How FSDP2 (and tensor parallelism) placed one parameter on its mesh."""

    rows_dim: int
    """The mesh dim whose ranks hold row ranges (FSDP's ``Shard(0)``)."""
    rows_group: dist.ProcessGroup
    """That dim's process group: where the parameter's row pieces are exchanged."""
    tp: TensorParallel
    """``NOT_SPLIT``, or the tensor-parallel split of the 2-D matrix (``Shard(0)``:
    ``ColwiseParallel``'s rows, ``Shard(1)``: ``RowwiseParallel``'s columns)."""


COVERED = (
    "(Shard(dim=0),) on a 1-D mesh (FSDP); (Replicate(), Shard(dim=0)) on a 2-D mesh "
    "(HSDP); on a 2-D (data-parallel, tensor-parallel) mesh, FSDP2 over ColwiseParallel "
    "(_StridedShard(dim=0), Shard(dim=0)), over RowwiseParallel (Shard(dim=0), "
    "Shard(dim=1)), or over a TP-replicated parameter (Shard(dim=0), Replicate())"
)
"""The placements ``FSDPMuon`` covers, as its refusals name them."""


def _layout(name: str, p: DTensor) -> _Layout:
    """``p``'s layout if its placements are ``COVERED``, else a clear error."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim == 1 and placements == (Shard(0),):
        return _Layout(0, mesh.get_group(0), NOT_SPLIT)
    if mesh.ndim == 2 and placements == (Replicate(), Shard(0)):
        return _Layout(1, mesh.get_group(1), NOT_SPLIT)
    if mesh.ndim == 2 and placements == (Shard(0), Replicate()):
        return _Layout(0, mesh.get_group(0), NOT_SPLIT)
    if mesh.ndim == 2 and p.dim() <= 2:
        tp = TensorParallel(mesh.get_local_rank(1), mesh.size(1), 0)
        size = mesh.size(1)
        if placements == (Shard(0), Shard(1)) and p.shape[1] % size == 0:
            return _Layout(0, mesh.get_group(0), dataclasses.replace(tp, dim=1))
        if (
            strided_shard(placements[0]) == (0, size)
            and placements[1] == Shard(0)
            and p.shape[0] % size == 0
        ):
            return _Layout(0, mesh.get_group(0), tp)
    raise ValueError(
        f"FSDPMuon: parameter {name!r} of shape {tuple(p.shape)} is placed {placements} on "
        f"a {mesh.ndim}-D mesh; covered: {COVERED} (a tensor-parallel split must divide "
        "the split dim of a 1-D or 2-D parameter evenly)"
    )


def _layouts_of(named: list[tuple[str, torch.Tensor]]) -> dict[str, _Layout]:
    """Every parameter's layout; all must exchange row pieces over one group of ranks."""
    layouts = {}
    for name, p in named:
        if not isinstance(p, DTensor):
            raise ValueError(
                f"FSDPMuon: parameter {name!r} is a plain tensor, not an FSDP2 DTensor; apply "
                "torch.distributed.fsdp.fully_shard to the model (and its blocks) first"
            )
        layouts[name] = _layout(name, p)
    if not layouts:
        raise ValueError("FSDPMuon: the model has no parameter that requires a gradient")
    members = {tuple(dist.get_process_group_ranks(v.rows_group)) for v in layouts.values()}
    if len(members) > 1:
        raise ValueError(
            "FSDPMuon: the parameters are sharded over different groups of ranks "
            f"{sorted(members)}; shard every parameter over one data-parallel mesh dim"
        )
    return layouts


def _exchange_groups(layouts: dict[str, _Layout]) -> dict[str, dist.ProcessGroup | None]:
    """The exchange's groups: the row pieces' group ("dense"), and for tensor-parallel
    matrices every rank of the job ("dense_tp": pieces come from every DP and TP rank)."""
    groups = {"dense": next(iter(layouts.values())).rows_group}
    if any(v.tp.size > 1 for v in layouts.values()):
        world = dist.get_world_size()
        if any(v.rows_group.size() * v.tp.size != world for v in layouts.values() if v.tp.size > 1):
            raise ValueError(
                "FSDPMuon: under tensor parallelism the (data-parallel, tensor-parallel) mesh "
                f"must span all {world} ranks (a pipeline-parallel sub-mesh is not covered)"
            )
        groups["dense_tp"] = None
    return groups


def _local_flat(p: DTensor) -> torch.Tensor:
    """This rank's rows of ``p``, flattened: a view of the parameter's own storage."""
    local = p.to_local().detach()
    if local.dtype != torch.float32:
        raise ValueError(
            f"FSDPMuon: parameters must be fp32 (FSDP2's sharded master weights), got "
            f"{local.dtype}; use MixedPrecisionPolicy for bf16 compute"
        )
    return local.view(-1)


def _view(name: str, p: DTensor, index: int, layout: _Layout) -> list[ShardView]:
    """This rank's row range of ``p`` (of its TP-local matrix under tensor parallelism)
    as a ``ShardView``; none when it holds no rows."""
    rows, cols = matrix_shape(p.shape)
    if layout.tp.size > 1:
        split = layout.tp.size
        rows, cols = (rows // split, cols) if layout.tp.dim == 0 else (rows, cols // split)
    mesh = p.device_mesh
    world = mesh.size(layout.rows_dim)
    chunk = -(-rows // world)
    first = min(rows, mesh.get_local_rank(layout.rows_dim) * chunk)
    held = p.to_local().shape[0]
    if held != min(chunk, rows - first):
        raise ValueError(
            f"FSDPMuon: parameter {name!r} holds {held} rows on this rank; torch.chunk "
            f"sharding of {rows} rows over {world} ranks gives {chunk} from row {first}"
        )
    if held == 0:
        return []
    group = "dense_tp" if layout.tp.size > 1 else "dense"
    return [
        ShardView(
            name,
            (rows, cols),
            first * cols,
            (first + held) * cols,
            index,
            0,
            tp=layout.tp,
            group=group,
        )
    ]


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
