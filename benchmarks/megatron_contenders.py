"""Megatron-core contenders of the communication benchmark (``python -m benchmarks.comm_overhead``).

Every contender trains the same ``GPTModel`` (local layer spec, CPU initialisation,
RMSNorm, RoPE, SwiGLU, GQA; MoE with a shared expert, the first layer dense and the
allgather token dispatcher) built from ``benchmarks.shapes``, from the same seed on the
same synthetic tokens, with Megatron's DDP, scheduler, grad clipping and param
all-gather. Only the optimizer differs:

* ``megatron_adam``: Megatron's DistributedOptimizer with Adam (the baseline).
* ``megatron_muon_layerwise``: Megatron's Muon as ``--optimizer muon
  --use-distributed-optimizer`` runs it: the layer-wise distributed optimizer (each matrix
  wholly on one DP rank) over emerging-optimizers' ``TensorParallelMuon`` in duplicated TP
  mode.
* ``megatron_muon_duplicated``: ``TensorParallelMuon`` in duplicated TP mode without a
  distributed optimizer (full gradient all-reduce; every rank orthogonalises every matrix).
* ``muon_ds_megatron``: ``muon_ds.megatron.get_muon_ds_optimizer``.

Both Megatron Muon variants get Moonlight's settings (momentum 0.95, Nesterov, "simple"
coefficients, 5 steps, spectral scale x 0.2, bf16 Newton-Schulz); muon_ds runs its defaults,
Newton-Schulz in what ``ns_dtype="auto"`` resolves to on the device (reported in the notes).
Newton-Schulz is counted by wrapping emerging-optimizers' ``newton_schulz`` (which its TP
variants call), muon_ds's by its own counter. ``run`` executes inside a spawned rank whose
``collectives.install()`` has run before Megatron is imported (Megatron binds some
collectives at import), so the CUDA stand-ins and every Megatron import stay inside it.

These contenders run on CPU gloo ranks only (``muon_ds.patches.megatron_cpu`` installed,
parameters on the CPU), even where a GPU is present; an NCCL/GPU variant is not written.
A bare ``assert`` failing inside Megatron is re-raised with its file, line and condition,
so the driver's one-line error names it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.run_options import RunOptions, tokens
from benchmarks.shapes import ModelShape
from muon_ds.math import newton_schulz_flops
from muon_ds.patches import megatron_cpu
from muon_ds.testing import collectives

LAYOUTS: dict[tuple[str, int], list[str]] = {
    ("dense", 2): ["DP=2"],
    ("dense", 4): ["DP=4", "TP=2xDP=2"],
    ("moe", 2): ["DP=2", "EP=2xDP=1"],
    ("moe", 4): ["DP=4", "EP=2xDP=2"],
}
"""(model, world) -> layouts. With EP, DP is the expert-DP size (dense DP = world / TP)."""

CLIP_GRAD = 1.0
ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8
MOONLIGHT_MEGATRON_MUON = {
    "muon_momentum": 0.95,
    "muon_nesterov": True,
    "muon_coefficient_type": "simple",
    "muon_num_ns_steps": 5,
    "muon_scale_mode": "spectral",
    "muon_extra_scale_factor": 0.2,
    "muon_tp_mode": "duplicated",
    "muon_fp32_matmul_prec": "medium",
}
"""Megatron's Muon flags that reproduce Moonlight's rule ("medium" = bf16 Newton-Schulz)."""

_LAYOUT_PART = re.compile(r"(TP|EP|DP)=(\d+)")


def parallel_sizes(layout: str, world: int) -> tuple[int, int]:
    """``(tp, ep)`` of a layout string such as ``"TP=2xDP=2"`` or ``"EP=2xDP=1"``."""
    parts = layout.split("x")
    matches = [_LAYOUT_PART.fullmatch(p) for p in parts]
    if not all(matches) or len({m.group(1) for m in matches}) != len(matches):
        raise ValueError(
            f"layout {layout!r}: expected 'x'-joined TP=n, EP=n, DP=n (each at most once), "
            "e.g. 'DP=4', 'TP=2xDP=2', 'EP=2xDP=2'"
        )
    sizes = {m.group(1): int(m.group(2)) for m in matches}
    tp, ep, dp = sizes.get("TP", 1), sizes.get("EP", 1), sizes.get("DP", 1)
    if tp * ep * dp != world or (tp > 1 and ep > 1):
        raise ValueError(
            f"layout {layout!r} does not fit world {world}: TP x EP x DP must equal the world "
            "(DP being expert-DP when EP is given), and TP with EP is not benchmarked"
        )
    return tp, ep


@contextlib.contextmanager
def _located_assertions() -> Iterator[None]:
    """Give a bare ``assert`` failing in Megatron its place and condition as the message,
    so the driver's one-line error says what failed."""
    try:
        yield
    except AssertionError as error:
        if str(error):
            raise
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = frame.filename.rsplit("site-packages/", 1)[-1]
        raise AssertionError(f"{where}:{frame.lineno}: {frame.line}") from error


