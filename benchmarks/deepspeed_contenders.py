"""DeepSpeed contenders of the communication benchmark: AdamW, DeepSpeed's Muon and muon_ds
under ZeRO stage 1 and under ZeRO stage 3.

Each trains the plain-torch model of ``benchmarks.torch_models`` under DeepSpeed ZeRO on
gloo CPU ranks (or whatever accelerator DeepSpeed picks on a GPU machine) from the same
seed on the same tokens, with one lr and weight decay for every part (``RunOptions``),
gradient clipping off and AdamW betas (0.9, 0.95), eps 1e-8. The same three optimizers
run at each stage (``SPECS``); a stage-3 contender's ratios are over ``zero3_adamw``:

* ``zero1_adamw`` / ``zero3_adamw``: ``"type": "AdamW"`` with ``torch_adam`` (torch's AdamW
  on each rank's flat partition; DeepSpeed's FusedAdam would JIT-build an op on CPU).
* ``deepspeed_muon`` / ``deepspeed_muon_zero3``: DeepSpeed 0.19.8's own ``"type": "Muon"``
  (its AdamW half also torch's). ``ns_method: "standard"`` is Moonlight's quintic (5
  steps), which DeepSpeed runs in bf16 on this accelerator (its own choice, not
  configurable), under ``torch.compile``. Its update scale is ``sqrt(max(1, rows/cols))``,
  not Moonlight's ``0.2 sqrt(max(rows, cols))`` (no option), so its loss is not comparable
  to the others'; the counted work is. Under stage 1 it runs momentum and Newton-Schulz
  for every matrix a rank holds any part of inside ``engine.backward()``, in ZeRO's
  ``get_flat_partition``. Under stage 3 it needs ``"reduce_scatter": false`` (gradients
  are all-reduced; DeepSpeed refuses the two together) and runs in ``engine.step()``
  (``_apply_muon_to_accumulated_grads``): each matrix's full gradient and momentum are
  all-gathered, each rank orthogonalises a round-robin share, and the updates and momenta
  are all-gathered again.
* ``muon_ds_deepspeed`` / ``muon_ds_zero3``: ``"type": "MuonDS"`` (``import
  muon_ds.deepspeed``): Moonlight's Muon, each matrix orthogonalised once by its owner,
  Newton-Schulz and the exchange in the dtype ``ns_dtype="auto"`` resolves to on the
  device (named in the notes).

Optimizer time: ``engine.step()`` (norm check, the optimizer on the local partition, the
stage-1 parameter all-gather), plus under stage 1 the time spent in ZeRO's
``get_flat_partition`` during backward, which is where DeepSpeed's stage-1 Muon does its
work (for the other two it only flattens gradients). Each record also gives the state
the optimizer ideally keeps for this rank's partition (``benchmarks.records``).

ZeRO-3 checks its recorded parameter-fetch trace against the other ranks once, in the
second iteration (six small broadcasts from ``reset_step``), so its counts are the same
every step only from the third: keep ``--warmup`` at 2 or more (the default) for stage 3.
At these CPU sizes ZeRO-3's defaults keep every parameter gathered in forward until
backward (``stage3_max_reuse_distance`` 1e9 elements exceeds the model), so each one is
gathered once a step; a model past those limits is gathered again in backward.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import torch_models
from benchmarks.records import (
    Measured,
    ideal_state_bytes,
    state_bytes,
    synchronized_now,
)
from benchmarks.run_options import RunOptions, tokens
from benchmarks.shapes import ModelShape
from muon_ds.math import newton_schulz_flops
from muon_ds.testing import collectives

NS_STEPS = 5
ADAMW = {"betas": [0.9, 0.95], "eps": 1e-8}


@dataclass(frozen=True)
class Contender:
    """One optimizer (``adamw``, ``deepspeed_muon`` or ``muon_ds``) at one ZeRO stage."""

    name: str
    optimizer: str
    stage: int

    @property
    def framework(self) -> str:
        """The driver's grouping: ratios are over the AdamW of the same ZeRO stage."""
        return "deepspeed" if self.stage == 1 else "deepspeed_zero3"


