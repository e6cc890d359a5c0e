"""Megatron dist-checkpoint save/load of muon_ds, through Megatron's own machinery.

Real gloo ranks (one spawn of 4 for every world-4 scenario, each under its own Megatron
groups, and one of 2) build the bf16 GPTs of ``megatron_models`` with
``get_muon_ds_optimizer`` and save model and optimizer with
``ChainedOptimizer.sharded_state_dict`` + ``megatron.core.dist_checkpointing.save`` in
both formats muon_ds supports, then load them into a freshly built model and optimizer
as megatron.training does (``load_content_metadata``, ``sharded_state_dict(is_loading=
True)``, ``dist_checkpointing.load``, ``load_state_dict``).

- Resume identity (TP=2 x DP=2 dense; EP=2 MoE, "fully_reshardable" only; world 4):
  train K steps, save, train M more; a fresh model and optimizer loaded from the
  checkpoint then train the same M steps. Same layout, same data, same arithmetic: every
  main param, optimizer state tensor and model param on every rank is bit-identical to
  the uninterrupted run's.
- DP resharding (TP=1): the dense model saved at DP=4 (world 4) in both formats, and
  the MoE model (EP=2) saved at EP=2 x expert-DP=2 (world 4) in "fully_reshardable",
  each loaded at world 2 (DP=2; EP=2 x expert-DP=1). Every parameter's whole fp32 main
  value, Muon momentum and AdamW moments, gathered from the (expert-)DP shards, experts
  by global id, equal the saved ones exactly; the next step, on the same global batch,
  matches the uninterrupted world-4 run's main params within 1e-5: Newton-Schulz in
  fp32, so only summation order differs (gradient reduction over 4 vs 2 ranks, the
  exchange's owners). Micro-batch m of world-2 rank r is world-4 rank 2m + r's, so each
  MoE micro-batch puts through the experts the tokens one world-4 EP group (ranks 2m,
  2m + 1) did: pairing them otherwise feeds the bf16 expert GEMMs other token sets and
  moved experts' main params up to 1.7e-4 apart after the step (measured; 0 with this
  pairing). One step, not more: main params that differ by summation order (about
  1e-7) round to bf16 model params one ulp apart in places, and the bf16
  forward/backward of the step after turns that into gradients about 0.3% apart
  (measured, from scratch as after a checkpoint): a comparison of bf16 models, not of
  the optimizer state.
- A checkpoint saved by Megatron's own Adam, one without optimizer state, and a format
  muon_ds cannot hold fail with a clear error on every rank, not a hang.
- Routing (TP=2 x DP=2): a checkpoint saved with the default routing, loaded by a run
  whose adamw pattern takes ``linear_proj`` off Muon, and one saved by such a run loaded
  with the default routing, fail on every rank naming both layers' ``linear_proj``, in
  both formats; except the one case torch's loader refuses first ("fully_reshardable",
  a Muon weight now AdamW, Megatron's default strictness: the checkpoint has no
  ``exp_avg_sq`` for it), where ``log_unexpected`` strictness reaches muon_ds's message.
  The routing record each optimizer keeps in the common state names the dense model's
  and the MoE experts' Muon weights (global expert ids, both EP ranks' experts); a
  checkpoint without one (as written before muon_ds kept it) still loads.

The "fully_reshardable" saves use Megatron's memory-efficient mode: the other one gathers
over NCCL (``.cuda()``), which gloo ranks lack.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from muon_ds import MuonConfig
from muon_ds.megatron.checkpoint import ROUTING_RECORD
from tests.dist.zero1 import run_ranks
from tests.integration import megatron_models as models

pytestmark = pytest.mark.dist

FORMATS = ("dp_reshardable", "fully_reshardable")
# dp_reshardable cannot hold the EP=2 MoE layout with any optimizer: a rank's shard of a
# bucket holds no parameter, which Megatron 0.19.2 asserts against ("empty bucket").
MOE_FORMATS = ("fully_reshardable",)
SAVED_AT, MORE = 2, 2  # steps before the checkpoint, steps after it
AFTER_RESHARDING = 1  # steps compared after loading at another DP size (see above)
LR, WEIGHT_DECAY = 2e-2, 0.1
CONFIG = MuonConfig(ns_dtype="float32", lr=LR, weight_decay=WEIGHT_DECAY)
TOLERANCE = 1e-5
# A changed adamw pattern: both layers' attention output projection leave Muon.
PROJ_ON_ADAMW = CONFIG.replace(adamw_patterns=(*CONFIG.adamw_patterns, "*linear_proj*"))
PROJ_NAMES = (
    "2 (decoder.layers.self_attention.linear_proj.weight[0], "
    "decoder.layers.self_attention.linear_proj.weight[1])"
)
ROUTING_ERROR = (
    "ValueError: muon_ds: the checkpoint routes parameters to Muon and AdamW differently "
    "from this run: saved on Muon but not on Muon now: {}; on Muon now but not saved on "
    "Muon: {}. Muon's momentum and AdamW's moments do not carry over between the two"
)
STATE_KEYS = ("param", "momentum_buffer", "exp_avg", "exp_avg_sq")
# The dense model's Muon weights (layers stacked in the checkpoint's keys).
MUON_WEIGHTS = (
    "linear_qkv.weight",
    "linear_proj.weight",
    "linear_fc1.weight",
    "linear_fc2.weight",
)


def _metadata(sharding: str) -> dict[str, Any]:
    return {
        "distrib_optim_sharding_type": sharding,
        "distrib_optim_fully_reshardable_mem_efficient": True,
    }


def _build(
    shape: models.Shape, tp: int, ep: int, config: MuonConfig = CONFIG
) -> tuple[Any, Any, Any]:
    from muon_ds.megatron import get_muon_ds_optimizer

    ddp = models.build(shape, tp, ep)
    optimizer = get_muon_ds_optimizer(models.optimizer_config(LR, WEIGHT_DECAY), [ddp], config)
    return ddp, optimizer, models.constant_schedule(optimizer, LR, WEIGHT_DECAY, SAVED_AT + MORE)


def _train(ddp, optimizer, scheduler, steps: range, samples: list[int]) -> None:
    """``samples``: the DP=4 ranks whose micro-batches this rank takes, one each."""
    for step in steps:
        optimizer.zero_grad()
        _forward_backward(ddp, step, samples)
        success, _, _ = optimizer.step()
        assert success
        scheduler.step(1)


def _forward_backward(ddp, step: int, samples: list[int]) -> None:
    """Micro-batch ``s`` is the one ``models.forward_backward`` gives DP rank ``s``;
    each loss is divided by their number, as Megatron's schedule does."""
    positions = torch.arange(models.SEQ).unsqueeze(0).expand(models.BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, models.SEQ, models.SEQ, dtype=torch.bool), 1)
    ddp.zero_grad_buffer()
    for sample in samples:
        generator = torch.Generator().manual_seed(100 * step + sample)
        ids = torch.randint(0, models.VOCAB, (models.BATCH, models.SEQ), generator=generator)
        loss = ddp(ids, positions, mask, labels=ids).float().mean() / len(samples)
        loss.backward()
    ddp.finish_grad_sync()


