"""Small Megatron GPT models on gloo ranks, and their unsharded logical view.

The reference for the Megatron tests is single-process ``muon_ds.Muon`` on the
*unsharded* model whose fused weights are split explicitly here, independently of
``muon_ds.layout``: ``linear_qkv`` into Q, K, V (rows of all query groups of all TP
ranks), gated ``linear_fc1`` into gate and up, SequentialMLP experts by global id, other
TP-split weights concatenated along their partition dim; the 3-D grouped weights of
``SingleGroupedExperts`` one matrix per expert. ``logical`` builds that view
from every rank's TP/EP-local tensors; ``local`` maps it back to one rank's tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import get_model_config

VOCAB, SEQ, BATCH = 128, 16, 2
HEADS, QUERY_GROUPS, HIDDEN = 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
HEADS_PER_GROUP = HEADS // QUERY_GROUPS
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_GROUPED = re.compile(r"\.experts\.(linear_fc[12]\.weight)$")


@dataclass(frozen=True)
class Shape:
    """One test model: layers, FFN width and, for MoE, experts (SequentialMLP)."""

    layers: int
    ffn: int
    experts: int = 0
    expert_ffn: int = 0
    gated: bool = True
    single_grouped_weight: bool = False
    """The experts in ``SingleGroupedExperts`` (3-D weights) instead of SequentialMLP."""


DENSE = Shape(layers=2, ffn=128)
# Three experts per EP rank, so an expert-DP shard boundary cuts through an expert.
MOE = Shape(layers=1, ffn=128, experts=6, expert_ffn=48)
MOE_3D = Shape(layers=1, ffn=128, experts=6, expert_ffn=48, single_grouped_weight=True)
# Megatron's Muon never splits gate/up, so the side-by-side model has a plain fc1.
PLAIN = Shape(layers=2, ffn=128, gated=False)


def build(
    shape: Shape,
    tp: int,
    ep: int,
    distributed_optimizer: bool = True,
    expert_tp: int | None = None,
    pp: int = 1,
    fp16: bool = False,
) -> DistributedDataParallel:
    """A bf16 (or fp16) GPTModel (local spec, CPU init) wrapped in Megatron's DDP.

    ``expert_tp``: expert tensor parallelism (Megatron's default: ``tp``). ``pp``: this
    rank's pipeline stage of the layers; embeddings untied under PP (Megatron's tied
    embedding sync across stages moves the weight to CUDA). ``fp16``: fp16, not bf16.

    Every rank seeds alike, so TP ranks cut the same master weights and DP ranks agree.
    """
    torch.manual_seed(1234)
    dtype = torch.float16 if fp16 else torch.bfloat16
    moe = {}
    if shape.experts:
        moe = {
            "num_moe_experts": shape.experts,
            "moe_ffn_hidden_size": shape.expert_ffn,
            "moe_router_topk": 2,
            "moe_token_dispatcher_type": "allgather",
            "expert_model_parallel_size": ep,
        }
    config = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=QUERY_GROUPS,
        ffn_hidden_size=shape.ffn,
        gated_linear_unit=shape.gated,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        use_cpu_initialization=True,
        bf16=not fp16,
        fp16=fp16,
        params_dtype=dtype,
        tensor_model_parallel_size=tp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        expert_tensor_parallel_size=expert_tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype if pp > 1 else None,
        **moe,
    )
    spec = get_gpt_layer_local_spec(num_experts=shape.experts or None, normalization="RMSNorm")
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=pp == 1,
    )
    if shape.single_grouped_weight:
        for layer in model.decoder.layers:
            layer.mlp.experts = SingleGroupedExperts(layer.mlp.experts)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True
    )
    return DistributedDataParallel(config, ddp_config, model)


class SingleGroupedExperts(torch.nn.Module):
    """TEGroupedMLP's parameters under ``moe_single_grouped_weight``, computed in torch.

    Transformer Engine (>= 2.14) is not installed here, so this stands in for it with
    the same names (``experts.linear_fc{1,2}.weight``), shapes (``[experts, rows,
    cols]``, expert i is ``weight[i]``, a gated fc1 ``[gate; up]``) and the attributes
    TE's grouped linears get at expert TP 1 (Megatron's
    ``_set_expert_parameter_attributes``), initialised from a SequentialMLP's experts.
    """

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.config = experts.config
        for linear, partition_dim in (("linear_fc1", 0), ("linear_fc2", 1)):
            weights = [getattr(e, linear).weight.detach() for e in experts.local_experts]
            weight = torch.nn.Parameter(torch.stack(weights))
            weight.allreduce = False
            weight.tensor_model_parallel = True
            weight.partition_dim = partition_dim
            weight.partition_stride = 1
            module = torch.nn.Module()
            module.weight = weight
            setattr(self, linear, module)

    def forward(
        self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        counts = tokens_per_expert.tolist()
        outputs = []
        for e, (x, p) in enumerate(
            zip(torch.split(tokens, counts), torch.split(probs, counts), strict=True)
        ):
            gate, up = (x @ self.linear_fc1.weight[e].t()).chunk(2, dim=-1)
            hidden = torch.nn.functional.silu(gate) * up * p.unsqueeze(-1).to(x.dtype)
            outputs.append(hidden @ self.linear_fc2.weight[e].t())
        return torch.cat(outputs), None


def forward_backward(ddp: DistributedDataParallel, step: int, loss_scale: float = 1.0) -> None:
    """One micro-batch per DP rank (TP ranks and pipeline stages of one DP rank see the
    same tokens), through Megatron's pipeline schedule when there are stages; the loss
    is multiplied by ``loss_scale`` (fp16), as Megatron's schedule does."""
    generator = torch.Generator().manual_seed(100 * step + ps.get_data_parallel_rank())
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    ddp.zero_grad_buffer()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        (ddp(ids, positions, mask, labels=ids).float().mean() * loss_scale).backward()
    else:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(_: Any, model: DistributedDataParallel) -> tuple[torch.Tensor, Any]:
            output = model(ids, positions, mask, labels=ids)
            return output, lambda losses: (losses.float().mean() * loss_scale, {})

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=None,
            model=[ddp],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=BATCH,
        )
    ddp.finish_grad_sync()


