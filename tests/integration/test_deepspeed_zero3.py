"""muon_ds through DeepSpeed ZeRO stage 3 on gloo CPU ranks, against single-process Muon
and against muon_ds on ZeRO-2.

Each rank trains ``TinyLM`` with ``"type": "MuonDS"`` under stage 3 and replays the same
steps on an unsharded copy with ``muon_ds.Muon`` (``test_deepspeed._reference``). Full fp32
params and optimizer state are read back through DeepSpeed's ``safe_get_full_*`` helpers,
which under stage 3 gather our state from every rank's sub-group partitions.
Tolerance: as in ``test_deepspeed``: fp32 Newton-Schulz, only the reduction order differs
(2e-5 on updates of ~1e-2). Against ZeRO-2, the same muon_ds on the same gradients: the
partitions differ, so only the gradient reduction order and the owners change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import torch

from tests.dist.zero1 import run_ranks
from tests.integration.deepspeed_harness import TinyLM, batch, ds_config, use_gloo_only
from tests.integration.test_deepspeed import (
    FP16_CONFIG,
    FP16_STEPS,
    MATRICES,
    MUON_PARAMS,
    STEPS,
    TOL,
    _compare,
    _reference,
    _replay_errors,
    _train,
    overflow_outcome,
)

TINY_SUB_GROUP = 300
"""A ``sub_group_size`` that cuts TinyLM's parameters into several ZeRO-3 sub-groups
(each closes once it reaches this many partition elements), so one step calls the
optimizer once per sub-group."""


def _engine3(config: dict[str, Any], zero_init: bool) -> Any:
    """An engine over a fresh TinyLM, built inside ``zero.Init`` when ``zero_init``
    (its parameters then arrive partitioned, their data empty)."""
    import deepspeed

    import muon_ds.deepspeed  # noqa: F401  (registers "MuonDS")

    torch.manual_seed(0)
    scope = (
        deepspeed.zero.Init(config_dict_or_path=config) if zero_init else contextlib.nullcontext()
    )
    with scope:
        model = TinyLM()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine


def _stage3(sub_group_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    zero = {"stage": 3}
    if sub_group_size is not None:
        zero["sub_group_size"] = sub_group_size
    return ds_config({"type": "MuonDS", "params": MUON_PARAMS}, zero_optimization=zero, **overrides)


CASES: dict[str, tuple[dict[str, Any], int, float, bool]] = {
    # name: (config, gradient accumulation, clipping, zero.Init)
    "default_sub_group": (_stage3(), 1, 0.0, False),
    "tiny_sub_group": (_stage3(TINY_SUB_GROUP), 1, 0.0, False),
    "gas2_clip_tiny_sub_group": (
        _stage3(TINY_SUB_GROUP, gradient_accumulation_steps=2, gradient_clipping=0.05),
        2,
        0.05,
        False,
    ),
    "zero_init": (_stage3(), 1, 0.0, True),
    "zero_init_tiny_sub_group_gas2": (
        _stage3(TINY_SUB_GROUP, gradient_accumulation_steps=2),
        2,
        0.0,
        True,
    ),
}


def _zero3_cases(rank: int, world: int) -> dict[str, Any]:
    use_gloo_only(rank, world)
    results: dict[str, Any] = {}
    for name, (config, gas, clip, zero_init) in CASES.items():
        engine = _engine3(config, zero_init)
        _train(engine, rank, gas, range(STEPS))
        reference, optimizer, raw_norm = _reference(world, gas, clip, MUON_PARAMS)
        basic = engine.basic_optimizer
        results[name] = {
            "wrapper": type(engine.optimizer).__name__,
            "sub_groups": len(engine.optimizer.fp16_groups),
            "errors": _compare(engine, reference, optimizer),
            "raw_norm": raw_norm,
            "grad_norm": float(engine.get_global_grad_norm()),
            "ns_matrices": basic.ns_matrices(),
            "exchange_bytes": basic.exchange_bytes(),
            "planned_bytes": STEPS
            * sum(core.planned_bytes()["dense"] for core in basic._cores.values()),
            "routes": basic.routing_report().routes(),
            "state_bytes": sum(
                t.numel() * t.element_size()
                for state in basic.state.values()
                for key, t in state.items()
                if key != "step"
            ),
        }
        if name == "default_sub_group":
            zero3 = _full_state(engine)
    # The same muon_ds on ZeRO-2 partitions: only the gradient reduction and owners differ.
    engine = _engine3(CASES["default_sub_group"][0] | {"zero_optimization": {"stage": 2}}, False)
    _train(engine, rank, 1, range(STEPS))
    zero2 = _full_state(engine)
    results["versus_zero2"] = max((zero3[k] - zero2[k]).abs().max().item() for k in zero2)
    return results


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["dp2", "dp3", "dp4"])
def zero3_runs(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_ranks(request.param, _zero3_cases, timeout=900)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero3_training_equals_single_process_muon(zero3_runs, case: str) -> None:
    _, results = zero3_runs
    for result in results:
        outcome = result[case]
        assert outcome["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
        assert max(outcome["errors"].values()) <= TOL, outcome["errors"]


def test_tiny_sub_groups_step_several_partitions(zero3_runs) -> None:
    _, results = zero3_runs
    assert results[0]["tiny_sub_group"]["sub_groups"] >= 4
    assert results[0]["default_sub_group"]["sub_groups"] == 2  # the Muon half, the AdamW half


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_matrix_is_orthogonalised_once_per_step_across_ranks(zero3_runs, case) -> None:
    _, results = zero3_runs
    assert sum(r[case]["ns_matrices"] for r in results) == STEPS * len(MATRICES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_counted_exchange_bytes_equal_the_plan(zero3_runs, case: str) -> None:
    _, results = zero3_runs
    for result in results:
        assert result[case]["exchange_bytes"] == result[case]["planned_bytes"]
        assert result[case]["exchange_bytes"] > 0  # every matrix spans every rank


def test_zero3_equals_muon_ds_on_zero2(zero3_runs) -> None:
    _, results = zero3_runs
    for result in results:
        assert result["versus_zero2"] <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_state_is_sharded_without_copies(zero3_runs, case: str) -> None:
    """Over all ranks: 4 bytes (Muon's fp32 momentum) or 8 (Adam's two moments) per element
    of every parameter, padded to a multiple of the ranks as ZeRO-3 pads it; nothing more."""
    world, results = zero3_runs
    model, routes = TinyLM(), results[0][case]["routes"]
    ideal = sum(
        -(-p.numel() // world) * world * (4 if routes[n] == "muon" else 8)
        for n, p in model.named_parameters()
    )
    assert sum(r[case]["state_bytes"] for r in results) == ideal


def test_zero_init_routes_by_the_full_shape(zero3_runs) -> None:
    """Under zero.Init the parameters' data are empty; routing still sees the matrices."""
    _, results = zero3_runs
    routes = results[0]["zero_init"]["routes"]
    assert routes == results[0]["default_sub_group"]["routes"]
    assert {n for n, r in routes.items() if r == "muon"} == set(MATRICES)


