"""muon_ds beside Megatron's own TensorParallelMuon ("duplicated" TP mode), TP=2 x DP=2.

Both optimizers train the same bf16 GPT (plain fc1: Megatron's Muon never splits gate/up)
from the same weights with the same averaged gradients (one backward per step, copied
into the other model's grad buffers, so bf16 rounding cannot fork the trajectories).
Megatron's Muon gets Moonlight's settings: momentum 0.95, Nesterov, "simple"
coefficients, 5 steps, spectral scale x 0.2, AdamW betas (0.9, 0.95), and fp32
Newton-Schulz (``muon_fp32_matmul_prec="high"``) as muon_ds (``ns_dtype="float32"``).
Its EMA momentum is (1 - mu) x Moonlight's, a factor the Frobenius normalisation
removes, so the fp32 master params must agree within 1e-5.

Counted per step (exactly): Newton-Schulz matrices (muon_ds: once per logical matrix;
Megatron: on every rank, TP x DP times) and bytes each rank sends in the Muon step
(Megatron all-gathers every TP-split fp32 momentum over TP; muon_ds moves what its
plan says, here in fp32 too).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from muon_ds import MuonConfig
from tests.dist.zero1 import run_ranks
from tests.integration import megatron_models as models

pytestmark = pytest.mark.dist

STEPS = 3
LR, WEIGHT_DECAY, CLIP = 2e-2, 0.1, 1.0
CONFIG = MuonConfig(ns_dtype="float32")
TP, DP = 2, 2
TOLERANCE = 1e-5
MATRICES = 6 * models.PLAIN.layers
"""Q, K, V, proj, fc1, fc2 per layer."""


def _side_by_side(rank: int, world: int) -> dict[str, Any]:
    from muon_ds.patches import megatron_cpu

    megatron_cpu.install()
    from emerging_optimizers.orthogonalized_optimizers import muon_utils
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from muon_ds.megatron import get_muon_ds_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    try:
        common = {
            "optimizer": "muon",
            "lr": LR,
            "min_lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "clip_grad": CLIP,
            "bf16": True,
            "params_dtype": torch.bfloat16,
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "adam_eps": 1e-8,
        }
        ours_model = models.build(models.PLAIN, TP, 1)
        theirs_model = models.build(models.PLAIN, TP, 1, distributed_optimizer=False)
        ours = get_muon_ds_optimizer(
            OptimizerConfig(use_distributed_optimizer=True, **common), [ours_model], CONFIG
        )
        theirs = get_megatron_optimizer(
            OptimizerConfig(
                use_distributed_optimizer=False,
                use_layer_wise_distributed_optimizer=False,
                muon_momentum=0.95,
                muon_nesterov=True,
                muon_coefficient_type="simple",
                muon_num_ns_steps=5,
                muon_scale_mode="spectral",
                muon_extra_scale_factor=0.2,
                muon_tp_mode="duplicated",
                muon_fp32_matmul_prec="high",
                **common,
            ),
            [theirs_model],
        )
        counts = {"ns_matrices": 0, "bytes": 0, "counting": False}
        newton_schulz, all_gather = muon_utils.newton_schulz, dist.all_gather

        def counted_newton_schulz(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            counts["ns_matrices"] += 1 if x.ndim == 2 else x.shape[0]
            return newton_schulz(x, *args, **kwargs)

        def counted_all_gather(outputs: list, tensor: torch.Tensor, group: Any = None, **kw: Any):
            if counts["counting"]:
                peers = dist.get_world_size(group) - 1
                counts["bytes"] += tensor.numel() * tensor.element_size() * peers
            return all_gather(outputs, tensor, group, **kw)

        muon_utils.newton_schulz = counted_newton_schulz
        dist.all_gather = counted_all_gather
        for optimizer in (ours, theirs):
            models.constant_schedule(optimizer, LR, WEIGHT_DECAY, STEPS)
        for step in range(STEPS):
            # One backward (on our model); Megatron's optimizer gets the same averaged
            # gradients, so both trajectories see identical inputs at every step.
            ours.zero_grad()
            theirs.zero_grad()
            models.forward_backward(ours_model, step)
            models.all_gather_grad_buffers(ours_model)
            for (_, a), (_, b) in zip(
                models.named_params(ours_model), models.named_params(theirs_model), strict=True
            ):
                b.main_grad.copy_(a.main_grad)
            ours.step()
            counts["counting"] = True
            theirs.step()
            counts["counting"] = False
        errors = _master_errors(
            ours, theirs, models.named_params(ours_model), models.named_params(theirs_model)
        )
        muon = [part.optimizer for part in ours.chained_optimizers]
        return {
            "errors": errors,
            "ours_ns": sum(m.counter.ns_matrices for m in muon),
            "theirs_ns": counts["ns_matrices"],
            "ours_bytes": sum(
                n
                for m in muon
                for (op, _), n in m.counter.bytes_sent.items()
                if op.startswith("muon_")
            ),
            "theirs_bytes": counts["bytes"],
            "tp_split_local_numel": sum(
                p.numel()
                for n, p in models.named_params(theirs_model)
                if p.ndim == 2 and "embedding" not in n and "output_layer" not in n
            ),
        }
    finally:
        ps.destroy_model_parallel()


def _master_errors(
    ours: Any, theirs: Any, ours_named: list, theirs_named: list
) -> dict[str, float]:
    """Max |ours - theirs| of the fp32 master params, over the elements this rank holds."""
    master_of = {}
    for part in theirs.chained_optimizers:
        for params, masters in zip(part.float16_groups, part.fp32_from_float16_groups, strict=True):
            master_of.update(zip(params, masters, strict=True))
        for group in part.fp32_from_fp32_groups:
            master_of.update((p, p) for p in group)
    theirs_by_name = {name: master_of[p] for name, p in theirs_named}
    name_of = {p: name for name, p in ours_named}
    errors = {}
    for part in ours.chained_optimizers:
        model_params = [
            [*a, *b] for a, b in zip(part.model_fp32_groups, part.model_float16_groups, strict=True)
        ]
        for group, params in zip(part.optimizer.param_groups, model_params, strict=True):
            for main, param in zip(group["params"], params, strict=True):
                piece = part._get_model_param_range_map(param)["param"]
                expected = theirs_by_name[name_of[param]].detach().reshape(-1)
                error = (main - expected[piece.start : piece.end]).abs().max().item()
                errors[name_of[param]] = error
    return errors


@pytest.fixture(scope="module")
def side_by_side() -> list[dict[str, Any]]:
    return run_ranks(TP * DP, _side_by_side)


def test_muon_ds_matches_megatrons_duplicated_tp_muon_with_moonlight_settings(
    side_by_side,
) -> None:
    for rank, result in enumerate(side_by_side):
        assert max(result["errors"].values()) <= TOLERANCE, (rank, result["errors"])


def test_muon_ds_runs_newton_schulz_once_where_megatron_runs_it_on_every_rank(
    side_by_side,
) -> None:
    assert sum(r["ours_ns"] for r in side_by_side) == MATRICES * STEPS
    assert sum(r["theirs_ns"] for r in side_by_side) == MATRICES * TP * DP * STEPS


def test_muon_ds_moves_fewer_muon_bytes_than_megatrons_duplicated_mode(side_by_side) -> None:
    for result in side_by_side:
        # Megatron: every TP-split fp32 momentum (all of them here) to the TP - 1 peers.
        assert result["theirs_bytes"] == result["tp_split_local_numel"] * 4 * (TP - 1) * STEPS
        assert result["ours_bytes"] < result["theirs_bytes"]