def _save(ddp, optimizer, directory: str, sharding: str) -> None:
    from megatron.core import dist_checkpointing

    state = {"model": ddp.module.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_metadata(sharding))
    dist_checkpointing.save(state, directory, content_metadata=_metadata(sharding))


def _load(ddp, optimizer, directory: str, strict: str = "assume_ok_unexpected") -> None:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_content_metadata(directory)
    state = {"model": ddp.module.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
    loaded = dist_checkpointing.load(state, directory, strict=strict)
    ddp.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def _local_tensors(ddp, optimizer) -> list[torch.Tensor]:
    """This rank's model params, main-param shards and every optimizer state tensor."""
    tensors = [p.detach().clone() for p in ddp.parameters()]
    for part in optimizer.chained_optimizers:
        for group in part.optimizer.param_groups:
            for shard in group["params"]:
                state = part.optimizer.state[shard]
                tensors += [shard.clone(), *(state[k].clone() for k in sorted(state))]
    return tensors


def _gathered(ddp, optimizer) -> dict[str, dict[str, np.ndarray]]:
    """Each parameter's whole main value and state tensors, summed from the DP shards
    (TP=1: the DP group is the world) or, for an expert, the expert-DP shards of its EP
    rank, named by global expert id; a key is kept where the shards cover it. As numpy
    arrays: they leave the rank by value, not through shared memory."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    local_experts = (get_model_config(ddp).num_moe_experts or 0) // (
        ps.get_expert_model_parallel_world_size()
    )
    result: dict[str, dict[str, np.ndarray]] = {}
    for name, param in ddp.named_parameters():
        group = ps.get_data_parallel_group()
        if not getattr(param, "allreduce", True):  # Megatron's mark of an expert param
            group = ps.get_expert_data_parallel_group()
            name = models.expert_name(name, ps.get_expert_model_parallel_rank(), local_experts)
        full = {key: torch.zeros(param.numel() + 1) for key in STATE_KEYS}  # last: coverage
        for part in optimizer.chained_optimizers:
            if param not in part.model_param_group_index_map:
                continue
            group_index, order = part.model_param_group_index_map[param]
            shard = part.optimizer.param_groups[group_index]["params"][order]
            piece = part._get_model_param_range_map(param)["param"]
            values = {"param": shard, **part.optimizer.state[shard]}
            for key in STATE_KEYS:
                if key in values:
                    full[key][piece.start : piece.end] = values[key]
                    full[key][-1] += piece.end - piece.start
        stacked = torch.stack(list(full.values()))
        dist.all_reduce(stacked, group=group)
        result[name] = {
            key: row[:-1].numpy()
            for key, row in zip(STATE_KEYS, stacked, strict=True)
            if row[-1] > 0
        }
        assert all(row[-1] == param.numel() for row in stacked if row[-1] > 0), name
    return result


def _resume(
    shape: models.Shape, tp: int, ep: int, root: str, formats: tuple[str, ...], refusals: bool
) -> dict:
    """Resume identity in each of ``formats``, the routing records of the last format's
    common state (one per chained optimizer), then (``refusals``) the refused checkpoints."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    samples = [ps.get_data_parallel_rank()]
    ddp, optimizer, scheduler = _build(shape, tp, ep)
    _train(ddp, optimizer, scheduler, range(SAVED_AT), samples)
    for sharding in formats:
        _save(ddp, optimizer, os.path.join(root, sharding), sharding)
    _train(ddp, optimizer, scheduler, range(SAVED_AT, SAVED_AT + MORE), samples)
    uninterrupted = _local_tensors(ddp, optimizer)
    identical = {}
    for sharding in formats:
        ddp, optimizer, scheduler = _build(shape, tp, ep)
        _load(ddp, optimizer, os.path.join(root, sharding))
        _train(ddp, optimizer, scheduler, range(SAVED_AT, SAVED_AT + MORE), samples)
        resumed = _local_tensors(ddp, optimizer)
        identical[sharding] = len(resumed) == len(uninterrupted) and all(
            torch.equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True)
        )
    common = dist_checkpointing.load_common_state_dict(os.path.join(root, formats[-1]))
    chained = common["optimizer"]  # one optimizer's state, or each one's by index
    parts = [chained] if "optimizer" in chained else [chained[i] for i in sorted(chained)]
    records = [part["optimizer"].get(ROUTING_RECORD) for part in parts]
    refused = _refusals(shape, tp, ep, root, samples) if refusals else {}
    return {"identical": identical, "records": records, "refusals": refused}


