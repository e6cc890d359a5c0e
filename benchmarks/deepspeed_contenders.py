"""DeepSpeed contenders of the communication benchmark: ZeRO-1 AdamW, DeepSpeed's Muon, muon_ds.

Each trains the plain-torch model of ``benchmarks.torch_models`` under DeepSpeed ZeRO
stage 1 on gloo CPU ranks (or whatever accelerator DeepSpeed picks on a GPU machine) from
the same seed on the same tokens, with one lr and weight decay for every part
(``RunOptions``), gradient clipping off and AdamW betas (0.9, 0.95), eps 1e-8:

* ``zero1_adamw``: ``"type": "AdamW"`` with ``torch_adam`` (torch's AdamW on each rank's
  flat partition; DeepSpeed's FusedAdam would JIT-build an op on CPU).
* ``deepspeed_muon``: DeepSpeed 0.19.8's own ``"type": "Muon"`` (its AdamW half also
  torch's). It runs momentum and Newton-Schulz for every matrix a rank holds any part of
  inside ``engine.backward()``, in ZeRO's ``get_flat_partition``. ``ns_method: "standard"``
  is Moonlight's quintic (5 steps), which DeepSpeed runs in bf16 on this accelerator (its
  own choice, not configurable), under ``torch.compile``. Its update scale is
  ``sqrt(max(1, rows/cols))``, not Moonlight's ``0.2 sqrt(max(rows, cols))`` (no option),
  so its loss is not comparable to the others'; the counted work is.
* ``muon_ds_deepspeed``: ``"type": "MuonDS"`` (``import muon_ds.deepspeed``): Moonlight's
  Muon, each matrix orthogonalised once by its owner, Newton-Schulz and the exchange in the
  dtype ``ns_dtype="auto"`` resolves to on the device (named in the notes).

Optimizer time, the same for all three: ``engine.step()`` (norm check, the optimizer on the
local partition, the parameter all-gather) plus the time spent in ZeRO's
``get_flat_partition`` during backward, which is where DeepSpeed's Muon does its work (for
the other two it only flattens gradients).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import torch_models
from benchmarks.run_options import RunOptions, tokens
from benchmarks.shapes import ModelShape
from muon_ds.math import newton_schulz_flops
from muon_ds.testing import collectives

NS_STEPS = 5
ADAMW = {"betas": [0.9, 0.95], "eps": 1e-8}


def _optimizer_config(contender: str, options: RunOptions) -> dict[str, Any]:
    shared = {"lr": options.lr, "weight_decay": options.weight_decay}
    if contender == "zero1_adamw":
        return {"type": "AdamW", "params": {**shared, **ADAMW, "torch_adam": True}}
    if contender == "deepspeed_muon":
        muon = {"momentum": 0.95, "ns_method": "standard"}
        return {"type": "Muon", "params": {**shared, **ADAMW, **muon, "torch_adam": True}}
    betas = tuple(ADAMW["betas"])
    return {
        "type": "MuonDS",
        "params": {**shared, "adamw_betas": betas, "adamw_eps": ADAMW["eps"]},
    }


def _ds_config(shape: ModelShape, options: RunOptions, optimizer: dict[str, Any]) -> dict:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": shape.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": optimizer,
        "zero_optimization": {"stage": 1},
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


def synchronized_now() -> float:
    """Wall time after the device has finished what was queued (a no-op wait on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class _NewtonSchulzCount:
    """Matrices orthogonalised and their FLOPs, since construction."""

    def __init__(self) -> None:
        self.calls = 0
        self.flops = 0


def _count_deepspeed_muon(count: _NewtonSchulzCount) -> None:
    """Count DeepSpeed's Muon updates: ZeRO imports ``muon_update`` at each call, so the
    module attribute is what runs; each call orthogonalises one whole matrix once."""
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

    ZeRO's ``get_flat_partition`` runs in backward; DeepSpeed's Muon does its whole update
    there, so an optimizer time of ``engine.step()`` alone would miss it."""
    original: Callable[..., Any] = getattr(owner, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = synchronized_now()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += synchronized_now() - start

    setattr(owner, method, timed)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of momenta and moments (scalar step counters left out)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.numel() > 1
    )


def _muon_param_names(contender: str, engine: Any) -> list[str]:
    """The parameters this contender orthogonalises, read from the optimizer itself."""
    if contender == "deepspeed_muon":
        return [n for n, p in engine.module.named_parameters() if getattr(p, "use_muon", False)]
    if contender == "muon_ds_deepspeed":
        from muon_ds import routing_report

        return [t.name for t in routing_report(engine).tensors if t.route == "muon"]
    return []


def _ns_dtype(contender: str, engine: Any) -> str:
    """The dtype the contender's Newton-Schulz runs in, as the optimizer itself chose it."""
    if contender == "muon_ds_deepspeed":
        dtypes = {core.ns_dtype for core in engine.basic_optimizer._cores.values()}
    elif contender == "deepspeed_muon":
        from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

        dtypes = {ns_compute_dtype("standard")}
    else:
        return "none"
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _ns_totals(contender: str, engine: Any, count: _NewtonSchulzCount) -> tuple[int, int, int]:
    """Newton-Schulz calls and FLOPs so far, and (muon_ds only) its own exchange bytes."""
    if contender == "muon_ds_deepspeed":
        optimizer = engine.basic_optimizer
        flops = sum(c.counter.ns_flops for c in optimizer._cores.values())
        return optimizer.ns_matrices(), flops, optimizer.exchange_bytes()
    return count.calls, count.flops, 0


def _run(contender: str, rank: int, world: int, shape: ModelShape, options: RunOptions) -> dict:
    if options.layout not in ("", f"DP={world}"):
        raise ValueError(f"DeepSpeed contenders run DP={world} only, not {options.layout!r}")
    counter = collectives.install()
    _init_deepspeed()
    import deepspeed

    if contender == "muon_ds_deepspeed":
        import muon_ds.deepspeed  # noqa: F401  (registers "MuonDS")
    ns_count = _NewtonSchulzCount()
    if contender == "deepspeed_muon":
        _count_deepspeed_muon(ns_count)

    model = torch_models.build(shape, options.seed)
    config = _ds_config(shape, options, _optimizer_config(contender, options))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    expected = torch_models.muon_matrices(engine.module)
    routed = _muon_param_names(contender, engine)
    if routed and sorted(routed) != sorted(expected):
        raise RuntimeError(f"{contender} routes {len(routed)} matrices to Muon, not {expected}")
    flatten_seconds = [0.0]
    time_calls(engine.optimizer, "get_flat_partition", flatten_seconds)

    snapshots, ns_per_step, step_times, iteration_times = [], [], [], []
    loss = torch.zeros(())
    for step in range(options.warmup + options.steps):
        batch = tokens(shape, options, step, rank).to(engine.device)
        counter.reset()
        before = _ns_totals(contender, engine, ns_count)
        flatten_seconds[0] = 0.0
        start = synchronized_now()
        loss = engine(batch)
        engine.backward(loss)
        backward_done = synchronized_now()
        engine.step()
        end = synchronized_now()
        after = _ns_totals(contender, engine, ns_count)
        if step >= options.warmup:
            snapshots.append(counter.snapshot())
            ns_per_step.append(tuple(a - b for a, b in zip(after, before, strict=True)))
            step_times.append(end - backward_done + flatten_seconds[0])
            iteration_times.append(end - start)

    with counter.pause():
        final_loss = loss.detach().float().clone()
        dist.all_reduce(final_loss)
    staging = sum(
        staged.numel() * staged.element_size()
        for staged, _ in getattr(engine.optimizer, "_muon_pending_momentum", {}).values()
    )
    eager = os.environ.get("TORCHDYNAMO_DISABLE") == "1"  # what torch.compile itself reads
    compiled = "eager (TORCHDYNAMO_DISABLE=1)" if eager else "torch.compile"
    ns_dtype = _ns_dtype(contender, engine)
    notes = {
        "zero1_adamw": "torch AdamW on each rank's ZeRO-1 partition.",
        "deepspeed_muon": (
            "DeepSpeed's Muon: momentum + NS of every matrix a rank holds any part of, run in "
            f"backward (ZeRO get_flat_partition); NS 'standard' quintic, {ns_dtype}, "
            f"{compiled}; scale sqrt(max(1,rows/cols)); state_bytes leaves out its "
            "momentum staging copy (momentum_staging_bytes)."
        ),
        "muon_ds_deepspeed": (
            f"MuonDS: Moonlight's Muon, NS once per matrix by its owner; NS and wire in "
            f"{ns_dtype} (ns_dtype 'auto')."
        ),
    }[contender]
    return {
        "contender": contender,
        "framework": "deepspeed",
        "model": shape.name,
        "layout": f"DP={world}",
        "world": world,
        "rank": rank,
        "device": str(engine.device),
        "ns_dtype": ns_dtype,
        "collectives_per_step": _per_step(snapshots),
        "counts_constant": all(s == snapshots[0] for s in snapshots) and len(set(ns_per_step)) == 1,
        "ns_calls_per_step": _exact_mean([c for c, _, _ in ns_per_step]),
        "ns_flops_per_step": _exact_mean([f for _, f, _ in ns_per_step]),
        "own_exchange_bytes_per_step": _exact_mean([x for _, _, x in ns_per_step]),
        "logical_matrices": len(expected),
        "optimizer_step_seconds": statistics.median(step_times),
        "iteration_seconds": statistics.median(iteration_times),
        "optimizer_step_seconds_each": step_times,
        "iteration_seconds_each": iteration_times,
        "state_bytes": state_bytes(engine.basic_optimizer),
        "momentum_staging_bytes": staging,
        "param_count": sum(p.numel() for p in engine.module.parameters()),
        "final_loss": final_loss.item() / world,
        "notes": notes + " Optimizer time = engine.step() + ZeRO get_flat_partition in backward; "
        "iteration = forward + backward + step.",
    }


def _exact_mean(values: list[int]) -> int | float:
    total = sum(values)
    return total // len(values) if total % len(values) == 0 else total / len(values)


def _per_step(snapshots: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int | float]]:
    """Each op's calls and bytes summed over the measured steps, divided by their number."""
    ops = sorted({op for snapshot in snapshots for op in snapshot})
    return {
        op: {
            key: _exact_mean([s.get(op, {}).get(key, 0) for s in snapshots])
            for key in ("calls", "payload", "wire")
        }
        for op in ops
    }


def _contender(name: str) -> Callable[[int, int, ModelShape, RunOptions], dict]:
    def run(rank: int, world: int, shape: ModelShape, options: RunOptions) -> dict:
        return _run(name, rank, world, shape, options)

    run.__name__ = name
    return run


CONTENDERS: dict[str, Callable[[int, int, ModelShape, RunOptions], dict]] = {
    name: _contender(name) for name in ("zero1_adamw", "deepspeed_muon", "muon_ds_deepspeed")
}


def LAYOUTS(model: str, world: int) -> list[str]:  # noqa: N802  (the interface's name)
    """Plain ZeRO-1 data parallelism over every rank, for either model."""
    return [f"DP={world}"]