def test_clipping_and_the_reported_norm_use_the_raw_gradient(zero3_runs) -> None:
    _, results = zero3_runs
    outcome = results[0]["gas2_clip_tiny_sub_group"]
    assert outcome["grad_norm"] == pytest.approx(outcome["raw_norm"], rel=1e-5)


# --- checkpoints: resume, and DP 4 -> DP 2 through DeepSpeed's universal checkpoint ---------

# Exempt groups (weight decay 0) beside decayed ones: a loader that gave every group one
# group's settings would change the updates.
EXEMPT = {**MUON_PARAMS, "decay_vectors_and_embeddings": False}


def _full_state(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 value and first moment (Muon's momentum, Adam's m)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    full = {}
    for name, param in engine.module.named_parameters():
        full[name] = safe_get_full_fp32_param(param)
        full[f"{name}:exp_avg"] = safe_get_full_optimizer_state(param, "exp_avg")
    return full


CHECKPOINTED = ds_config(
    {"type": "MuonDS", "params": EXEMPT},
    zero_optimization={"stage": 3, "sub_group_size": TINY_SUB_GROUP},
)


def _checkpoint_and_go_on(rank: int, directory: str) -> dict[str, torch.Tensor]:
    """Two steps, checkpoint "step2", two more: the uninterrupted run's final state."""
    engine = _engine3(CHECKPOINTED, zero_init=False)
    _train(engine, rank, 1, range(2))
    engine.save_checkpoint(directory, tag="step2")
    _train(engine, rank, 1, range(2, 4))
    return _full_state(engine)


def _resume3(rank: int, world: int, directory: str) -> dict[str, float]:
    """A fresh engine loads the checkpoint and takes the same two steps. Returns the
    largest difference of each tensor from the uninterrupted run."""
    use_gloo_only(rank, world)
    uninterrupted = _checkpoint_and_go_on(rank, directory)
    resumed = _engine3(CHECKPOINTED, zero_init=False)
    resumed.load_checkpoint(directory, tag="step2")
    _train(resumed, rank, 1, range(2, 4))
    return {
        name: (value - uninterrupted[name]).abs().max().item()
        for name, value in _full_state(resumed).items()
    }


def test_zero3_checkpoint_resume_continues_bit_identically() -> None:
    with tempfile.TemporaryDirectory() as directory:
        for differences in run_ranks(2, _resume3, directory, timeout=900):
            assert max(differences.values()) == 0.0, differences


def _universal_save(rank: int, world: int, directory: str) -> None:
    """DP=4 saves the checkpoint; rank 0 keeps the uninterrupted run's final state."""
    use_gloo_only(rank, world)
    final = _checkpoint_and_go_on(rank, directory)
    if rank == 0:
        torch.save(final, f"{directory}/dp4.pt")


def _universal_load(rank: int, world: int, directory: str) -> dict[str, float]:
    """DP=2 from the universal checkpoint; each rank plays two DP=4 ranks' micro-batches."""
    use_gloo_only(rank, world)
    config = ds_config(
        {"type": "MuonDS", "params": EXEMPT},
        zero_optimization={"stage": 3},
        gradient_accumulation_steps=2,
        checkpoint={"load_universal": True},
    )
    engine = _engine3(config, zero_init=False)
    engine.load_checkpoint(directory)
    for step in range(2, 4):
        for micro in range(2):
            engine.backward(engine(batch(step, rank + world * micro, 0)))
            engine.step()
    saved = torch.load(f"{directory}/dp4.pt", weights_only=False)
    return {
        name: (value - saved[name]).abs().max().item()
        for name, value in _full_state(engine).items()
    }


def test_zero3_checkpoint_saved_at_dp4_resumes_at_dp2_through_the_universal_format() -> None:
    """Params, Muon momentum and Adam moments equal the uninterrupted DP=4 run's (within the
    reduction-order tolerance: DP 2 with accumulation sums the gradients in another order)."""
    with tempfile.TemporaryDirectory() as directory:
        run_ranks(4, _universal_save, directory, timeout=900)
        _to_universal(directory, "step2")
        for differences in run_ranks(2, _universal_load, directory, timeout=900):
            assert max(differences.values()) <= TOL, differences


def _to_universal(directory: str, tag: str) -> None:
    """DeepSpeed's own converter, as a user runs it; ``latest_universal`` names the result."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            *("--input_folder", f"{directory}/{tag}"),
            *("--output_folder", f"{directory}/{tag}_universal"),
            "--inject_missing_state",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    with open(f"{directory}/latest_universal", "w") as latest:
        latest.write(f"{tag}_universal")


# --- precision: bf16, fp16 dynamic loss scaling, a skipped overflow ------------------------


def _record_gradients3(engine: Any) -> list[dict[str, torch.Tensor]]:
    """The full gradient of every parameter at each optimizer step, as ZeRO-3 hands it to
    the optimizer (averaged, unscaled, clipped): each sub-group's flat partition gradient,
    placed by ``zero3_partition`` and summed over the ranks."""
    import torch.distributed as dist

    from muon_ds.patches.deepspeed_zero import full_shape, zero3_partition

    optimizer = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    steps: list[dict[str, torch.Tensor]] = []
    real_step = optimizer.step

    def step(closure: Any = None) -> Any:
        grads = {}
        for group in optimizer.param_groups:
            if not group["params"]:
                continue
            flat = group["params"][0]
            for param in optimizer._model_params[group["muon_ds_group"]]:
                part = zero3_partition(param)
                if part.buffer is not flat:
                    continue
                full = torch.zeros(math.prod(full_shape(param)))
                lo, n = part.param_start, part.numel
                full[lo : lo + n] = flat.grad[part.offset : part.offset + n]
                dist.all_reduce(full)
                grads[names[id(param)]] = full.view(full_shape(param))
        if not steps or set(grads) & set(steps[-1]):
            steps.append({})
        steps[-1].update(grads)
        return real_step(closure)

    optimizer.step = step
    return steps


def _precision3(rank: int, world: int) -> dict[str, Any]:
    """bf16 and fp16 under stage 3, checked against Muon replayed on ZeRO-3's own gradients
    and masters; a non-finite bf16 step skipped with momentum untouched."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import safe_get_full_fp32_param

    use_gloo_only(rank, world)
    type(get_accelerator()).is_fp16_supported = lambda self: True  # as in test_deepspeed
    results: dict[str, Any] = {}
    cases = {
        "bf16": ({"bf16": {"enabled": True}}, STEPS),
        "fp16": ({"fp16": FP16_CONFIG}, FP16_STEPS),
    }
    for name, (overrides, steps) in cases.items():
        engine = _engine3(_stage3(TINY_SUB_GROUP, **overrides), zero_init=False)
        masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
        recorded = _record_gradients3(engine)
        _train(engine, rank, 1, range(steps))
        results[name] = {
            "steps_recorded": len(recorded),
            "skipped": engine.skipped_steps,
            "errors": _replay_errors(engine, masters, recorded),
        }

    engine = _engine3(_stage3(TINY_SUB_GROUP, bf16={"enabled": True}), zero_init=False)
    results["overflow"] = overflow_outcome(engine, rank)
    return results


@pytest.fixture(scope="module")
def precision3() -> list[dict[str, Any]]:
    return run_ranks(2, _precision3, timeout=900)


def test_zero3_bf16_training_equals_muon_on_the_same_gradients(precision3) -> None:
    for result in precision3:
        assert result["bf16"]["steps_recorded"] == STEPS
        assert max(result["bf16"]["errors"].values()) <= TOL, result["bf16"]["errors"]


def test_zero3_fp16_loss_scaling_skips_overflows_and_trains_like_muon(precision3) -> None:
    """Overflowed steps never reach the optimizer; the others equal Muon on their grads."""
    for result in precision3:
        fp16 = result["fp16"]
        assert fp16["skipped"] >= 1
        assert fp16["steps_recorded"] == FP16_STEPS - fp16["skipped"] >= 1
        assert max(fp16["errors"].values()) <= TOL, fp16["errors"]


def test_zero3_overflow_step_is_skipped_and_leaves_momentum_untouched(precision3) -> None:
    for result in precision3:
        assert result["overflow"] == {
            "skipped": 1,
            "params_unchanged": True,
            "momentum_unchanged": True,
        }


# --- refusals: ZeRO-3 features not covered, inside deepspeed.initialize --------------------

UNCOVERED = {
    "offload_optimizer": (
        {"offload_optimizer": {"device": "cpu"}},
        {},
        r"MuonDS does not support offload_optimizer",
    ),
    "offload_param": (
        {"offload_param": {"device": "cpu"}},
        {},
        r"MuonDS does not support offload_param yet",
    ),
    "hpz": ({"zero_hpz_partition_size": 2}, {}, r"MuonDS does not support ZeRO\+\+'s zero_hpz"),
    "quantized_weights": (
        {"zero_quantized_weights": True},
        {},
        r"MuonDS does not support ZeRO\+\+'s zero_quantized_weights",
    ),
    "quantized_gradients": (
        {"zero_quantized_gradients": True},
        {},
        r"MuonDS does not support ZeRO\+\+'s zero_quantized_weights / zero_quantized_gradients",
    ),
}
"""Case: (zero_optimization additions, top-level config additions, expected message)."""

UNREACHABLE_ON_TINY_LM = {
    "autotp": r"MuonDS does not support AutoTP \(tensor_parallel.autotp_size > 1\) yet",
    "autoep": r"MuonDS does not support AutoEP \(expert_parallel\) yet",
    "zenflow": r"MuonDS does not support ZenFlow \(zero_optimization.zenflow\) yet",
}
"""Settings whose DeepSpeed set-up needs a model TinyLM is not (AutoTP and AutoEP look
for a known architecture, ZenFlow for its CPU optimizer op) before the optimizer is built;
refused from the settings muon_ds reads."""


def _refusals3(rank: int, world: int) -> dict[str, str]:
    use_gloo_only(rank, world)
    messages = {}
    for name, (zero, top, _) in UNCOVERED.items():
        config = ds_config(
            {"type": "MuonDS", "params": MUON_PARAMS},
            zero_optimization={"stage": 3, **zero},
            **top,
        )
        try:
            _engine3(config, zero_init=False)
            messages[name] = "no error"
        except Exception as error:  # what is refused, and by whom, is the assertion
            messages[name] = f"{type(error).__name__}: {error}"
    return messages


@pytest.fixture(scope="module")
def refusals3() -> list[dict[str, str]]:
    return run_ranks(2, _refusals3, timeout=900)


@pytest.mark.parametrize("case", sorted(UNCOVERED))
def test_uncovered_zero3_features_are_refused_inside_initialize(refusals3, case: str) -> None:
    for messages in refusals3:
        assert messages[case].startswith("UnsupportedDeepSpeedSetupError: "), messages[case]
        assert re.search(UNCOVERED[case][2], messages[case]), messages[case]


@pytest.mark.parametrize("feature", sorted(UNREACHABLE_ON_TINY_LM))
def test_zero3_features_refused_from_the_settings(feature: str) -> None:
    from muon_ds.deepspeed.support import UnsupportedDeepSpeedSetupError, refuse_unsupported
    from muon_ds.patches.deepspeed_zero import ZeroSettings

    settings = ZeroSettings(stage=3, offload_optimizer=False, round_robin_gradients=False)
    refuse_unsupported(settings)  # plain stage 3 is supported
    with pytest.raises(UnsupportedDeepSpeedSetupError, match=UNREACHABLE_ON_TINY_LM[feature]):
        refuse_unsupported(dataclasses.replace(settings, **{feature: True}))