def _refusals(
    shape: models.Shape, tp: int, ep: int, root: str, samples: list[int]
) -> dict[str, Any]:
    """The error each bad checkpoint or format raises on this rank; for a checkpoint
    without a routing record, the record it holds (none) and what loading it raises."""
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import get_megatron_optimizer

    errors = {}
    proj_on_adamw = _build(shape, tp, ep, PROJ_ON_ADAMW)[:2]
    for sharding in FORMATS:
        _save(*proj_on_adamw, os.path.join(root, f"proj_on_adamw_{sharding}"), sharding)
    adam_ddp = models.build(shape, tp, ep)
    adam = get_megatron_optimizer(
        models.optimizer_config(LR, WEIGHT_DECAY, optimizer="adam"), [adam_ddp]
    )
    _forward_backward(adam_ddp, 0, samples)
    adam.step()
    _save(adam_ddp, adam, os.path.join(root, "adam"), "dp_reshardable")
    model_only = {"model": adam_ddp.module.sharded_state_dict()}
    dist_checkpointing.save(model_only, os.path.join(root, "model_only"))
    attempts = {
        "adam": lambda ddp, optimizer: _load(ddp, optimizer, os.path.join(root, "adam")),
        # megatron.training's --dist-ckpt-strictness raise_unexpected: missing keys named.
        "model_only": lambda ddp, optimizer: _load(
            ddp, optimizer, os.path.join(root, "model_only"), strict="raise_unexpected"
        ),
        "format": lambda ddp, optimizer: optimizer.sharded_state_dict(
            {"model": ddp.module.sharded_state_dict()},
            metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"},
        ),
    }
    # Each attempt must fail, so one optimizer per routing serves all of its attempts.
    default = _build(shape, tp, ep)[:2]
    for case, attempt in attempts.items():
        errors[case] = _error_of(attempt, *default)
    for sharding in FORMATS:
        errors[f"proj_saved_on_adamw_{sharding}"] = _error_of(
            _load, *default, os.path.join(root, f"proj_on_adamw_{sharding}")
        )
    # Megatron's default strictness, and one that drops requested keys the checkpoint lacks.
    for sharding, strict in (
        *((s, "assume_ok_unexpected") for s in FORMATS),
        ("fully_reshardable", "log_unexpected"),
    ):
        errors[f"proj_now_on_adamw_{sharding}_{strict}"] = _error_of(
            _load, *proj_on_adamw, os.path.join(root, sharding), strict
        )
    # A checkpoint written before muon_ds recorded its routing: the same state, no record.
    inner = default[1].chained_optimizers[0]
    recorded = inner.state_dict
    inner.state_dict = lambda: {
        "optimizer": {k: v for k, v in recorded()["optimizer"].items() if k != ROUTING_RECORD}
    }
    for sharding in FORMATS:
        _save(*default, os.path.join(root, f"unrecorded_{sharding}"), sharding)
    del inner.state_dict
    for sharding in FORMATS:
        errors[f"unrecorded_{sharding}"] = _error_of(
            _load, *default, os.path.join(root, f"unrecorded_{sharding}")
        )
    common = dist_checkpointing.load_common_state_dict(
        os.path.join(root, "unrecorded_fully_reshardable")
    )
    errors["unrecorded_record"] = common["optimizer"]["optimizer"].get(ROUTING_RECORD)
    return errors


