"""muon_ds inside Megatron-core's DistributedOptimizer on real gloo ranks.

Each scenario (one spawn of 4 ranks, module-scoped) builds a small bf16 GPTModel, wraps
it in Megatron's DDP and trains ``STEPS`` steps with ``get_muon_ds_optimizer`` under
Megatron's own LR/WD scheduler, grad clipping (on, and active) and param all-gather.
Alongside, every rank runs single-process ``muon_ds.Muon`` on the unsharded model, with
QKV, gate/up and experts (SequentialMLP's, or TEGroupedMLP's single 3-D grouped weights as
``megatron_models.SingleGroupedExperts`` lays them out) split explicitly by the test
(``megatron_models``), fed the same averaged gradients, clipped by ``clip_grad_norm_``.
With pipeline stages each rank's reference is its own stage's model, trained through
Megatron's pipeline schedule and clipped by the norm over all stages; in blockwise TP
mode it is this TP rank's blocks, clipped by the whole model's norm.
Tolerance: Newton-Schulz in fp32, so only summation order differs: main params within
1e-5, the reported grad norm within 1e-5 relative; the bf16 model params are the main
params rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

from muon_ds import Muon, MuonConfig
from tests.dist.zero1 import run_ranks
from tests.integration import megatron_models as models

pytestmark = pytest.mark.dist

STEPS = 3
LR, WEIGHT_DECAY, CLIP = 2e-2, 0.1, 1.0
CONFIG = MuonConfig(ns_dtype="float32", lr=LR, weight_decay=WEIGHT_DECAY)
FP16 = {
    "fp16": True,
    "bf16": False,
    "params_dtype": torch.float16,
    "initial_loss_scale": 2.0**10,
    "hysteresis": 1,
}
"""Megatron's fp16 with its dynamic loss scaler, at a scale the model's gradients fit in
fp16 with room to spare (they first overflow near 2**18): the overflow the test needs is
injected (``Scenario.inf_step``)."""
TOLERANCE = 1e-5


def _reference(initial: dict[str, torch.Tensor]) -> tuple[Muon, dict[str, torch.Tensor]]:
    """Muon on the unsharded model; 1-D params without decay, as Megatron's overrides."""
    params = {name: t.clone() for name, t in initial.items()}
    groups = [
        {"params": [(n, p) for n, p in params.items() if p.ndim >= 2]},
        {"params": [(n, p) for n, p in params.items() if p.ndim < 2], "weight_decay": 0.0},
    ]
    return Muon(groups, CONFIG), params


@dataclass(frozen=True)
class Scenario:
    """One spawn's parallel layout and how the optimizer is built."""

    tp: int = 1
    ep: int = 1
    expert_tp: int | None = None
    """Expert tensor parallelism; Megatron's default is ``tp``."""
    pp: int = 1
    tp_mode: str = "whole"
    """``"blockwise"``: each TP rank's block is its own matrix, and so in the reference."""
    fp16: bool = False
    """fp16 params with Megatron's dynamic loss scaler; the reference gets the unscaled
    gradients and skips the steps Megatron skips."""
    inf_step: int | None = None
    """At this step rank 0's gradient buffers are all Inf, as an fp16 overflow leaves them
    on one rank: every rank must skip the step."""
    teams: bool = False
    """Owner teams of up to 4 ranks, their traffic weighed at nothing and the balance
    tightest, so the small model forms them (the experts then plan first)."""
    hook: bool = False
    """Build through ``megatron.training``'s ``get_megatron_optimizer`` name, as the
    launch entry does after ``use_muon_ds``; else call ``get_muon_ds_optimizer``."""