def all_gather_grad_buffers(ddp: DistributedDataParallel) -> None:
    """After the reduce-scatter, gather the shards so every ``main_grad`` is whole."""
    for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers]:
        group = buffer.data_parallel_group
        for bucket in buffer.buckets:
            shard = bucket.grad_data.numel() // group.size()
            mine = bucket.grad_data[group.rank() * shard : (group.rank() + 1) * shard].clone()
            dist.all_gather_into_tensor(bucket.grad_data, mine, group=group)


def named_params(ddp: DistributedDataParallel) -> list[tuple[str, torch.nn.Parameter]]:
    return list(ddp.named_parameters())


def _is_expert(param: torch.Tensor) -> bool:
    return not getattr(param, "allreduce", True)


def _tp_group(param: torch.Tensor) -> Any:
    """The TP group a parameter is split over: expert TP for experts, else TP."""
    if _is_expert(param):
        return ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_group()


def _tp_split(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False) and _tp_group(param).size() > 1


def split_fused(name: str, full_by_tp: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The explicit split: per TP rank's local tensor, then concatenated over TP ranks."""
    if name.endswith("linear_qkv.weight"):
        parts: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
        for local in full_by_tp:
            grouped = local.view(-1, HEADS_PER_GROUP + 2, HEAD_DIM, local.shape[1])
            parts["q"].append(grouped[:, :HEADS_PER_GROUP].reshape(-1, local.shape[1]))
            parts["k"].append(grouped[:, HEADS_PER_GROUP].reshape(-1, local.shape[1]))
            parts["v"].append(grouped[:, HEADS_PER_GROUP + 1].reshape(-1, local.shape[1]))
        return {f"{name}:{k}": torch.cat(v) for k, v in parts.items()}
    if name.endswith("linear_fc1.weight"):
        halves = [local.chunk(2) for local in full_by_tp]
        return {
            f"{name}:gate": torch.cat([h[0] for h in halves]),
            f"{name}:up": torch.cat([h[1] for h in halves]),
        }
    return {}


def _join_fused(name: str, logical: dict[str, torch.Tensor], tp_rank: int, tp: int) -> torch.Tensor:
    if name.endswith("linear_qkv.weight"):
        cols = logical[f"{name}:q"].shape[1]
        q = logical[f"{name}:q"].view(-1, HEADS_PER_GROUP, HEAD_DIM, cols)
        k = logical[f"{name}:k"].view(-1, 1, HEAD_DIM, cols)
        v = logical[f"{name}:v"].view(-1, 1, HEAD_DIM, cols)
        count = q.shape[0]  # query groups in the logical view
        groups = slice(tp_rank * count // tp, (tp_rank + 1) * count // tp)
        return torch.cat([q[groups], k[groups], v[groups]], dim=1).reshape(-1, cols)
    gate = logical[f"{name}:gate"].chunk(tp)[tp_rank]
    up = logical[f"{name}:up"].chunk(tp)[tp_rank]
    return torch.cat([gate, up])


def expert_name(name: str, ep_rank: int, local_experts: int, index: int | None = None) -> str:
    """``local_experts.{i}`` of EP rank r is global expert ``r * local_experts + i``; so is
    ``weight[i]`` of a 3-D ``experts.linear_fc1.weight`` (``index``)."""
    if index is not None:
        match = _GROUPED.search(name)
        expert = ep_rank * local_experts + index
        return f"{name[: match.start()]}.experts.{expert}.{match.group(1)}"
    match = _EXPERT.search(name)
    expert = ep_rank * local_experts + int(match.group(1))
    return f"{name[: match.start()]}.{expert}.{name[match.end() :]}"


def logical(
    ddp: DistributedDataParallel,
    value: Callable[[torch.nn.Parameter], torch.Tensor],
    gather_tp: bool = True,
) -> dict[str, torch.Tensor]:
    """The unsharded model's tensors (fp32), from ``value(param)`` on every TP/EP rank.

    Collective over the TP and EP groups; every rank returns the same dict. Without
    ``gather_tp``, this TP rank's blocks stand for the whole (blockwise TP).
    """
    ep = ps.get_expert_model_parallel_world_size()
    local_experts = (get_model_config(ddp).num_moe_experts or 0) // ep
    result: dict[str, torch.Tensor] = {}
    for name, param in named_params(ddp):
        local = value(param).detach().float().clone()
        by_tp = [local]
        if gather_tp and _tp_split(param):
            group = _tp_group(param)
            by_tp = [torch.empty_like(local) for _ in range(group.size())]
            dist.all_gather(by_tp, local, group=group)
        by_ep = {name: by_tp}
        if _is_expert(param):
            # over_ep[t][r]: EP rank r's piece on expert-TP rank t.
            over_ep = [[torch.empty_like(local) for _ in range(ep)] for _ in by_tp]
            for gathered, piece in zip(over_ep, by_tp, strict=True):
                dist.all_gather(gathered, piece, group=ps.get_expert_model_parallel_group())
            by_rank = [[gathered[r] for gathered in over_ep] for r in range(ep)]
            if param.ndim == 3:
                by_ep = {
                    expert_name(name, r, local_experts, e): [piece[e] for piece in by_rank[r]]
                    for r in range(ep)
                    for e in range(local_experts)
                }
            else:
                by_ep = {expert_name(name, r, local_experts): by_rank[r] for r in range(ep)}
        for key, tensors in by_ep.items():
            split = split_fused(key, tensors)
            if split:
                result.update(split)
            elif len(tensors) > 1:
                result[key] = torch.cat(tensors, dim=param.partition_dim)
            else:
                result[key] = tensors[0]
    return result


def local(
    ddp: DistributedDataParallel,
    logical_values: dict[str, torch.Tensor],
    name: str,
    param: torch.nn.Parameter,
    gather_tp: bool = True,
) -> torch.Tensor:
    """This rank's TP/EP-local tensor of ``param`` taken from the logical view."""
    split = gather_tp and _tp_split(param)
    tp = _tp_group(param).size() if split else 1
    tp_rank = _tp_group(param).rank() if split else 0
    if _is_expert(param):
        ep = ps.get_expert_model_parallel_world_size()
        ep_rank = ps.get_expert_model_parallel_rank()
        local_experts = get_model_config(ddp).num_moe_experts // ep
        if param.ndim == 3:
            matrices = [expert_name(name, ep_rank, local_experts, e) for e in range(local_experts)]
            return torch.stack([_local_matrix(logical_values, m, param, 1, 0) for m in matrices])
        name = expert_name(name, ep_rank, local_experts)
    return _local_matrix(logical_values, name, param, tp, tp_rank)


def _local_matrix(
    logical_values: dict[str, torch.Tensor],
    name: str,
    param: torch.nn.Parameter,
    tp: int,
    tp_rank: int,
) -> torch.Tensor:
    if name.endswith(("linear_qkv.weight", "linear_fc1.weight")):
        return _join_fused(name, logical_values, tp_rank, tp)
    full = logical_values[name]
    return full.chunk(tp, dim=param.partition_dim)[tp_rank] if tp > 1 else full


def optimizer_config(lr: float, weight_decay: float, **overrides: Any) -> Any:
    """Megatron's OptimizerConfig of these tests: bf16 params, distributed optimizer."""
    from megatron.core.optimizer import OptimizerConfig

    settings = {
        "optimizer": "muon",
        "lr": lr,
        "min_lr": lr,
        "weight_decay": weight_decay,
        "bf16": True,
        "params_dtype": torch.bfloat16,
        "use_distributed_optimizer": True,
    }
    return OptimizerConfig(**{**settings, **overrides})


def constant_schedule(optimizer: Any, lr: float, weight_decay: float, steps: int) -> Any:
    """Megatron's own scheduler holding lr and weight decay constant (it writes both)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=lr,
        max_lr=lr,
        min_lr=lr,
        lr_warmup_steps=0,
        lr_decay_steps=steps,
        lr_decay_style="constant",
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
