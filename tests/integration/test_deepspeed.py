"""muon_ds through DeepSpeed ZeRO-1/2 on gloo CPU ranks, against single-process Muon.

Each rank trains ``TinyLM`` with ``"type": "MuonDS"`` and also replays the same steps on
an unsharded copy with ``muon_ds.Muon``, feeding it the DP- and micro-step-averaged
gradient (clipped like DeepSpeed when clipping is on). Full fp32 params and optimizer
state are read back through DeepSpeed's own ``safe_get_full_*`` helpers.
Tolerance: ``ns_dtype="float32"`` so only reduction order differs (all-reduce vs a local
mean): 2e-5 absolute on params whose updates are ~1e-2.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Any

import pytest
import torch

from muon_ds import Muon, MuonConfig, MuonConfigError
from tests.dist.zero1 import run_ranks
from tests.integration.deepspeed_harness import TinyLM, batch, ds_config, use_gloo_only

STEPS = 3
TOL = 2e-5
MUON_PARAMS = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": "float32"}
TEAMS = {
    **MUON_PARAMS,
    "owner_team_max": 4,
    "team_flops_per_byte": 0.0,
    "owner_imbalance_limit": 1.0,
}
MATRICES = ("up.weight", "mid.weight", "down.weight")


def _reference(
    world: int, gas: int, clip: float, params: dict[str, Any]
) -> tuple[TinyLM, Muon, float]:
    """The unsharded run; also returns the last step's raw (pre-clipping) gradient norm."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = Muon(model, MuonConfig.from_dict(params))
    raw_norm = 0.0
    for step in range(STEPS):
        model.zero_grad()
        for rank in range(world):
            for micro in range(gas):
                (model(batch(step, rank, micro)) / (gas * world)).backward()
        raw_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")))
        optimizer.step()
    return model, optimizer, raw_norm


def _engine(config: dict[str, Any], client: Any = None) -> Any:
    """An engine over a fresh TinyLM; ``client(model)`` builds a client optimizer (the
    config then names none), an optimizer instance or a callable DeepSpeed calls."""
    import deepspeed

    import muon_ds.deepspeed  # noqa: F401  (registers "MuonDS")

    torch.manual_seed(0)
    model = TinyLM()
    optimizer = None
    if client is not None:
        config = {k: v for k, v in config.items() if k != "optimizer"}
        optimizer = client(model)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, optimizer=optimizer
    )
    return engine


def _client(model: TinyLM, **params: Any) -> Any:
    """MuonDS built by hand, as Hugging Face's optimizer_cls_and_kwargs does with model=."""
    from muon_ds.deepspeed import OrthogonalizedZeroOptimizer

    return OrthogonalizedZeroOptimizer(model, **{**MUON_PARAMS, **params})


def _train(engine: Any, rank: int, gas: int, steps: range) -> None:
    for step in steps:
        for micro in range(gas):
            engine.backward(engine(batch(step, rank, micro)))
            engine.step()


def _compare(engine: Any, reference: TinyLM, optimizer: Muon) -> dict[str, float]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    errors = {}
    ref_params = dict(reference.named_parameters())
    for name, param in engine.module.named_parameters():
        ref = ref_params[name]
        errors[name] = (safe_get_full_fp32_param(param) - ref).abs().max().item()
        # Under DeepSpeed a Muon matrix's momentum is "exp_avg" (see MOMENTUM_KEY).
        key = "momentum_buffer" if name in MATRICES else "exp_avg"
        state = safe_get_full_optimizer_state(param, "exp_avg")
        errors[f"{name}:{key}"] = (state - optimizer.state[ref][key]).abs().max().item()
    return errors