def _train(rank: int, world: int, shape: models.Shape, scenario: Scenario) -> dict[str, Any]:
    from muon_ds.patches import megatron_cpu

    megatron_cpu.install()
    from megatron.core import parallel_state as ps

    from muon_ds.megatron import get_muon_ds_optimizer, use_muon_ds

    ps.initialize_model_parallel(
        tensor_model_parallel_size=scenario.tp,
        expert_model_parallel_size=scenario.ep,
        expert_tensor_parallel_size=scenario.expert_tp,
        pipeline_model_parallel_size=scenario.pp,
    )
    gather_tp = scenario.tp_mode == "whole"
    try:
        ddp = models.build(
            shape,
            scenario.tp,
            scenario.ep,
            expert_tp=scenario.expert_tp,
            pp=scenario.pp,
            fp16=scenario.fp16,
        )
        precision = FP16 if scenario.fp16 else {}
        optimizer_config = models.optimizer_config(LR, WEIGHT_DECAY, clip_grad=CLIP, **precision)
        config = CONFIG
        if scenario.teams:
            config = CONFIG.replace(
                owner_team_max=4, team_flops_per_byte=0.0, owner_imbalance_limit=1.0
            )
        if scenario.hook:
            from megatron.training import training

            use_muon_ds(config, "qkv", scenario.tp_mode)
            optimizer = training.get_megatron_optimizer(optimizer_config, [ddp])
        else:
            optimizer = get_muon_ds_optimizer(
                optimizer_config, [ddp], config, tp_mode=scenario.tp_mode
            )
        scheduler = models.constant_schedule(optimizer, LR, WEIGHT_DECAY, STEPS)
        param_syncs = _count_param_syncs(ddp)
        reference, ref_params = _reference(models.logical(ddp, lambda p: p, gather_tp))
        norms, scales = [], []
        for step in range(STEPS):
            optimizer.zero_grad()
            scale = optimizer.get_loss_scale().item()
            scales.append(scale)
            models.forward_backward(ddp, step, scale)
            models.all_gather_grad_buffers(ddp)
            if step == scenario.inf_step and rank == 0:
                for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers]:
                    buffer.grad_data.fill_(float("inf"))

            def unscaled(param: torch.nn.Parameter, scale: float = scale) -> torch.Tensor:
                return param.main_grad / scale

            grads = models.logical(ddp, unscaled, gather_tp)
            # The norm is the whole model's gradients', as Megatron's (blockwise too).
            whole = grads if gather_tp else models.logical(ddp, unscaled)
            square = sum(g.pow(2).sum() for g in whole.values())
            success, grad_norm, _ = optimizer.step()
            scheduler.step(1)
            for name, param in ref_params.items():
                param.grad = grads[name]
            ref_norm = _clip(list(ref_params.values()), square)
            if success:
                reference.step()
            norms.append((success, grad_norm, ref_norm))
        report = _report(ddp, optimizer, reference, ref_params, norms, gather_tp)
        report["param_syncs"] = sorted(param_syncs.values())
        report["loss_scales"] = scales
        report["saved_scaler"] = "grad_scaler" in optimizer.chained_optimizers[0].state_dict()
        report["bucket_groups"] = len(ddp.bucket_groups + ddp.expert_parallel_bucket_groups)
        report["non_finite_step"] = _non_finite_step(ddp, optimizer, rank)
        report["teams"] = {
            name: sum(m.team is not None for m in plan.matrices)
            for part in optimizer.chained_optimizers
            for name, plan in part.optimizer.plans.items()
        }
        return report
    finally:
        ps.destroy_model_parallel()


def _clip(params: list[torch.Tensor], square: torch.Tensor) -> float:
    """``clip_grad_norm_`` of ``params`` by the norm whose square over this pipeline stage
    is ``square``: summed over every stage (each stage's view holds only its own)."""
    from megatron.core import parallel_state as ps

    dist.all_reduce(square, group=ps.get_pipeline_model_parallel_group())
    norm = square.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, CLIP, norm)
    return norm.item()


def _count_param_syncs(ddp) -> dict[int, int]:
    """Parameter all-gathers started per DDP bucket group (dense and expert)."""
    counts: dict[int, int] = {}
    start = ddp._start_bucket_group_param_sync

    def counted(bucket_group, force_sync: bool) -> None:
        counts[id(bucket_group)] = counts.get(id(bucket_group), 0) + 1
        start(bucket_group, force_sync)

    ddp._start_bucket_group_param_sync = counted
    return counts