def _error_of(attempt: Callable[..., Any], *args: Any) -> str:
    """What ``attempt(*args)`` raised, as text. torch's loader raises CheckpointException,
    a BaseException."""
    try:
        attempt(*args)
    except (Exception, CheckpointException) as error:  # the message is what tests check
        return f"{type(error).__name__}: {error}"
    return "no error"


def _reshard_save(
    rank: int, root: str, shape: models.Shape, ep: int, formats: tuple[str, ...]
) -> dict:
    """World 4: train, save in ``formats``, record the whole state, take the next step."""
    ddp, optimizer, scheduler = _build(shape, 1, ep)
    _train(ddp, optimizer, scheduler, range(SAVED_AT), [rank])
    for sharding in formats:
        _save(ddp, optimizer, os.path.join(root, sharding), sharding)
    saved = _gathered(ddp, optimizer)
    _train(ddp, optimizer, scheduler, range(SAVED_AT, SAVED_AT + AFTER_RESHARDING), [rank])
    return {"saved": saved, "final": _gathered(ddp, optimizer)}


def _reshard_load(
    rank: int, root: str, shape: models.Shape, ep: int, formats: tuple[str, ...]
) -> dict:
    """World 2: load each format, record the whole state, take the next step on the
    world-4 run's batch."""
    result = {}
    for sharding in formats:
        ddp, optimizer, scheduler = _build(shape, 1, ep)
        _load(ddp, optimizer, os.path.join(root, sharding))
        loaded = _gathered(ddp, optimizer)
        samples = [rank, rank + 2]  # micro-batch m: world-4 rank 2m + r's (module docstring)
        _train(ddp, optimizer, scheduler, range(SAVED_AT, SAVED_AT + AFTER_RESHARDING), samples)
        result[sharding] = {"loaded": loaded, "final": _gathered(ddp, optimizer)}
    return result