SPECS = {
    spec.name: spec
    for spec in (
        Contender("zero1_adamw", "adamw", 1),
        Contender("deepspeed_muon", "deepspeed_muon", 1),
        Contender("muon_ds_deepspeed", "muon_ds", 1),
        Contender("zero3_adamw", "adamw", 3),
        Contender("deepspeed_muon_zero3", "deepspeed_muon", 3),
        Contender("muon_ds_zero3", "muon_ds", 3),
    )
}


def _optimizer_config(spec: Contender, options: RunOptions) -> dict[str, Any]:
    shared = {"lr": options.lr, "weight_decay": options.weight_decay}
    if spec.optimizer == "adamw":
        return {"type": "AdamW", "params": {**shared, **ADAMW, "torch_adam": True}}
    if spec.optimizer == "deepspeed_muon":
        muon = {"momentum": 0.95, "ns_method": "standard"}
        return {"type": "Muon", "params": {**shared, **ADAMW, **muon, "torch_adam": True}}
    betas = tuple(ADAMW["betas"])
    return {
        "type": "MuonDS",
        "params": {**shared, "adamw_betas": betas, "adamw_eps": ADAMW["eps"]},
    }


def _ds_config(shape: ModelShape, options: RunOptions, spec: Contender) -> dict:
    zero: dict[str, Any] = {"stage": spec.stage}
    if spec.stage == 3 and spec.optimizer == "deepspeed_muon":
        # stage3.py: "Muon and reduce scatter cannot be used together".
        zero["reduce_scatter"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": shape.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": _optimizer_config(spec, options),
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if options.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def _init_deepspeed() -> None:
    """Join the driver's world over gloo without JIT-building DeepSpeed's shared-memory op."""
    import deepspeed

    from muon_ds.patches.deepspeed import skip_shm_op_build

    skip_shm_op_build()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class _NewtonSchulzCount:
    """Matrices orthogonalised and their FLOPs, since construction."""

    def __init__(self) -> None:
        self.calls = 0
        self.flops = 0


def _count_deepspeed_muon(count: _NewtonSchulzCount) -> None:
    """Count DeepSpeed's Muon updates: ZeRO 1 and 3 import ``muon_update`` at each call, so
    the module attribute is what runs; each call orthogonalises one whole matrix once."""
    from deepspeed.runtime.zero.muon import original_muon

    compiled = original_muon.muon_update

    def counted(grad: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("is_expert_group") or kwargs.get("num_heads") is not None:
            raise RuntimeError("the benchmark counts whole-matrix Muon updates only")
        count.calls += 1
        count.flops += newton_schulz_flops(grad.shape[0], grad[0].numel(), NS_STEPS)
        return compiled(grad, *args, **kwargs)

    original_muon.muon_update = counted


def time_calls(owner: Any, method: str, seconds: list[float]) -> None:
    """Add the synchronised wall time of every call of ``owner.method`` to ``seconds[0]``.

    ZeRO-1's ``get_flat_partition`` runs in backward; DeepSpeed's stage-1 Muon does its
    whole update there, so an optimizer time of ``engine.step()`` alone would miss it."""
    original: Callable[..., Any] = getattr(owner, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = synchronized_now()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += synchronized_now() - start

    setattr(owner, method, timed)


def _muon_param_names(spec: Contender, engine: Any) -> list[str]:
    """The parameters this contender orthogonalises, read from the optimizer itself."""
    if spec.optimizer == "deepspeed_muon":
        return [n for n, p in engine.module.named_parameters() if getattr(p, "use_muon", False)]
    if spec.optimizer == "muon_ds":
        from muon_ds import routing_report

        return [t.name for t in routing_report(engine).tensors if t.route == "muon"]
    return []


def _ns_dtype(spec: Contender, engine: Any) -> str:
    """The dtype the contender's Newton-Schulz runs in, as the optimizer itself chose it."""
    if spec.optimizer == "muon_ds":
        dtypes = {core.ns_dtype for core in engine.basic_optimizer._cores.values()}
    elif spec.optimizer == "deepspeed_muon":
        from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

        dtypes = {ns_compute_dtype("standard")}
    else:
        return "none"
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _ns_totals(spec: Contender, engine: Any, count: _NewtonSchulzCount) -> tuple[int, int, int]:
    """Newton-Schulz calls and FLOPs so far, and (muon_ds only) its own exchange bytes."""
    if spec.optimizer == "muon_ds":
        optimizer = engine.basic_optimizer
        flops = sum(c.counter.ns_flops for c in optimizer._cores.values())
        return optimizer.ns_matrices(), flops, optimizer.exchange_bytes()
    return count.calls, count.flops, 0


def _planned_exchange_bytes(spec: Contender, engine: Any) -> int:
    """What muon_ds's plans say this rank sends per step in its exchanges (0 for others)."""
    if spec.optimizer != "muon_ds":
        return 0
    cores = engine.basic_optimizer._cores.values()
    return sum(sum(core.planned_bytes().values()) for core in cores)


def _held_elements(engine: Any, stage: int) -> dict[str, int]:
    """Elements of each parameter this rank's optimizer steps: its ZeRO-3 partition
    (``partition_numel``, the padding ZeRO-3 adds to each parameter included, as its flat
    fp32 partitions carry it) or its ZeRO-1 fragment."""
    from muon_ds.patches.deepspeed_zero import partition_fragment

    held = {}
    for name, param in engine.module.named_parameters():
        if stage == 3:
            held[name] = param.partition_numel()
        else:
            fragment = partition_fragment(param)
            held[name] = fragment.numel if fragment is not None else 0
    return held


def _engine(spec: Contender, shape: ModelShape, options: RunOptions) -> tuple[Any, list[str]]:
    """The contender's engine over a fresh model, and the model's Muon matrices (checked
    against what the optimizer routes to Muon)."""
    import deepspeed

    if spec.optimizer == "muon_ds":
        import muon_ds.deepspeed  # noqa: F401  (registers "MuonDS")
    model = torch_models.build(shape, options.seed)
    expected = torch_models.muon_matrices(model)  # before ZeRO-3 flattens the parameters
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_ds_config(shape, options, spec)
    )
    routed = _muon_param_names(spec, engine)
    if routed and sorted(routed) != sorted(expected):
        raise RuntimeError(f"{spec.name} routes {len(routed)} matrices to Muon, not {expected}")
    return engine, expected


def _train(
    spec: Contender,
    engine: Any,
    shape: ModelShape,
    options: RunOptions,
    rank: int,
    ns_count: _NewtonSchulzCount,
) -> Measured:
    """``warmup + steps`` iterations; counts and times of the measured ones."""
    counter = collectives.install()
    flatten_seconds = [0.0]
    if spec.stage == 1:
        time_calls(engine.optimizer, "get_flat_partition", flatten_seconds)
    measured = Measured([], [], [], [], torch.zeros(()))
    for step in range(options.warmup + options.steps):
        batch = tokens(shape, options, step, rank).to(engine.device)
        counter.reset()
        before = _ns_totals(spec, engine, ns_count)
        flatten_seconds[0] = 0.0
        start = synchronized_now()
        measured.loss = engine(batch)
        engine.backward(measured.loss)
        backward_done = synchronized_now()
        engine.step()
        end = synchronized_now()
        after = _ns_totals(spec, engine, ns_count)
        if step >= options.warmup:
            measured.snapshots.append(counter.snapshot())
            measured.ns_per_step.append(tuple(a - b for a, b in zip(after, before, strict=True)))
            measured.step_times.append(end - backward_done + flatten_seconds[0])
            measured.iteration_times.append(end - start)
    return measured


def _notes(spec: Contender, ns_dtype: str) -> str:
    eager = os.environ.get("TORCHDYNAMO_DISABLE") == "1"  # what torch.compile itself reads
    compiled = "eager (TORCHDYNAMO_DISABLE=1)" if eager else "torch.compile"
    if spec.stage == 1:
        where = "backward (ZeRO get_flat_partition)"
        timing = "engine.step() + ZeRO get_flat_partition in backward"
    else:
        where = "engine.step() (all-gathers full gradients and momenta; reduce_scatter off)"
        timing = "engine.step()"
    notes = {
        "adamw": f"torch AdamW on each rank's ZeRO-{spec.stage} partition.",
        "deepspeed_muon": (
            f"DeepSpeed's Muon at ZeRO-{spec.stage}: momentum + NS run in {where}; NS "
            f"'standard' quintic, {ns_dtype}, {compiled}; scale sqrt(max(1,rows/cols))"
            + (
                "; state_bytes leaves out its momentum staging copy (momentum_staging_bytes)."
                if spec.stage == 1
                else "."
            )
        ),
        "muon_ds": (
            f"MuonDS at ZeRO-{spec.stage}: Moonlight's Muon, NS once per matrix by its owner; "
            f"NS and wire in {ns_dtype} (ns_dtype 'auto')."
        ),
    }[spec.optimizer]
    return f"{notes} Optimizer time = {timing}; iteration = forward + backward + step."


def _run(spec: Contender, rank: int, world: int, shape: ModelShape, options: RunOptions) -> dict:
    if options.layout not in ("", f"DP={world}"):
        raise ValueError(f"DeepSpeed contenders run DP={world} only, not {options.layout!r}")
    counter = collectives.install()
    _init_deepspeed()
    ns_count = _NewtonSchulzCount()
    if spec.optimizer == "deepspeed_muon":
        _count_deepspeed_muon(ns_count)
    engine, expected = _engine(spec, shape, options)
    measured = _train(spec, engine, shape, options, rank, ns_count)
    with counter.pause():
        final_loss = measured.loss.detach().float().clone()
        dist.all_reduce(final_loss)
    return _record(spec, rank, world, shape, engine, expected, measured) | {
        "final_loss": final_loss.item() / world
    }


def _record(
    spec: Contender,
    rank: int,
    world: int,
    shape: ModelShape,
    engine: Any,
    expected: list[str],
    measured: Measured,
) -> dict[str, Any]:
    staging = sum(
        staged.numel() * staged.element_size()
        for staged, _ in getattr(engine.optimizer, "_muon_pending_momentum", {}).values()
    )
    muon = set(expected) if spec.optimizer != "adamw" else set()
    held = _held_elements(engine, spec.stage)
    ns_dtype = _ns_dtype(spec, engine)
    return {
        "contender": spec.name,
        "framework": spec.framework,
        "zero_stage": spec.stage,
        "model": shape.name,
        "layout": f"DP={world}",
        "world": world,
        "rank": rank,
        "device": str(engine.device),
        "ns_dtype": ns_dtype,
        **measured.counted_fields(),
        "plan_exchange_bytes_per_step": _planned_exchange_bytes(spec, engine),
        "logical_matrices": len(expected),
        "state_bytes": state_bytes(engine.basic_optimizer),
        "ideal_state_bytes": ideal_state_bytes((n, name in muon) for name, n in held.items()),
        "momentum_staging_bytes": staging,
        # ZeRO-3 empties each parameter's data and keeps its size as ds_numel.
        "param_count": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "notes": _notes(spec, ns_dtype),
    }


def _contender(spec: Contender) -> Callable[[int, int, ModelShape, RunOptions], dict]:
    def run(rank: int, world: int, shape: ModelShape, options: RunOptions) -> dict:
        return _run(spec, rank, world, shape, options)

    run.__name__ = spec.name
    return run


CONTENDERS: dict[str, Callable[[int, int, ModelShape, RunOptions], dict]] = {
    name: _contender(spec) for name, spec in SPECS.items()
}


def LAYOUTS(model: str, world: int) -> list[str]:  # noqa: N802  (the interface's name)
    """Plain ZeRO data parallelism over every rank, for either model."""
    return [f"DP={world}"]