def _zero_cases(rank: int, world: int) -> dict[str, Any]:
    use_gloo_only(rank, world)
    from deepspeed.runtime.zero.muon import original_muon

    entered = []
    original_muon.muon_update = lambda *args, **kwargs: entered.append(1)
    results: dict[str, Any] = {}
    # ZeRO-2 also exempts ndim < 2 parameters and the embedding from weight decay.
    exempt = {**MUON_PARAMS, "decay_vectors_and_embeddings": False}
    cases = {
        "stage1": ({}, 1, 0.0, MUON_PARAMS),
        "stage1_gas2_clip": (
            {"gradient_accumulation_steps": 2, "gradient_clipping": 0.05},
            2,
            0.05,
            MUON_PARAMS,
        ),
        "stage2_decay_exempt": ({"zero_optimization": {"stage": 2}}, 1, 0.0, exempt),
        # Teams of up to 4 ranks, their traffic weighed at nothing, the balance tightest:
        # the tiny model's largest matrices are then orthogonalised by teams.
        "stage1_teams": ({}, 1, 0.0, TEAMS),
    }
    for name, (overrides, gas, clip, params) in cases.items():
        engine = _engine(ds_config({"type": "MuonDS", "params": params}, **overrides))
        _train(engine, rank, gas, range(STEPS))
        reference, optimizer, raw_norm = _reference(world, gas, clip, params)
        results[name] = {
            "raw_norm": raw_norm,
            "deepspeed_muon_calls": len(entered),
            "errors": _compare(engine, reference, optimizer),
            "ns_matrices": engine.basic_optimizer.ns_matrices(),
            "team_matrices": sum(
                m.team is not None
                for plan in engine.basic_optimizer.plans().values()
                for m in plan.matrices
            ),
            "exchange_bytes": engine.basic_optimizer.exchange_bytes(),
            "wrapper": type(engine.optimizer).__name__,
            "grad_norm": float(engine.get_global_grad_norm()),
        }
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["dp2", "dp4"])
def zero_runs(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_ranks(request.param, _zero_cases, timeout=900)


def test_zero_training_equals_single_process_muon(zero_runs) -> None:
    """Params and optimizer state after 3 steps, ZeRO-1, ZeRO-1 with GAS 2 + clipping, ZeRO-2
    with the weight-decay exemption."""
    _, results = zero_runs
    for rank, by_case in enumerate(results):
        for case, result in by_case.items():
            assert result["wrapper"] == "DeepSpeedZeroOptimizer"
            worst = max(result["errors"].values())
            assert worst <= TOL, (rank, case, result["errors"])


def test_each_matrix_is_orthogonalised_once_per_step_across_ranks(zero_runs) -> None:
    _, results = zero_runs
    for case in results[0]:
        teamed = results[0][case]["team_matrices"]  # every rank plans every team alike
        assert all(r[case]["team_matrices"] == teamed for r in results)
        whole = sum(r[case]["ns_matrices"] for r in results)
        assert whole + teamed * STEPS == len(MATRICES) * STEPS
    assert results[0]["stage1_teams"]["team_matrices"] > 0


def test_reported_grad_norm_is_the_raw_gradient_norm(zero_runs) -> None:
    """Clipping and the reported norm use the raw gradients, never orthogonalised updates."""
    _, results = zero_runs
    for by_case in results:
        for result in by_case.values():
            assert result["grad_norm"] == pytest.approx(result["raw_norm"], rel=1e-5)


def test_deepspeed_own_muon_path_is_never_entered(zero_runs) -> None:
    """DeepSpeed switches to its Muon on a class name with "muon" or params with use_muon."""
    _, results = zero_runs
    for by_case in results:
        assert all(result["deepspeed_muon_calls"] == 0 for result in by_case.values())


# --- resume -------------------------------------------------------------------------------


def _resume(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Save at step 2 of a config-built run; resume it with the config and by hand (a
    client optimizer, as Hugging Face builds it); then try loading it under another
    routing and under other weight-decay groups."""
    from deepspeed.utils import safe_get_full_fp32_param

    use_gloo_only(rank, world)
    config = ds_config({"type": "MuonDS", "params": MUON_PARAMS})
    straight = _engine(config)
    _train(straight, rank, 1, range(2))
    straight.save_checkpoint(directory, tag="step2")
    _train(straight, rank, 1, range(2, 4))
    differences = {}
    for how, client in (("config", None), ("client", _client)):
        resumed = _engine(config, client)
        resumed.load_checkpoint(directory, tag="step2")
        _train(resumed, rank, 1, range(2, 4))
        differences[how] = {
            name: (safe_get_full_fp32_param(a) - safe_get_full_fp32_param(b)).abs().max().item()
            for (name, a), (_, b) in zip(
                straight.module.named_parameters(), resumed.module.named_parameters(), strict=True
            )
        }
    refusals = {}
    changes = {
        "rerouted": {"adamw_patterns": ["*embed*", "*lm_head*", "mid.*"]},
        "regrouped": {"decay_vectors_and_embeddings": False},
    }
    for name, change in changes.items():
        engine = _engine(ds_config({"type": "MuonDS", "params": {**MUON_PARAMS, **change}}))
        try:
            engine.load_checkpoint(directory, tag="step2")
            refusals[name] = "no error"
        except (ValueError, RuntimeError) as error:
            refusals[name] = f"{type(error).__name__}: {error}"
    return {"differences": differences, "refusals": refusals}


@pytest.fixture(scope="module")
def resumes() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory:
        return run_ranks(2, _resume, directory, timeout=900)


@pytest.mark.parametrize(
    ("units", "resolved"),
    [
        (
            None,
            "float32 (ns_dtype 'auto' on cpu: no bf16 matrix units found (neither AMX nor "
            "AVX-512 BF16 usable through torch's oneDNN))",
        ),
        ("AMX", "bfloat16 (ns_dtype 'auto' on cpu: AMX)"),
    ],
)
def test_start_up_lines_name_the_config_and_what_auto_resolved_to(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, units, resolved: str
) -> None:
    """What a run's log says about its Newton-Schulz dtype (one process: rank 0's view)."""
    from muon_ds import device
    from muon_ds.deepspeed import OrthogonalizedZeroOptimizer

    monkeypatch.setattr(device, "_cpu_bf16_units", lambda: units)
    capsys.readouterr()  # what importing DeepSpeed printed
    OrthogonalizedZeroOptimizer([("w", torch.nn.Parameter(torch.zeros(4, 6)))], lr=0.02)
    assert capsys.readouterr().out.splitlines() == [
        f"muon_ds: effective {MuonConfig(lr=0.02)}",
        f"muon_ds: Newton-Schulz and exchange in {resolved}",
    ]


def test_built_without_names_it_refuses_and_names_both_ways_to_pass_them() -> None:
    """Shape alone would put the embedding and the head on Muon without a word."""
    from muon_ds.deepspeed import OrthogonalizedZeroOptimizer, UnsupportedDeepSpeedSetupError

    model = TinyLM()
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]  # what HF passes
    with pytest.raises(UnsupportedDeepSpeedSetupError) as refused:
        OrthogonalizedZeroOptimizer(groups, lr=0.02)
    message = str(refused.value)
    assert "but 7 of 7 parameters have none (shapes [29, 24], [77, 24], [77]," in message
    assert "OrthogonalizedZeroOptimizer(model, ...) or model=model beside param groups" in message
    assert (
        'optimizer_cls_and_kwargs=(OrthogonalizedZeroOptimizer, {"model": model, ...})' in message
    )
    assert "OrthogonalizedZeroOptimizer(model.named_parameters(), ...)" in message


@pytest.mark.parametrize(
    "build",
    [
        lambda cls, model: cls(model),
        lambda cls, model: cls(model.named_parameters()),
        lambda cls, model: cls([{"params": list(model.parameters())}], model=model),
    ],
    ids=["model", "named_parameters", "groups_and_model"],
)
def test_given_names_it_routes_like_moonlight(build: Any) -> None:
    from muon_ds import routing_report
    from muon_ds.deepspeed import OrthogonalizedZeroOptimizer

    report = routing_report(build(OrthogonalizedZeroOptimizer, TinyLM()))
    assert sorted(t.name for t in report.tensors if t.route == "muon") == sorted(MATRICES)
    assert [t.name for t in report.matrices_on_adamw()] == ["embed.weight", "lm_head.weight"]


def test_stepping_outside_a_deepspeed_engine_is_refused() -> None:
    from muon_ds.deepspeed import OrthogonalizedZeroOptimizer, UnsupportedDeepSpeedSetupError

    optimizer = OrthogonalizedZeroOptimizer(TinyLM())
    with pytest.raises(
        UnsupportedDeepSpeedSetupError,
        match=r"MuonDS steps inside a DeepSpeed engine with zero_optimization stage 1, 2 or 3, "
        r"but a parameter of shape \(77, 24\) is not partitioned by ZeRO",
    ):
        optimizer.step()


@pytest.mark.parametrize("how", ["config", "client"])
def test_checkpoint_resume_continues_bit_identically(resumes, how: str) -> None:
    """Resumed from step 2 by a config-built or a hand-built (client) optimizer."""
    for result in resumes:
        assert max(result["differences"][how].values()) == 0.0, result["differences"][how]


def test_a_checkpoint_under_another_routing_is_refused_naming_the_parameters(resumes) -> None:
    """Refused by muon_ds before DeepSpeed's own parameter-alignment check."""
    for result in resumes:
        assert result["refusals"]["rerouted"].startswith(
            "ValueError: muon_ds: the checkpoint routes parameters to Muon and AdamW "
            "differently from this run: saved on Muon but not on Muon now: 1 (mid.weight); "
            "on Muon now but not saved on Muon: none."
        ), result["refusals"]["rerouted"]


def test_a_checkpoint_with_other_weight_decay_groups_is_refused_naming_them(resumes) -> None:
    for result in resumes:
        message = result["refusals"]["regrouped"]
        assert message.startswith(
            "ValueError: muon_ds: the checkpoint groups parameters differently from this run "
            "(2 param groups saved, 3 now; 3 parameters changed group: down.bias, embed.weight, "
            "up.bias), although none changed route"
        ), message


# --- refusals and config errors -------------------------------------------------------------


def _refusals(rank: int, world: int) -> dict[str, str]:
    use_gloo_only(rank, world)
    cases = {
        "stage0": ds_config({"type": "MuonDS", "params": {}}, zero_optimization={"stage": 0}),
        "offload": ds_config(
            {"type": "MuonDS", "params": {}},
            zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}},
        ),
        "bad_param": ds_config({"type": "MuonDS", "params": {"momentum": 1.5}}),
        "unknown_key": ds_config({"type": "MuonDS", "params": {"muon_lr": 0.1}}),
    }
    messages = {}
    for name, config in cases.items():
        messages[name] = _error_of(lambda config=config: _engine(config))
    # Built by hand (Hugging Face's optimizer_cls_and_kwargs), handed over as an instance or
    # as a callable; and replaced behind DeepSpeed's back (Accelerate under offload).
    stage1 = ds_config({"type": "MuonDS", "params": {}})
    client_cases = {
        "client_stage0": ({"zero_optimization": {"stage": 0}}, _client),
        "client_offload": (
            {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
            _client,
        ),
        "client_callable_stage0": (
            {"zero_optimization": {"stage": 0}},
            lambda model: lambda params: _client(model),
        ),
        "client_replaced": ({}, lambda model: torch.optim.AdamW(_client(model).param_groups)),
    }
    for name, (overrides, client) in client_cases.items():
        config = {**stage1, **overrides}
        messages[name] = _error_of(lambda config=config, client=client: _engine(config, client))
    return messages


def _error_of(build: Any) -> str:
    try:
        build()
    except (RuntimeError, MuonConfigError, ValueError, AssertionError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


EXPECTED_REFUSALS = {
    "stage0": r"UnsupportedDeepSpeedSetupError: MuonDS needs zero_optimization stage 1, 2 or 3, "
    r"got 0",
    "offload": r"UnsupportedDeepSpeedSetupError: MuonDS does not support offload_optimizer",
    "bad_param": r"MuonConfigError: momentum=1.5 is not allowed: expected a number in \[0.0, 1.0\)",
    "unknown_key": r"MuonConfigError: unknown MuonConfig key\(s\) \['muon_lr'\]",
    "client_stage0": r"^UnsupportedDeepSpeedSetupError: MuonDS needs zero_optimization stage 1, "
    r"2 or 3, got 0",
    "client_offload": r"^UnsupportedDeepSpeedSetupError: MuonDS does not support offload_optimizer",
    "client_callable_stage0": r"^UnsupportedDeepSpeedSetupError: MuonDS needs zero_optimization "
    r"stage 1, 2 or 3, got 0",
    "client_replaced": r"^UnsupportedDeepSpeedSetupError: deepspeed.initialize got a AdamW "
    r"holding the param groups of a MuonDS optimizer .* remove it from zero_optimization",
}


@pytest.fixture(scope="module")
def refusals() -> list[dict[str, str]]:
    return run_ranks(2, _refusals, timeout=900)


@pytest.mark.parametrize("case", sorted(EXPECTED_REFUSALS))
def test_unsupported_setups_and_bad_params_fail_inside_initialize(refusals, case: str) -> None:
    for messages in refusals:
        assert re.search(EXPECTED_REFUSALS[case], messages[case]), messages[case]


# --- mixed precision, overflow skip, LR schedule -------------------------------------------


def _record_gradients(engine: Any) -> list[dict[str, torch.Tensor]]:
    """Wrap our optimizer's step to record the full averaged gradient DeepSpeed hands it.

    Each rank holds its partition's gradient; placing it by its partition map into zeros and
    all-reducing rebuilds every parameter's full gradient (each element has one holder).
    One dict per engine step, merged over the per-group ``step()`` calls.
    """
    import torch.distributed as dist

    from muon_ds.patches.deepspeed_zero import partition_fragment

    optimizer = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    steps: list[dict[str, torch.Tensor]] = []
    real_step = optimizer.step

    def step(closure: Any = None) -> Any:
        grads = {}
        for group in optimizer.param_groups:
            flat = group["params"][0]
            for param in optimizer._model_params[group["muon_ds_group"]]:
                full = torch.zeros(param.numel())
                fragment = partition_fragment(param)
                if fragment is not None:
                    lo, n, hp = fragment.param_start, fragment.numel, fragment.partition_start
                    full[lo : lo + n] = flat.grad[hp : hp + n]
                dist.all_reduce(full)
                grads[names[id(param)]] = full.view(param.shape)
        if not steps or set(grads) & set(steps[-1]):
            steps.append({})
        steps[-1].update(grads)
        return real_step(closure)

    optimizer.step = step
    return steps


def _replay_errors(
    engine: Any, masters: dict[str, torch.Tensor], recorded: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Max error of each fp32 master against Muon replayed from ``masters`` on ``recorded``."""
    from deepspeed.utils import safe_get_full_fp32_param

    torch.manual_seed(0)
    reference = TinyLM()
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(masters[n])
    optimizer = Muon(reference, MuonConfig.from_dict(MUON_PARAMS))
    for grads in recorded:
        for n, p in reference.named_parameters():
            p.grad = grads[n]
        optimizer.step()
    expected = dict(reference.named_parameters())
    return {
        n: (safe_get_full_fp32_param(p) - expected[n]).abs().max().item()
        for n, p in engine.module.named_parameters()
    }


def _precision_cases(rank: int, world: int) -> dict[str, Any]:
    """bf16 runs checked against Muon replayed on DeepSpeed's own gradients and masters."""
    from deepspeed.utils import safe_get_full_fp32_param

    use_gloo_only(rank, world)
    results: dict[str, Any] = {}
    cases = {
        "bf16": {"bf16": {"enabled": True}},
        "bf16_fp32_accumulation": {
            "bf16": {"enabled": True},
            "data_types": {"grad_accum_dtype": "fp32"},
        },
    }
    for name, overrides in cases.items():
        engine = _engine(ds_config({"type": "MuonDS", "params": MUON_PARAMS}, **overrides))
        masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
        recorded = _record_gradients(engine)
        _train(engine, rank, 1, range(STEPS))
        results[name] = {
            "steps_recorded": len(recorded),
            "errors": _replay_errors(engine, masters, recorded),
            "wrapper": type(engine.optimizer).__name__,
        }

    # Overflow: a non-finite loss on one step is skipped by DeepSpeed before our step runs.
    engine = _engine(ds_config({"type": "MuonDS", "params": MUON_PARAMS}, bf16={"enabled": True}))
    results["overflow"] = overflow_outcome(engine, rank)

    # One scheduled lr drives the Muon and the AdamW groups alike.
    scheduler = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 0.02,
            "warmup_num_steps": 4,
            "warmup_type": "linear",
        },
    }
    engine = _engine(ds_config({"type": "MuonDS", "params": MUON_PARAMS}, scheduler=scheduler))
    lrs = []
    for step in range(STEPS):
        lrs.append([group["lr"] for group in engine.optimizer.param_groups])
        _train(engine, rank, 1, range(step, step + 1))
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = Muon(model, MuonConfig.from_dict(MUON_PARAMS))
    for step in range(STEPS):
        model.zero_grad()
        for r in range(world):
            (model(batch(step, r, 0)) / world).backward()
        for group in optimizer.param_groups:
            group["lr"] = lrs[step][0]
        optimizer.step()
    scheduled = dict(model.named_parameters())
    results["scheduled"] = {
        "lrs": lrs,
        "errors": {
            n: (safe_get_full_fp32_param(p) - scheduled[n]).abs().max().item()
            for n, p in engine.module.named_parameters()
        },
    }
    results["fp16"] = _fp16_dynamic_loss_scale(rank)
    return results


def overflow_outcome(engine: Any, rank: int) -> dict[str, Any]:
    """One good step, then one with a non-finite loss: how many steps were skipped, and
    whether the fp32 params and a Muon matrix's momentum are unchanged by it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _train(engine, rank, 1, range(1))
    params = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    momentum = safe_get_full_optimizer_state(engine.module.up.weight, "exp_avg")
    engine.backward(engine(batch(1, rank, 0)) * float("inf"))
    engine.step()
    return {
        "skipped": engine.skipped_steps,
        "params_unchanged": all(
            torch.equal(params[n], safe_get_full_fp32_param(p))
            for n, p in engine.module.named_parameters()
        ),
        "momentum_unchanged": torch.equal(
            momentum, safe_get_full_optimizer_state(engine.module.up.weight, "exp_avg")
        ),
    }


FP16_STEPS = 6
FP16_CONFIG = {"enabled": True, "initial_scale_power": 20, "hysteresis": 1}
"""A 2^20 initial loss scale overflows fp16 gradients on some steps of TinyLM, so dynamic
loss scaling really skips steps and halves the scale (steps 0, 1 and 5 here)."""


def _fp16_dynamic_loss_scale(rank: int) -> dict[str, Any]:
    """fp16 with dynamic loss scaling: the steps that ran equal Muon on their gradients.

    DeepSpeed's CPU accelerator claims fp16 only where oneDNN has native fp16 kernels;
    torch computes fp16 on any CPU, so the accelerator is told it may (test-only). The
    recorder sees only the steps DeepSpeed hands to the optimizer, with gradients already
    unscaled; replaying Muon on exactly those proves skipped steps left the momentum alone.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import safe_get_full_fp32_param

    type(get_accelerator()).is_fp16_supported = lambda self: True
    engine = _engine(ds_config({"type": "MuonDS", "params": MUON_PARAMS}, fp16=FP16_CONFIG))
    masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    initial_scale = engine.optimizer.cur_scale
    recorded = _record_gradients(engine)
    _train(engine, rank, 1, range(FP16_STEPS))
    return {
        "wrapper": type(engine.optimizer).__name__,
        "steps_recorded": len(recorded),
        "skipped": engine.skipped_steps,
        "scale_lowered": engine.optimizer.cur_scale < initial_scale,
        "errors": _replay_errors(engine, masters, recorded),
    }


@pytest.fixture(scope="module")
def precision_runs() -> list[dict[str, Any]]:
    return run_ranks(2, _precision_cases, timeout=900)


def test_bf16_training_equals_muon_on_the_same_gradients(precision_runs) -> None:
    """bf16 with bf16 gradients (ZeRO wrapper) and with fp32 accumulation (BF16_Optimizer)."""
    for result in precision_runs:
        assert result["bf16"]["wrapper"] == "DeepSpeedZeroOptimizer"
        assert result["bf16_fp32_accumulation"]["wrapper"] == "BF16_Optimizer"
        for case in ("bf16", "bf16_fp32_accumulation"):
            assert result[case]["steps_recorded"] == STEPS
            worst = max(result[case]["errors"].values())
            assert worst <= TOL, (case, result[case]["errors"])


def test_an_overflow_step_is_skipped_and_leaves_momentum_untouched(precision_runs) -> None:
    for result in precision_runs:
        assert result["overflow"] == {
            "skipped": 1,
            "params_unchanged": True,
            "momentum_unchanged": True,
        }


def test_fp16_dynamic_loss_scaling_skips_overflows_and_trains_like_muon(precision_runs) -> None:
    """Overflowed steps are skipped (scale halved); the others equal Muon on their grads."""
    for result in precision_runs:
        fp16 = result["fp16"]
        assert fp16["wrapper"] == "DeepSpeedZeroOptimizer"
        assert fp16["skipped"] >= 1
        assert fp16["scale_lowered"]
        assert fp16["steps_recorded"] == FP16_STEPS - fp16["skipped"] >= 1
        assert max(fp16["errors"].values()) <= TOL, fp16["errors"]


def test_one_scheduled_lr_drives_muon_and_adamw_groups(precision_runs) -> None:
    for result in precision_runs:
        lrs = result["scheduled"]["lrs"]
        assert all(len(set(step)) == 1 for step in lrs)  # every group, Muon and AdamW
        assert len({step[0] for step in lrs}) >= 2  # and the schedule really moved
        assert max(result["scheduled"]["errors"].values()) <= TOL


# --- side by side with DeepSpeed's own Muon -------------------------------------------------


VERSUS_STEPS = 4
"""Steps of the side-by-side run: enough for momentum to carry several different gradients,
which is where a wrong momentum or Nesterov form shows (at step 1 the normalisation inside
Newton-Schulz removes both)."""

ADAM = {"betas": [0.9, 0.95], "eps": 1e-8}
"""The AdamW settings both optimizers get for the embedding, head and biases."""


def _versus_deepspeed_muon(rank: int, world: int) -> dict[str, Any]:
    """``VERSUS_STEPS`` steps of each on the same model and batches, configured to the same math.

    DeepSpeed 0.19.8 routes by name and shape as Moonlight does (``embed`` and ``lm_head``
    to Adam, the other matrices to Muon), scales by sqrt(max(1, rows/cols)) ("keller"
    here) and keeps an EMA momentum, (1 - mu) x Moonlight's at every step, whose Nesterov
    blend is (1 - mu) x Moonlight's too: Newton-Schulz normalises the factor away, so the
    two trajectories are the same up to rounding. A third run, ours without Nesterov,
    shows what a wrong momentum form does to the same comparison. Newton-Schulz calls are
    counted by wrapping DeepSpeed's kernels, ours by the exchange counter.
    """
    use_gloo_only(rank, world)
    from deepspeed.runtime.zero.muon import original_muon
    from deepspeed.utils import safe_get_full_fp32_param

    calls = []
    for kernel in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
        wrapped = getattr(original_muon, kernel)

        def counting(*args: Any, _wrapped: Any = wrapped, **kwargs: Any) -> Any:
            calls.append(1)
            return _wrapped(*args, **kwargs)

        setattr(original_muon, kernel, counting)
    common = {"lr": 0.02, "weight_decay": 0.0, **ADAM}
    ours_params = {**common, "scale_mode": "keller", "ns_dtype": "float32"}
    engines = {
        "ours": _engine(ds_config({"type": "MuonDS", "params": ours_params})),
        "ours_without_nesterov": _engine(
            ds_config({"type": "MuonDS", "params": {**ours_params, "nesterov": False}})
        ),
        "theirs": _engine(
            ds_config(
                {
                    "type": "Muon",
                    "params": {
                        **common,
                        "momentum": 0.95,
                        "ns_method": "standard",
                        "torch_adam": True,  # DeepSpeed's FusedAdam would JIT-build
                    },
                }
            )
        ),
    }
    before = {n: safe_get_full_fp32_param(p) for n, p in engines["ours"].module.named_parameters()}
    for engine in engines.values():
        _train(engine, rank, 1, range(VERSUS_STEPS))

    def moved(engine: Any) -> dict[str, torch.Tensor]:
        return {
            n: safe_get_full_fp32_param(p) - before[n]
            for n, p in engine.module.named_parameters()
            if n in MATRICES
        }

    theirs = moved(engines["theirs"])
    differences = {
        name: {n: ((a - theirs[n]).norm() / theirs[n].norm()).item() for n, a in moved(e).items()}
        for name, e in engines.items()
        if name != "theirs"
    }

    def state_bytes(engine: Any) -> int:
        return sum(
            t.numel() * t.element_size()
            for state in engine.basic_optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t) and t.numel() > 1
        )

    return {
        "relative_update_difference": differences,
        "ours_ns": engines["ours"].basic_optimizer.ns_matrices(),
        "theirs_ns": len(calls),  # only DeepSpeed's Muon calls its kernels
        "ours_state_bytes": state_bytes(engines["ours"]),
        "theirs_state_bytes": state_bytes(engines["theirs"]),
        "ours_exchange_bytes": engines["ours"].basic_optimizer.exchange_bytes(),
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["dp2", "dp4"])
def versus(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_ranks(request.param, _versus_deepspeed_muon, timeout=900)


VERSUS_TOLERANCE = 0.15
"""Relative difference of the summed updates allowed between muon_ds (fp32 Newton-Schulz)
and DeepSpeed's Muon (bf16 Newton-Schulz on CPU). bf16 keeps 8 bits, and Newton-Schulz
lifts a near-low-rank gradient's tiny singular values, where that rounding lives, to about
1. Measured over 4 steps at DP 2 and 4: 2-8% apart, against 29-38% for muon_ds without
Nesterov."""


def test_same_updates_over_several_steps_as_deepspeed_muon(versus) -> None:
    for result in versus:
        ours = result["relative_update_difference"]["ours"]
        assert max(ours.values()) <= VERSUS_TOLERANCE, result


def test_a_wrong_momentum_form_fails_the_comparison_with_deepspeed_muon(versus) -> None:
    """The comparison above can fail: dropping Nesterov moves the updates past it."""
    for result in versus:
        wrong = result["relative_update_difference"]["ours_without_nesterov"]
        assert max(wrong.values()) > 2 * VERSUS_TOLERANCE, result


def test_fewer_newton_schulz_calls_and_less_state_than_deepspeed_muon(versus) -> None:
    ours = sum(r["ours_ns"] for r in versus)
    theirs = sum(r["theirs_ns"] for r in versus)
    assert ours == len(MATRICES) * VERSUS_STEPS
    assert theirs > ours  # a straddling matrix is orthogonalised by each of its holders
    for result in versus:
        assert result["ours_state_bytes"] < result["theirs_state_bytes"]


REDUCTION_MODES = {"all_reduce": True, "reduce": False}
"""DeepSpeed's ``use_multi_rank_bucket_allreduce``: True (its default) all-reduces the whole
gradient; False reduces each partition's slice to its owner, except that DeepSpeed's own
Muon must still all-reduce every matrix that straddles a partition."""


def _bytes_versus_deepspeed_muon(rank: int, world: int) -> dict[str, Any]:
    """Wire bytes of one step (after a first) per op: AdamW, DeepSpeed's Muon, muon_ds."""
    from muon_ds.testing import collectives

    counter = collectives.install()  # before DeepSpeed caches its collective functions
    use_gloo_only(rank, world)
    contenders = {
        # torch's Adam(W): DeepSpeed's default FusedAdam would JIT-build on a fresh machine.
        "adamw": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "deepspeed_muon": {
            "type": "Muon",
            "params": {"lr": 0.02, "ns_method": "standard", "torch_adam": True},
        },
        "muon_ds": {"type": "MuonDS", "params": MUON_PARAMS},
    }
    results: dict[str, Any] = {}
    for mode, multi_rank in REDUCTION_MODES.items():
        zero = {"stage": 1, "use_multi_rank_bucket_allreduce": multi_rank}
        for name, optimizer in contenders.items():
            engine = _engine(ds_config(optimizer, zero_optimization=zero))
            _train(engine, rank, 1, range(1))
            exchanged = engine.basic_optimizer.exchange_bytes() if name == "muon_ds" else 0
            counter.reset()
            _train(engine, rank, 1, range(1, 2))
            wire = {op: counted["wire"] for op, counted in counter.snapshot().items()}
            if name == "muon_ds":
                wire["exchange"] = engine.basic_optimizer.exchange_bytes() - exchanged
            results[f"{mode}:{name}"] = wire
    return results


@pytest.fixture(scope="module")
def bytes_versus() -> list[dict[str, Any]]:
    return run_ranks(4, _bytes_versus_deepspeed_muon, timeout=900)


def _total(wire: dict[str, int]) -> int:
    return sum(n for op, n in wire.items() if op != "exchange")


def test_under_all_reduce_muon_ds_adds_exactly_its_exchange_to_deepspeed_muon(
    bytes_versus,
) -> None:
    """DeepSpeed all-reduces the full gradient, so its Muon moves no extra byte: it repeats
    Newton-Schulz on every holder of a straddling matrix instead. muon_ds moves the same
    gradient and parameter bytes plus its bf16 exchange of straddling slices, and no more."""
    for result in bytes_versus:
        ours, theirs = result["all_reduce:muon_ds"], result["all_reduce:deepspeed_muon"]
        assert ours["exchange"] > 0  # TinyLM's matrices straddle DP=4 partitions
        assert ours["all_to_all_single"] == ours["exchange"]
        assert {op: n for op, n in ours.items() if op not in ("all_to_all_single", "exchange")} == (
            theirs
        )


def test_under_partition_reduce_muon_ds_moves_fewer_bytes_than_deepspeed_muon(
    bytes_versus,
) -> None:
    """With per-partition reduces, DeepSpeed's Muon all-reduces straddling matrices whole;
    muon_ds keeps ZeRO's reduce for every gradient and exchanges only the slices."""
    for result in bytes_versus:
        ours, theirs = result["reduce:muon_ds"], result["reduce:deepspeed_muon"]
        adamw = result["reduce:adamw"]
        assert ours["reduce"] == adamw["reduce"]
        assert ours["all_to_all_single"] == ours["exchange"] > 0
        assert _total(ours) < _total(theirs)


# --- resharding: DP 4 -> DP 2 through DeepSpeed's universal checkpoint ---------------------


def _reshard_save(rank: int, world: int, directory: str) -> None:
    """DP=4: two steps, checkpoint, two more steps; rank 0 keeps the final fp32 params."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    use_gloo_only(rank, world)
    engine = _engine(ds_config({"type": "MuonDS", "params": MUON_PARAMS}))
    _train(engine, rank, 1, range(2))
    momentum = safe_get_full_optimizer_state(engine.module.mid.weight, "exp_avg")
    engine.save_checkpoint(directory, tag="step2")
    _train(engine, rank, 1, range(2, 4))
    final = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"final": final, "momentum": momentum}, f"{directory}/dp4.pt")


def _reshard_load(rank: int, world: int, directory: str) -> dict[str, Any]:
    """DP=2 from the universal checkpoint; each rank plays two DP=4 ranks' micro-batches.
    Loaded first under another routing, which the checkpoint's record refuses."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    use_gloo_only(rank, world)
    rerouted = {**MUON_PARAMS, "adamw_patterns": ["*embed*", "*lm_head*", "mid.*"]}
    refusal = _error_of(
        lambda: _engine(
            ds_config({"type": "MuonDS", "params": rerouted}, checkpoint={"load_universal": True})
        ).load_checkpoint(directory)
    )
    config = ds_config(
        {"type": "MuonDS", "params": MUON_PARAMS},
        gradient_accumulation_steps=2,
        checkpoint={"load_universal": True},
    )
    engine = _engine(config)
    engine.load_checkpoint(directory)
    saved = torch.load(f"{directory}/dp4.pt", weights_only=False)
    for step in range(2, 4):
        for micro in range(2):
            engine.backward(engine(batch(step, rank + world * micro, 0)))
            engine.step()
    momentum = safe_get_full_optimizer_state(engine.module.mid.weight, "exp_avg")
    return {
        "param_errors": {
            n: (safe_get_full_fp32_param(p) - saved["final"][n]).abs().max().item()
            for n, p in engine.module.named_parameters()
        },
        "momentum_changed": not torch.equal(momentum, saved["momentum"]),
        "steps": engine.global_steps,
        "rerouted": refusal,
    }


def test_checkpoint_saved_at_dp4_resumes_at_dp2_with_the_same_momentum() -> None:
    """Resume at DP=2 equals the uninterrupted DP=4 run: momentum (and Adam moments) carried;
    the universal checkpoint keeps the routing record, so another routing is refused."""
    import subprocess

    with tempfile.TemporaryDirectory() as directory:
        run_ranks(4, _reshard_save, directory, timeout=900)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                f"{directory}/step2",
                "--output_folder",
                f"{directory}/step2_universal",
                "--inject_missing_state",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
        )
        with open(f"{directory}/latest_universal", "w") as latest:
            latest.write("step2_universal")
        for result in run_ranks(2, _reshard_load, directory, timeout=900):
            assert max(result["param_errors"].values()) <= TOL, result
            assert result["momentum_changed"]
            assert result["rerouted"].startswith(
                "ValueError: muon_ds: the checkpoint routes parameters to Muon and AdamW "
                "differently from this run: saved on Muon but not on Muon now: 1 (mid.weight)"
            ), result["rerouted"]