def _in_groups(tp: int, ep: int, scenario: Callable[..., dict], *args: Any) -> dict:
    """``scenario(*args)`` under Megatron's parallel groups for TP ``tp`` and EP ``ep``."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    try:
        return scenario(*args)
    finally:
        ps.destroy_model_parallel()


def _world4(rank: int, world: int, root: str) -> dict:
    """Every world-4 scenario in one spawn, each with its own parallel groups."""
    from muon_ds.patches import megatron_cpu

    megatron_cpu.install()
    dense, moe = os.path.join(root, "dense"), os.path.join(root, "moe")
    return {
        "dense": _in_groups(2, 1, _resume, models.DENSE, 2, 1, dense, FORMATS, True),
        "moe": _in_groups(1, 2, _resume, models.MOE, 1, 2, moe, MOE_FORMATS, False),
        "dp4": _in_groups(
            1, 1, _reshard_save, rank, os.path.join(root, "dp4"), models.DENSE, 1, FORMATS
        ),
        "moe_dp4": _in_groups(
            1, 2, _reshard_save, rank, os.path.join(root, "moe_dp4"), models.MOE, 2, MOE_FORMATS
        ),
    }


def _world2(rank: int, world: int, root: str) -> dict:
    from muon_ds.patches import megatron_cpu

    megatron_cpu.install()
    return {
        "dp4": _in_groups(
            1, 1, _reshard_load, rank, os.path.join(root, "dp4"), models.DENSE, 1, FORMATS
        ),
        "moe_dp4": _in_groups(
            1, 2, _reshard_load, rank, os.path.join(root, "moe_dp4"), models.MOE, 2, MOE_FORMATS
        ),
    }


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> tuple[list[dict], str]:
    root = tmp_path_factory.mktemp("checkpoints")
    variants = [f"{v}_{sharding}" for v in ("proj_on_adamw", "unrecorded") for sharding in FORMATS]
    for scenario in ("dense", "moe", "dp4", "moe_dp4"):  # dist_checkpointing.save wants them
        for checkpoint in (*FORMATS, "adam", "model_only", *variants):
            (root / scenario / checkpoint).mkdir(parents=True)
    return run_ranks(4, _world4, str(root), timeout=900.0), str(root)


@pytest.fixture(scope="module")
def dense_tp2_dp2(world4) -> list[dict]:
    return [result["dense"] for result in world4[0]]


@pytest.fixture(scope="module")
def moe_ep2(world4) -> list[dict]:
    return [result["moe"] for result in world4[0]]


@pytest.fixture(scope="module")
def world2(world4) -> list[dict]:
    return run_ranks(2, _world2, world4[1])


@pytest.fixture(scope="module")
def dp4_to_dp2(world4, world2) -> tuple[list[dict], list[dict], str]:
    results, root = world4
    saved = [result["dp4"] for result in results]
    return saved, [result["dp4"] for result in world2], os.path.join(root, "dp4")


@pytest.fixture(scope="module")
def expert_dp2_to_dp1(world4, world2) -> tuple[dict, list[dict]]:
    """The world-4 run's state, every rank's experts merged, and each world-2 rank's."""
    saved = {"saved": {}, "final": {}}
    for result in world4[0]:
        for key in saved:
            saved[key].update(result["moe_dp4"][key])
    return saved, [result["moe_dp4"]["fully_reshardable"] for result in world2]