def _check_megatron_collectives_counted() -> None:
    from megatron.core.distributed import param_and_grad_buffer

    if not hasattr(param_and_grad_buffer.dist_reduce_scatter_func, "__wrapped__"):
        raise RuntimeError(
            "Megatron was imported before muon_ds.testing.collectives.install(): it binds "
            "reduce_scatter/all_gather at import, so their bytes would go uncounted"
        )


def _build_model(shape: ModelShape, tp: int, ep: int, dtype: str, seed: int) -> Any:
    """An unwrapped GPTModel of ``shape`` (every rank seeds alike; TP cuts one master)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    moe: dict[str, Any] = {}
    if shape.experts:
        moe = {
            "num_moe_experts": shape.experts,
            "moe_ffn_hidden_size": shape.expert_ffn,
            "moe_router_topk": shape.top_k,
            "moe_shared_expert_intermediate_size": shape.shared_experts * shape.expert_ffn or None,
            "moe_layer_freq": [0] * shape.first_dense_layers
            + [1] * (shape.layers - shape.first_dense_layers),
            "moe_token_dispatcher_type": "allgather",  # alltoall needs CUDA streams
            "expert_model_parallel_size": ep,
        }
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    config = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.query_groups,
        ffn_hidden_size=shape.ffn,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        use_cpu_initialization=True,
        bf16=dtype == "bf16",
        params_dtype=params_dtype,
        tensor_model_parallel_size=tp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **moe,
    )
    if shape.experts:
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm"
        )
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(
        config,
        spec,
        vocab_size=shape.vocab,
        max_sequence_length=shape.seq,
        position_embedding_type="rope",
    )


def _wrap_ddp(model: Any, distributed_optimizer: bool, layer_wise: bool) -> Any:
    """Megatron's DDP as ``megatron.training`` wraps it (its param layouts included)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.training.training import wrap_model_chunks_with_ddp

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True
    )
    [ddp] = wrap_model_chunks_with_ddp(
        [model],
        model.config,
        ddp_config,
        use_layer_wise_distributed_optimizer=layer_wise,
    )
    return ddp


def _optimizer_config(options: RunOptions, **kwargs: Any) -> Any:
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        lr=options.lr,
        min_lr=options.lr,
        weight_decay=options.weight_decay,
        clip_grad=CLIP_GRAD,
        bf16=options.dtype == "bf16",
        params_dtype=torch.bfloat16 if options.dtype == "bf16" else torch.float32,
        adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1],
        adam_eps=ADAM_EPS,
        **kwargs,
    )


@dataclass
class _NewtonSchulzWork:
    """Matrices and FLOPs orthogonalised on this rank since the last ``take``."""

    matrices: int = 0
    flops: int = 0

    def take(self) -> tuple[int, int]:
        taken = self.matrices, self.flops
        self.matrices = self.flops = 0
        return taken


@contextlib.contextmanager
def _counting_megatron_newton_schulz() -> Iterator[_NewtonSchulzWork]:
    """Count every call of emerging-optimizers' ``newton_schulz`` (all TP modes reach it)."""
    from emerging_optimizers.orthogonalized_optimizers import muon_utils

    work = _NewtonSchulzWork()
    original = muon_utils.newton_schulz

    def counted(x: torch.Tensor, steps: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch = 1 if x.ndim == 2 else x.shape[0]
        work.matrices += batch
        work.flops += batch * newton_schulz_flops(x.shape[-2], x.shape[-1], steps)
        return original(x, steps, *args, **kwargs)

    muon_utils.newton_schulz = counted
    try:
        yield work
    finally:
        muon_utils.newton_schulz = original


def _torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's wrappers (chained, layer-wise, distributed)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
    elif hasattr(optimizer, "chained_optimizers"):
        for part in optimizer.chained_optimizers:
            yield from _torch_optimizers(part)
    else:
        yield from _torch_optimizers(optimizer.optimizer)


def _state_bytes(optimizer: Any) -> int:
    """Momenta and moments this rank keeps (not step counters, not fp32 master copies)."""
    return sum(
        t.numel() * t.element_size()
        for inner in _torch_optimizers(optimizer)
        for state in inner.state.values()
        for key, t in state.items()
        if key != "step" and isinstance(t, torch.Tensor)
    )


def _distinct_over_ranks(keys: set[str]) -> int:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(keys))
    return len(set().union(*everyone))