def _report(ddp, optimizer, reference, ref_params, norms, gather_tp: bool) -> dict[str, Any]:
    """Per-rank errors against the reference, and the counted work of each ShardedMuon."""
    from megatron.core import parallel_state as ps

    names = dict((p, n) for n, p in models.named_params(ddp))
    main_errors: dict[str, float] = {}
    model_errors: dict[str, float] = {}
    bytes_sent, predicted, ns_matrices = {}, {}, 0
    for part in optimizer.chained_optimizers:
        groups = part.optimizer.param_groups
        model_params = [
            [*a, *b] for a, b in zip(part.model_fp32_groups, part.model_float16_groups, strict=True)
        ]
        for group, params in zip(groups, model_params, strict=True):
            for main, param in zip(group["params"], params, strict=True):
                piece = part._get_model_param_range_map(param)["param"]
                expected = models.local(ddp, ref_params, names[param], param, gather_tp)
                expected = expected.reshape(-1)
                error = (main - expected[piece.start : piece.end]).abs().max().item()
                main_errors[names[param]] = max(main_errors.get(names[param], 0.0), error)
        muon = part.optimizer
        ns_matrices += muon.counter.ns_matrices
        for key, per_step in muon.core.planned_bytes().items():
            bytes_sent[key] = sum(
                n
                for (op, g), n in muon.counter.bytes_sent.items()
                if g == key and op.startswith("muon_")
            )
            predicted[key] = per_step * STEPS
    for name, param in models.named_params(ddp):
        expected = models.local(ddp, ref_params, name, param, gather_tp)
        # bf16 rounding of a value within TOLERANCE of the reference.
        bound = expected.abs() * 2**-8 + TOLERANCE
        model_errors[name] = ((param.float() - expected).abs() - bound).max().item()
    return {
        "main_errors": main_errors,
        "model_over_bound": model_errors,
        "norms": norms,
        "ns_matrices": ns_matrices,
        "reference_matrices": sum(
            len(g["params"]) for g in reference.param_groups if g["algorithm"] == "muon"
        ),
        "bytes": bytes_sent,
        "predicted": predicted,
        "optimizers": [type(part).__name__ for part in optimizer.chained_optimizers],
        "expert_tp": ps.get_expert_tensor_parallel_world_size(),
    }


def _non_finite_step(ddp, optimizer, rank: int) -> dict[str, Any]:
    """One more step with a NaN in one gradient element that rank 1 owns."""
    optimizer.zero_grad()
    models.forward_backward(ddp, STEPS)
    if rank == 1:
        part = optimizer.chained_optimizers[0]
        param = part.model_float16_groups[0][0]
        start = part._get_model_param_range_map(param)["param"].start
        param.main_grad.view(-1)[start] = float("nan")
    shards = [
        shard
        for part in optimizer.chained_optimizers
        for group in part.optimizer.param_groups
        for shard in group["params"]
    ]
    states = [
        t
        for part in optimizer.chained_optimizers
        for state in part.optimizer.state.values()
        for t in state.values()
    ]
    before = [t.clone() for t in (*shards, *states)]
    success, grad_norm, _ = optimizer.step()
    return {
        "success": success,
        "grad_norm": grad_norm,
        "unchanged": all(
            torch.equal(a, b) for a, b in zip(before, (*shards, *states), strict=True)
        ),
    }


@pytest.fixture(scope="module")
def dense_tp2_dp2() -> list[dict[str, Any]]:
    return run_ranks(4, _train, models.DENSE, Scenario(tp=2))


@pytest.fixture(scope="module")
def moe_ep2() -> list[dict[str, Any]]:
    return run_ranks(4, _train, models.MOE, Scenario(ep=2, hook=True))


@pytest.fixture(scope="module")
def moe_ep2_teams() -> list[dict[str, Any]]:
    return run_ranks(4, _train, models.MOE, Scenario(ep=2, teams=True))


@pytest.fixture(scope="module")
def dense_pp2_tp2() -> list[dict[str, Any]]:
    """Two pipeline stages of one layer each, TP=2 within a stage, DP=1."""
    return run_ranks(4, _train, models.DENSE, Scenario(tp=2, pp=2))