def _stored_numel(directory: str) -> dict[str, int]:
    """Elements of every tensor a dist checkpoint holds, by key."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(directory).read_metadata().state_dict_metadata
    return {key: math.prod(item.size) for key, item in metadata.items() if hasattr(item, "size")}


def test_resume_from_checkpoint_is_bit_identical_to_uninterrupted_run(
    dense_tp2_dp2, moe_ep2
) -> None:
    for result in dense_tp2_dp2:
        assert result["identical"] == {sharding: True for sharding in FORMATS}
    for result in moe_ep2:
        assert result["identical"] == {"fully_reshardable": True}


def test_state_saved_at_dp4_loads_whole_and_exact_at_dp2(dp4_to_dp2) -> None:
    saved_ranks, loaded_ranks, _ = dp4_to_dp2
    saved = saved_ranks[0]["saved"]
    # Muon params hold momentum, AdamW params both moments; every param its main value.
    assert {frozenset(keys) for keys in saved.values()} == {
        frozenset({"param", "momentum_buffer"}),
        frozenset({"param", "exp_avg", "exp_avg_sq"}),
    }
    for result in loaded_ranks:
        for sharding in FORMATS:
            loaded = result[sharding]["loaded"]
            assert loaded.keys() == saved.keys()
            for name, tensors in saved.items():
                assert loaded[name].keys() == tensors.keys(), (sharding, name)
                for key, value in tensors.items():
                    assert np.array_equal(loaded[name][key], value), (sharding, name, key)


def test_step_after_dp_resharding_matches_the_uninterrupted_dp4_run(dp4_to_dp2) -> None:
    saved_ranks, loaded_ranks, _ = dp4_to_dp2
    expected = saved_ranks[0]["final"]
    for result in loaded_ranks:
        for sharding in FORMATS:
            final = result[sharding]["final"]
            for name, tensors in expected.items():
                error = np.abs(final[name]["param"] - tensors["param"]).max()
                assert error <= TOLERANCE, (sharding, name, error)
                moved = np.abs(tensors["param"] - saved_ranks[0]["saved"][name]["param"]).max()
                assert moved > 100 * TOLERANCE, (name, "the step after loading must move it")


def test_checkpoint_of_another_optimizer_fails_clearly_on_every_rank(dense_tp2_dp2) -> None:
    for result in dense_tp2_dp2:
        error = result["refusals"]["adam"]
        assert error.startswith("ValueError: muon_ds: the checkpoint has no param group"), error
        assert "saved by another optimizer" in error


def test_checkpoint_without_optimizer_state_fails_clearly_on_every_rank(dense_tp2_dp2) -> None:
    for result in dense_tp2_dp2:
        error = result["refusals"]["model_only"]
        assert "not found in the checkpoint" in error, error
        assert "optimizer" in error, error


def test_format_muon_ds_cannot_hold_is_refused_naming_the_allowed_ones(dense_tp2_dp2) -> None:
    for result in dense_tp2_dp2:
        assert result["refusals"]["format"] == (
            "ValueError: muon_ds: distributed-optimizer checkpoint format "
            "'fully_sharded_model_space' is not supported; allowed: dp_reshardable, "
            "fully_reshardable"
        )


def test_only_dp_reshardable_writes_zeros_in_place_of_muon_second_moments(dp4_to_dp2) -> None:
    """fully_reshardable: ``exp_avg`` (Muon's momentum or Adam's first moment) for every
    parameter, ``exp_avg_sq`` for AdamW ones only. dp_reshardable: a bucket's
    ``exp_avg_sq`` must cover it whole, so it is exactly as large as its ``exp_avg``."""
    _, _, root = dp4_to_dp2
    stored = _stored_numel(os.path.join(root, "fully_reshardable"))
    prefix = "optimizer.state.param."
    params = {k.removeprefix(prefix): n for k, n in stored.items() if k.startswith(prefix)}
    muon = {key for key in params if key.endswith(MUON_WEIGHTS)}
    assert len(muon) == len(MUON_WEIGHTS)
    assert len(params) > len(muon)
    for key, numel in params.items():
        assert stored[f"optimizer.state.exp_avg.{key}"] == numel, key
        second = stored.get(f"optimizer.state.exp_avg_sq.{key}")
        assert second == (None if key in muon else numel), key
    buckets = _stored_numel(os.path.join(root, "dp_reshardable"))
    first = {k: n for k, n in buckets.items() if k.endswith(".exp_avg")}
    second = {k.removesuffix("_sq"): n for k, n in buckets.items() if k.endswith(".exp_avg_sq")}
    assert first
    assert first == second


def test_checkpoint_routed_otherwise_fails_naming_the_changed_parameters_on_every_rank(
    dense_tp2_dp2,
) -> None:
    refusals = [result["refusals"] for result in dense_tp2_dp2]
    now_adamw = ROUTING_ERROR.format(PROJ_NAMES, "none")
    now_muon = ROUTING_ERROR.format("none", PROJ_NAMES)
    expected = {
        "proj_now_on_adamw_dp_reshardable_assume_ok_unexpected": now_adamw,
        "proj_now_on_adamw_fully_reshardable_log_unexpected": now_adamw,
        **{f"proj_saved_on_adamw_{sharding}": now_muon for sharding in FORMATS},
    }
    for case, start in expected.items():
        messages = {errors[case] for errors in refusals}
        assert len(messages) == 1, (case, messages)  # the same on every rank
        message = messages.pop()
        assert message.startswith(start), (case, message)
        assert "--no-load-optim" in message, message
    # The checkpoint has no exp_avg_sq for a Muon weight: torch's loader refuses first.
    for errors in refusals:
        message = errors["proj_now_on_adamw_fully_reshardable_assume_ok_unexpected"]
        assert message.startswith("CheckpointException"), message
        assert (
            "optimizer.state.exp_avg_sq.decoder.layers.self_attention.linear_proj.weight "
            "from model not in state dict"
        ) in message, message


def test_expert_state_saved_at_expert_dp2_loads_whole_and_exact_at_expert_dp1(
    expert_dp2_to_dp1,
) -> None:
    saved, loaded_ranks = expert_dp2_to_dp1
    experts = {name for name in saved["saved"] if re.search(r"\.experts\.\d+\.", name)}
    assert len(experts) == 2 * models.MOE.experts  # linear_fc1 and linear_fc2 of each
    assert all(saved["saved"][name].keys() == {"param", "momentum_buffer"} for name in experts)
    covered = set()
    for result in loaded_ranks:  # each EP rank: the dense params and its own experts
        covered |= result["loaded"].keys()
        for name, tensors in result["loaded"].items():
            assert tensors.keys() == saved["saved"][name].keys(), name
            for key, value in tensors.items():
                assert np.array_equal(value, saved["saved"][name][key]), (name, key)
    assert covered == saved["saved"].keys()


def test_step_after_expert_dp_resharding_matches_the_uninterrupted_run(
    expert_dp2_to_dp1,
) -> None:
    saved, loaded_ranks = expert_dp2_to_dp1
    for result in loaded_ranks:
        for name, tensors in result["final"].items():
            expected = saved["final"][name]["param"]
            error = np.abs(tensors["param"] - expected).max()
            assert error <= TOLERANCE, (name, error)
            moved = np.abs(expected - saved["saved"][name]["param"]).max()
            assert moved > 100 * TOLERANCE, (name, "the step after loading must move it")


def test_routing_record_names_every_muon_weight_by_checkpoint_key_and_index(
    dense_tp2_dp2, moe_ep2
) -> None:
    """Key in the model's sharded state dict, then its stacked layer (and global expert)
    index: the same on every rank, both EP ranks' experts in the expert optimizer's."""
    attention = ("self_attention.linear_qkv", "self_attention.linear_proj")
    dense = sorted(
        f"decoder.layers.{weight}.weight[{layer}]"
        for weight in (*attention, "mlp.linear_fc1", "mlp.linear_fc2")
        for layer in range(models.DENSE.layers)
    )
    moe_dense = sorted(f"decoder.layers.{w}.weight[0]" for w in (*attention, "mlp.router"))
    experts = sorted(
        f"decoder.layers.mlp.experts.experts.linear_fc{fc}.weight[0, {expert}]"
        for fc in (1, 2)
        for expert in range(models.MOE.experts)
    )
    for result in dense_tp2_dp2:
        assert result["records"] == [dense]
    for result in moe_ep2:
        assert result["records"] == [moe_dense, experts]


def test_checkpoint_without_routing_record_still_loads(dense_tp2_dp2) -> None:
    for result in dense_tp2_dp2:
        refusals = result["refusals"]
        assert refusals["unrecorded_record"] is None  # the premise: no record written
        for sharding in FORMATS:
            assert refusals[f"unrecorded_{sharding}"] == "no error", sharding
