"""``FSDPMuon`` on a model sharded with FSDP2's ``fully_shard`` (gloo CPU ranks).

Gradients are set directly (each rank its ``Shard(0)`` rows of one known full gradient),
so the optimizer alone is compared with single-process ``muon_ds.Muon`` on the unsharded
model: in fp32 Newton-Schulz only matmul summation order differs (``TOL``, as the
sharded tests). Counted exchange bytes equal the plan; a parameter no rank has a
gradient for steps as a zero gradient without hanging; torch.distributed.checkpoint
saves the state and loads it back, on the same and on another world size, and training
goes on as if uninterrupted (without the optimizer state the error is 0.036, far over
``TOL``).
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from muon_ds import Muon, MuonConfig
from muon_ds.fsdp2 import FSDPMuon
from tests.dist.zero1 import run_ranks

STEPS = 3
TOL = 2e-6
CONFIG = MuonConfig(ns_dtype="float32", lr=0.02, weight_decay=0.1)


class Tiny(nn.Module):
    """Embedding and head on AdamW, two MLP blocks and a norm, a conv kernel (4-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 40, bias=False), nn.Linear(40, 16)) for _ in range(2)
        )
        self.conv = nn.Conv2d(5, 7, 3)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 20, bias=False)


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def _grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}


def _sharded(world: int, replicas: int = 1, tp: int = 1) -> Tiny:
    """FSDP over ``world`` ranks; HSDP: ``replicas`` x ``world / replicas``; or FSDP over
    ``world / tp`` ranks of blocks that tensor parallelism splits over ``tp`` (up
    projection ``ColwiseParallel``, down ``RowwiseParallel``, as torchtitan applies them);
    the rest (embedding, conv, norm, head) is FSDP only, replicated over TP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = _model()
    if tp > 1:
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        plan = {"0": ColwiseParallel(), "1": RowwiseParallel()}
        for block in model.blocks:
            parallelize_module(block, mesh["tp"], plan)
        mesh = mesh["dp"]
    elif replicas == 1:
        mesh = init_device_mesh("cpu", (world,))
    else:
        names = ("replicate", "shard")
        mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=names)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _set_grads(model: nn.Module, step: int, missing: str | None = None) -> None:
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        full = _grads(model, step)[name]
        p.grad = None if name == missing else distribute_tensor(full, p.device_mesh, p.placements)


def _reference(steps: int, missing: str | None = None) -> dict[str, torch.Tensor]:
    """Single-process Muon; a missing gradient given as zeros, as FSDPMuon steps it."""
    model = _model()
    optimizer = Muon(model, CONFIG)
    for step in range(steps):
        for name, p in model.named_parameters():
            p.grad = torch.zeros_like(p) if name == missing else _grads(model, step)[name]
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _errors(model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        name: (p.full_tensor() - expected[name]).abs().max().item()
        for name, p in model.named_parameters()
    }


def _train(
    rank: int, world: int, missing: str | None = None, replicas: int = 1, tp: int = 1
) -> dict[str, Any]:
    model = _sharded(world, replicas, tp)
    optimizer = FSDPMuon(model, CONFIG)
    for step in range(STEPS):
        _set_grads(model, step, missing)
        optimizer.step()
    core = optimizer.core
    return {
        "errors": _errors(model, _reference(STEPS, missing)),
        "bytes": core.counter.exchange_bytes(),
        "planned": STEPS * sum(core.planned_bytes().values()),
        "ns_matrices": core.counter.ns_matrices,
        "momentum": {
            type(s["momentum_buffer"]).__name__
            for s in optimizer.state.values()
            if "momentum_buffer" in s
        },
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["dp2", "dp3"])
def trained(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_ranks(request.param, _train)


def test_fsdp2_shards_equal_single_process_muon(trained) -> None:
    for rank, result in enumerate(trained):
        assert max(result["errors"].values()) <= TOL, (rank, result["errors"])


def test_each_matrix_is_orthogonalised_once_and_bytes_are_the_plans(trained) -> None:
    # Four block matrices, the conv kernel: embedding and head are AdamW's.
    assert sum(r["ns_matrices"] for r in trained) == 5 * STEPS
    for result in trained:
        assert result["bytes"] == result["planned"]
        assert result["momentum"] == {"DTensor"}


def test_hsdp_replicas_each_equal_single_process_muon() -> None:
    """2 replicas x 2 shards: each replica orthogonalises every matrix once."""
    results = run_ranks(4, _train, None, 2)
    for result in results:
        assert max(result["errors"].values()) <= TOL, result["errors"]
        assert result["bytes"] == result["planned"]
    assert sum(r["ns_matrices"] for r in results) == 2 * 5 * STEPS


@pytest.mark.parametrize("missing", [None, "blocks.1.0.weight"], ids=["all", "missing_grad"])
def test_fsdp_over_tensor_parallel_blocks_equals_single_process_muon(missing) -> None:
    """DP 2 x TP 2: each TP-split matrix is gathered over all four ranks and orthogonalised
    once; the conv kernel, replicated over TP, once per TP rank's DP group."""
    results = run_ranks(4, _train, missing, 1, 2)
    for result in results:
        assert max(result["errors"].values()) <= TOL, result["errors"]
        assert result["bytes"] == result["planned"]
        assert result["momentum"] == {"DTensor"}
    assert sum(r["ns_matrices"] for r in results) == (4 + 2) * STEPS