def _megatron_muon_matrices(optimizer: Any, ddp: Any) -> int:
    """Distinct matrices Megatron's Muon orthogonalises (Q, K, V apart when it splits QKV)."""
    from megatron.core.optimizer.layer_wise_optimizer import is_managed_by_layer_wise_optimizer

    from muon_ds.megatron.factory import model_layout
    from muon_ds.megatron.views import global_name

    layout = model_layout([ddp], "qkv")  # only its EP coordinates name the experts
    keys = set()
    for name, param in ddp.named_parameters():
        if not is_managed_by_layer_wise_optimizer(param):
            continue
        name = global_name(name, layout)
        split = optimizer.config.muon_split_qkv and getattr(param, "is_qkv", False)
        keys.update([f"{name}:{part}" for part in "qkv"] if split else [name])
    return _distinct_over_ranks(keys)


def _muon_ds_parts(optimizer: Any) -> list[Any]:
    from muon_ds.sharded import ShardedMuon

    return [o for o in _torch_optimizers(optimizer) if isinstance(o, ShardedMuon)]


def _muon_ds_plan_bytes(optimizer: Any) -> int:
    """The plans' predicted bytes this rank sends per step in muon_ds's exchanges."""
    return sum(sum(part.core.planned_bytes().values()) for part in _muon_ds_parts(optimizer))


def _muon_ds_matrices(optimizer: Any) -> int:
    keys = {
        f"{name}|{matrix.name}|{matrix.key}"
        for part in _muon_ds_parts(optimizer)
        for name, plan in part.plans.items()
        for matrix in plan.matrices
    }
    return _distinct_over_ranks(keys)


def _build_contender(contender: str, model: Any, options: RunOptions) -> tuple[Any, Any]:
    """``(ddp, optimizer)`` for one contender."""
    from megatron.core.optimizer import get_megatron_optimizer

    if contender == "megatron_adam":
        ddp = _wrap_ddp(model, distributed_optimizer=True, layer_wise=False)
        config = _optimizer_config(options, optimizer="adam", use_distributed_optimizer=True)
        return ddp, get_megatron_optimizer(config, [ddp])
    if contender == "megatron_muon_layerwise":
        ddp = _wrap_ddp(model, distributed_optimizer=False, layer_wise=True)
        config = _optimizer_config(
            options,
            optimizer="muon",
            use_distributed_optimizer=False,
            use_layer_wise_distributed_optimizer=True,
            **MOONLIGHT_MEGATRON_MUON,
        )
        return ddp, get_megatron_optimizer(config, [ddp])
    if contender == "megatron_muon_duplicated":
        ddp = _wrap_ddp(model, distributed_optimizer=False, layer_wise=False)
        config = _optimizer_config(
            options, optimizer="muon", use_distributed_optimizer=False, **MOONLIGHT_MEGATRON_MUON
        )
        return ddp, get_megatron_optimizer(config, [ddp])
    if contender == "muon_ds_megatron":
        from muon_ds import MuonConfig
        from muon_ds.megatron import get_muon_ds_optimizer

        ddp = _wrap_ddp(model, distributed_optimizer=True, layer_wise=False)
        config = _optimizer_config(options, optimizer="muon", use_distributed_optimizer=True)
        muon_config = MuonConfig(lr=options.lr, weight_decay=options.weight_decay)
        return ddp, get_muon_ds_optimizer(config, [ddp], muon_config)
    raise ValueError(f"unknown Megatron contender {contender!r}; known: {sorted(CONTENDERS)}")


def _batch(shape: ModelShape, options: RunOptions, step: int) -> tuple[torch.Tensor, ...]:
    """The step's inputs, positions, causal mask and targets for this DP rank."""
    from megatron.core import parallel_state as ps

    ids = tokens(shape, options, step, ps.get_data_parallel_rank())
    positions = torch.arange(shape.seq).unsqueeze(0).expand(shape.micro_batch, -1)
    mask = torch.triu(torch.ones(1, 1, shape.seq, shape.seq, dtype=torch.bool), 1)
    return ids[:, :-1], positions, mask, ids[:, 1:]


def _run(
    contender: str, rank: int, world: int, shape: ModelShape, options: RunOptions
) -> dict[str, Any]:
    """Train ``contender`` on this rank in ``options.layout`` (empty: DP over every rank)."""
    layout = options.layout or f"DP={world}"
    counter = collectives.install()
    tp, ep = parallel_sizes(layout, world)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    megatron_cpu.install()  # once per process; later calls do nothing
    _check_megatron_collectives_counted()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    try:
        with _located_assertions(), _counting_megatron_newton_schulz() as megatron_ns:
            ddp, optimizer = _build_contender(
                contender, _build_model(shape, tp, ep, options.dtype, options.seed), options
            )
            steps, loss = _train(ddp, optimizer, shape, options, counter, megatron_ns)
        with counter.pause():
            result = _result(contender, rank, world, shape, layout, ddp, optimizer, steps)
        result["final_loss"] = loss
        return result
    finally:
        ps.destroy_model_parallel()