@pytest.fixture(scope="module")
def dense_tp2_dp2_blockwise() -> list[dict[str, Any]]:
    return run_ranks(4, _train, models.DENSE, Scenario(tp=2, tp_mode="blockwise", hook=True))


@pytest.fixture(scope="module")
def dense_tp2_dp2_fp16() -> list[dict[str, Any]]:
    return run_ranks(4, _train, models.DENSE, Scenario(tp=2, fp16=True, inf_step=0))


@pytest.fixture(scope="module")
def moe_expert_tp2() -> list[dict[str, Any]]:
    """Expert TP = 2, expert-DP = 2 (dense DP = 4): expert matrices are split over expert
    TP and their ZeRO shards over expert DP. (Attention TP stays 1: Megatron wants
    sequence parallelism with MoE and TP, which torch's norms, all there is here, lack.)"""
    return run_ranks(4, _train, models.MOE, Scenario(expert_tp=2))


@pytest.fixture(scope="module")
def moe_ep2_3d() -> list[dict[str, Any]]:
    return run_ranks(4, _train, models.MOE_3D, Scenario(ep=2))


def _assert_equal_to_reference(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        worst = max(result["main_errors"].values())
        assert worst <= TOLERANCE, (rank, result["main_errors"])
        assert max(result["model_over_bound"].values()) <= 0, (rank, result["model_over_bound"])


def test_tp2_dp2_dense_gpt_equals_single_process_muon_on_unsharded_model(dense_tp2_dp2) -> None:
    _assert_equal_to_reference(dense_tp2_dp2)


def test_ep2_moe_gpt_equals_single_process_muon_on_unsharded_model(moe_ep2) -> None:
    _assert_equal_to_reference(moe_ep2)


def test_ep2_moe_gpt_with_owner_teams_equals_single_process_muon(moe_ep2_teams) -> None:
    """Dense and expert matrices orthogonalised by teams of ranks (the experts planned
    first), the dense ones beside whole-matrix owners."""
    assert all(r["teams"]["dense"] > 0 for r in moe_ep2_teams), moe_ep2_teams[0]["teams"]
    _assert_equal_to_reference(moe_ep2_teams)


def test_blockwise_tp_mode_equals_single_process_muon_on_each_tp_ranks_blocks(
    dense_tp2_dp2_blockwise,
) -> None:
    """``--muon-tp-mode blockwise``: every TP rank's block of Q, K, V, proj, gate, up and
    fc2 is its own matrix (scaled by its own shape), exchanged over DP only."""
    _assert_equal_to_reference(dense_tp2_dp2_blockwise)
    for result in dense_tp2_dp2_blockwise:
        assert result["bytes"]["dense_tp"] == 0  # nothing is exchanged over TP
        assert result["reference_matrices"] == 7 * models.DENSE.layers
    assert sum(r["ns_matrices"] for r in dense_tp2_dp2_blockwise) == 2 * 7 * 2 * STEPS


def test_fp16_skips_overflowed_steps_and_otherwise_equals_single_process_muon(
    dense_tp2_dp2_fp16,
) -> None:
    """Megatron's loss scaler around muon_ds: a step that overflowed on one rank changes
    nothing on any rank and halves the scale; the others equal the reference on the
    unscaled gradients."""
    _assert_equal_to_reference(dense_tp2_dp2_fp16)
    for result in dense_tp2_dp2_fp16:
        assert [success for success, _, _ in result["norms"]] == [False, True, True]
        assert result["loss_scales"] == [2.0**10, 2.0**9, 2.0**9]
        assert result["saved_scaler"], "the scaler's state goes into the checkpoint"
        assert result["non_finite_step"] == {"success": False, "grad_norm": None, "unchanged": True}
    assert sum(r["ns_matrices"] for r in dense_tp2_dp2_fp16) == 7 * models.DENSE.layers * 2


def test_pp2_tp2_dense_gpt_equals_single_process_muon_on_each_stage(dense_pp2_tp2) -> None:
    _assert_equal_to_reference(dense_pp2_tp2)


def test_expert_tp2_moe_gpt_equals_single_process_muon_on_unsharded_model(moe_expert_tp2) -> None:
    _assert_equal_to_reference(moe_expert_tp2)
    # Megatron's expert TP group is the one the experts are split over.
    assert all(r["expert_tp"] == 2 for r in moe_expert_tp2)


def test_ep2_moe_with_3d_grouped_expert_weights_equals_single_process_muon(moe_ep2_3d) -> None:
    """TEGroupedMLP's single grouped weights: each expert's slice is its own matrix."""
    _assert_equal_to_reference(moe_ep2_3d)


def test_a_non_finite_gradient_on_one_rank_fails_the_step_everywhere(
    dense_tp2_dp2, moe_ep2
) -> None:
    for result in (*dense_tp2_dp2, *moe_ep2):
        assert result["non_finite_step"] == {"success": False, "grad_norm": None, "unchanged": True}


def test_training_setup_hook_builds_dense_and_expert_muon_ds_optimizers(moe_ep2) -> None:
    for result in moe_ep2:
        assert result["optimizers"] == ["MuonDistributedOptimizer"] * 2


def test_step_clips_raw_gradients_and_reports_their_norm(
    dense_tp2_dp2, moe_ep2, dense_pp2_tp2, dense_tp2_dp2_blockwise
) -> None:
    for result in (*dense_tp2_dp2, *moe_ep2, *dense_pp2_tp2, *dense_tp2_dp2_blockwise):
        for success, grad_norm, ref_norm in result["norms"]:
            assert success is True
            assert grad_norm == pytest.approx(ref_norm, rel=TOLERANCE)
            assert grad_norm > CLIP, "the test must exercise clipping"


def test_newton_schulz_runs_once_per_logical_matrix(
    dense_tp2_dp2, moe_ep2, moe_ep2_3d, moe_expert_tp2, dense_pp2_tp2
) -> None:
    # Dense, per layer: Q, K, V, proj, gate, up, fc2. MoE, per layer: Q, K, V, proj, router,
    # and gate, up, fc2 of every expert.
    dense, moe, moe_3d = models.DENSE, models.MOE, models.MOE_3D
    for results, matrices in (
        (dense_tp2_dp2, 7 * dense.layers),
        (moe_ep2, (5 + 3 * moe.experts) * moe.layers),
        (moe_ep2_3d, (5 + 3 * moe_3d.experts) * moe_3d.layers),
        (moe_expert_tp2, (5 + 3 * moe.experts) * moe.layers),
    ):
        assert results[0]["reference_matrices"] == matrices
        assert sum(r["ns_matrices"] for r in results) == matrices * STEPS
    # Each pipeline stage (ranks 0, 1 and 2, 3) orthogonalises its own layer's matrices.
    assert [r["reference_matrices"] for r in dense_pp2_tp2] == [7] * 4
    stage_ns = [sum(r["ns_matrices"] for r in dense_pp2_tp2[s : s + 2]) for s in (0, 2)]
    assert stage_ns == [7 * STEPS] * 2


def test_each_bucket_group_gathers_its_parameters_once_per_step(dense_tp2_dp2, moe_ep2) -> None:
    """With MoE the dense and the expert optimizer each gather only their own buckets."""
    for results in (dense_tp2_dp2, moe_ep2):
        for result in results:
            assert result["param_syncs"] == [STEPS] * result["bucket_groups"]
    assert all(r["bucket_groups"] >= 2 for r in moe_ep2)  # dense and expert buckets


def test_exchange_bytes_equal_plan_prediction(
    dense_tp2_dp2, moe_ep2, moe_ep2_3d, moe_expert_tp2, dense_pp2_tp2, dense_tp2_dp2_blockwise
) -> None:
    scenarios = (dense_tp2_dp2, moe_ep2, moe_ep2_3d, moe_expert_tp2, dense_pp2_tp2)
    for result in (r for results in (*scenarios, dense_tp2_dp2_blockwise) for r in results):
        assert result["bytes"] == result["predicted"]