def test_a_parameter_without_gradient_steps_as_zero_without_hanging() -> None:
    results = run_ranks(2, _train, "blocks.0.0.weight", timeout=120)
    for result in results:
        assert max(result["errors"].values()) <= TOL, result["errors"]


# --- checkpoints -----------------------------------------------------------------------


def _save(rank: int, world: int, directory: str, steps: int, tp: int = 1) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _sharded(world, tp=tp)
    optimizer = FSDPMuon(model, CONFIG)
    for step in range(steps):
        _set_grads(model, step)
        optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def _resume(rank: int, world: int, directory: str, steps: int, tp: int = 1) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded(world, tp=tp)
    optimizer = FSDPMuon(model, CONFIG)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    for step in range(steps, STEPS):
        _set_grads(model, step)
        optimizer.step()
    return {"errors": _errors(model, _reference(STEPS))}


@pytest.mark.parametrize(
    ("save_world", "save_tp", "load_world", "load_tp"),
    [(2, 1, 2, 1), (4, 1, 2, 1), (4, 2, 2, 1)],
    ids=["same", "4to2", "dp2xtp2_to_dp2"],
)
def test_dcp_checkpoint_resumes_and_reshards(
    save_world: int, save_tp: int, load_world: int, load_tp: int
) -> None:
    """Saved by name, loaded on another world size or without tensor parallelism."""
    with tempfile.TemporaryDirectory() as directory:
        run_ranks(save_world, _save, directory, 2, save_tp)
        results = run_ranks(load_world, _resume, directory, 2, load_tp)
    for result in results:
        assert max(result["errors"].values()) <= TOL, result["errors"]


# --- refusals ---------------------------------------------------------------------------


def _refusal(rank: int, world: int, case: str) -> str:
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _sharded(world) if case != "plain" else _model()
    if case == "shard1":
        layer = model.blocks[0][0]
        mesh = layer.weight.device_mesh
        layer.weight = nn.Parameter(distribute_tensor(torch.zeros(40, 16), mesh, [Shard(1)]))
    try:
        FSDPMuon(model, CONFIG)
    except ValueError as error:
        return str(error)
    finally:
        dist.barrier()
    return "accepted"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("plain", "is a plain tensor, not an FSDP2 DTensor"),
        ("shard1", "covered: (Shard(dim=0),) on a 1-D mesh (FSDP); (Replicate(),"),
    ],
)
def test_what_is_not_covered_is_refused_naming_what_is(case: str, expected: str) -> None:
    for message in run_ranks(2, _refusal, case):
        assert expected in message, message


def test_the_strided_shard_read_is_version_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP x TP reads torch's private _StridedShard through a guarded patch: a plain
    Shard is not one; outside the torch range it was read in, it refuses by name."""
    import importlib.metadata

    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from muon_ds.patches import PatchError
    from muon_ds.patches.torch_dtensor import strided_shard

    assert strided_shard(Shard(0)) is None
    assert strided_shard(_StridedShard(0, split_factor=2)) == (0, 2)
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "2.15.0" if name == "torch" else real(name)
    )
    with pytest.raises(PatchError, match=r"torch_dtensor\.strided_shard was written for torch"):
        strided_shard(_StridedShard(0, split_factor=2))