@dataclass(frozen=True)
class _Step:
    """What one measured step cost this rank."""

    collectives: dict[str, dict[str, int]]
    ns_matrices: int
    ns_flops: int
    muon_ds_exchange_bytes: int
    optimizer_seconds: float
    iteration_seconds: float

    def counts(self) -> tuple[Any, ...]:
        return self.collectives, self.ns_matrices, self.ns_flops, self.muon_ds_exchange_bytes


def _train(
    ddp: Any,
    optimizer: Any,
    shape: ModelShape,
    options: RunOptions,
    counter: collectives.CollectiveCounter,
    megatron_ns: _NewtonSchulzWork,
) -> tuple[list[_Step], float]:
    """``warmup + steps`` iterations under Megatron's scheduler; the measured steps, loss."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = options.warmup + options.steps
    scheduler = OptimizerParamScheduler(  # constant lr and wd, written by Megatron every step
        optimizer,
        init_lr=options.lr,
        max_lr=options.lr,
        min_lr=options.lr,
        lr_warmup_steps=0,
        lr_decay_steps=total,
        lr_decay_style="constant",
        start_wd=options.weight_decay,
        end_wd=options.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )
    muon_ds = [part.counter for part in _muon_ds_parts(optimizer)]
    measured = []
    loss = torch.tensor(float("nan"))
    for step in range(total):
        ids, positions, mask, labels = _batch(shape, options, step)
        counter.reset()
        megatron_ns.take()
        for part in muon_ds:
            part.reset()
        started = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(ids, positions, mask, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        step_started = time.perf_counter()
        optimizer.step()
        finished = time.perf_counter()
        scheduler.step(increment=1)
        if step < options.warmup:
            continue
        ns_matrices, ns_flops = megatron_ns.take()
        measured.append(
            _Step(
                collectives=counter.snapshot(),
                ns_matrices=ns_matrices + sum(part.ns_matrices for part in muon_ds),
                ns_flops=ns_flops + sum(part.ns_flops for part in muon_ds),
                muon_ds_exchange_bytes=sum(part.exchange_bytes() for part in muon_ds),
                optimizer_seconds=finished - step_started,
                iteration_seconds=finished - started,
            )
        )
    return measured, loss.item()


def _result(
    contender: str,
    rank: int,
    world: int,
    shape: ModelShape,
    layout: str,
    ddp: Any,
    optimizer: Any,
    steps: list[_Step],
) -> dict[str, Any]:
    first = steps[0]
    result: dict[str, Any] = {
        "contender": contender,
        "framework": "megatron",
        "model": shape.name,
        "layout": layout,
        "world": world,
        "rank": rank,
        "device": "cpu",
        "collectives_per_step": first.collectives,
        "counts_constant": all(s.counts() == first.counts() for s in steps),
        "ns_calls_per_step": first.ns_matrices,
        "ns_flops_per_step": first.ns_flops,
        "logical_matrices": 0,
        "optimizer_step_seconds": statistics.median(s.optimizer_seconds for s in steps),
        "iteration_seconds": statistics.median(s.iteration_seconds for s in steps),
        "state_bytes": _state_bytes(optimizer),
        "param_count": sum(p.numel() for p in ddp.parameters()),
        "notes": "optimizer_step_seconds: ChainedOptimizer.step() (grad norm, clipping, "
        "update, param all-gather; no overlap)",
    }
    if _muon_ds_parts(optimizer):
        result["logical_matrices"] = _muon_ds_matrices(optimizer)
        result["muon_ds_exchange_bytes_per_step"] = first.muon_ds_exchange_bytes
        result["plan_exchange_bytes_per_step"] = _muon_ds_plan_bytes(optimizer)
        dtypes = sorted({str(part.core.ns_dtype) for part in _muon_ds_parts(optimizer)})
        result["notes"] += (
            f"; NS and wire in {', '.join(dtypes)}; NS counted by muon_ds's CommCounter"
        )
    elif contender.startswith("megatron_muon"):
        result["logical_matrices"] = _megatron_muon_matrices(optimizer, ddp)
        result["notes"] += "; NS counted at emerging-optimizers' newton_schulz"
    return result


CONTENDERS: dict[str, Callable[..., dict[str, Any]]] = {
    name: functools.partial(_run, name)
    for name in (
        "megatron_adam",
        "megatron_muon_layerwise",
        "megatron_muon_duplicated",
        "muon_ds_megatron",
    )
}
"""``run(rank, world, shape, options)``: one rank's result dict (picklable for spawn)."""
