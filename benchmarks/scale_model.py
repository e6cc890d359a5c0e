"""Scale model: the Muon optimizer's share of step time at full size, up to 1024 GPUs.

No GPU runs here. For full-size shapes (Moonlight-16B-A3B, a Llama-3-8B- and a 70B-like
dense model) and DP x TP x EP layouts, the script counts exactly what each scheme moves
and computes per step, then turns the counts into time with stated H100-like rates:

* **muon_ds**: ``muon_ds.plan.build_plan`` over ``ShardView``s of ZeRO-1 element-wise
  shards. Each logical matrix has one owner; straddling slices travel to it in bf16 and
  the update travels back; Newton-Schulz runs once per matrix. Owners balance each rank's
  total Newton-Schulz FLOPs over all its groups, as muon_ds's Megatron adapter plans them:
  one per-rank ledger (``muon_ds.plan.NsLedger``), the dense optimizer's groups ("dense", then
  "dense_tp") before the expert optimizer's, each group's copies in ascending global
  ranks, each plan given its ranks' FLOPs so far as ``prior_flops``. Bytes and FLOPs are
  the plans' own (``Plan.matrices`` pieces and owners, ``bytes_sent``).
* **Moonlight Algorithm 1**: from the same pieces, every rank holding part of a matrix
  receives the rest of it in bf16 (a DP gather, then a TP gather for TP-split matrices)
  and runs Newton-Schulz on the whole matrix itself.
* **Megatron's whole-matrix layout** (``LayerWiseDistributedOptimizer`` of Megatron-core
  0.19, its buffer layout re-implemented here: greedy LPT of whole TP-local params over
  the DP ranks, 64-element aligned starts, every shard padded to the largest, one bucket):
  no DP exchange, but padding and whole-matrix balance; with TP its ``duplicated`` mode
  all-gathers each TP-split matrix over TP and every TP rank repeats Newton-Schulz.

All three orthogonalise the same logical matrices (Q, K, V apart; gate and up apart;
one matrix per expert), so they differ in layout only. (Megatron's own Muon keeps a gated
fc1 whole; that changes its math, not its layout.)

**Shards.** As DeepSpeed ZeRO-1 lays them out with muon_ds's param groups: on each TP
rank, the TP-local Muon matrices in model order form one flat buffer (dense) split
evenly over the DP group; each EP rank's experts form another, split over the
expert-data-parallel group (expert TP = 1). AdamW params (embedding, output head, norms)
sit in their own buffers and only add to the elementwise update. No pipeline parallelism.
Global rank = t + TP * d (TP innermost, so TP stays inside a node) and, for experts,
e + EP * j; node = rank // gpus_per_node. A byte between two ranks of one node moves at
NVLink speed, else at InfiniBand speed.

**Exactness.** Every exchange group is planned whole, every layer (no layer is assumed
to shard like another), and every copy of a group on its own views with its own priors:
each EP rank's expert-DP group meets a different dense load, so its owners differ. One
plan is shared, exactly: the DP groups of replicated (not TP-split) params have the same
views on every TP rank and are planned first, on an empty ledger, so every TP copy's
input, hence its plan, is identical (the planner is called once per distinct input).
The unit tests replay the ledger plan by plan. (Under DeepSpeed, muon_ds plans per
param group in the user's group order; that order is not modelled here.)

**Step time.** ``compute = 6 * N_active * tokens_per_gpu / (mfu * peak)``, with N_active
every matmul weight a token passes through (top-k of the routed experts, the output
head; not the input embedding) and tokens_per_gpu = global batch x sequence / GPUs; the
framework's own gradient reduce-scatter and parameter all-gather are the same for every
optimizer and sit inside the MFU. ``optimizer = max over ranks of [exchange + NS +
elementwise]``: exchange = max(sent, received) intra-node bytes / NVLink + the same for
inter-node / IB, NS = the rank's Newton-Schulz FLOPs / (ns_efficiency * peak),
elementwise = shard elements x bytes touched per element / HBM bandwidth. Nothing is
assumed to overlap (muon_ds does overlap buckets with NS: the model is conservative for
it). The share is optimizer / (compute + optimizer). Megatron's padding is reported but
not charged (it inflates the framework's gradient and parameter collectives and memory).

    .venv/bin/python -m benchmarks.scale_model [--out out/scale_model] [--help for rates]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from benchmarks.shapes import DENSE, MOE, ModelShape, full_size
from muon_ds.config import MuonConfig
from muon_ds.device import choose_ns_dtype
from muon_ds.layout import NOT_SPLIT, RowBlock, ShardView, TensorParallel, gated_blocks, qkv_blocks
from muon_ds.plan import NsLedger, Plan, plan_groups
from muon_ds.testing.zero1 import even_split

MUON_BYTES_PER_ELEMENT = 24
"""fp32 grad read, fp32 momentum read + write, bf16 direction write, bf16 update read,
fp32 master read + write."""
ADAMW_BYTES_PER_ELEMENT = 28
"""fp32 grad read, exp_avg and exp_avg_sq read + write, fp32 master read + write."""
MODELLED_BF16_UNITS = "sm_90"
"""The modelled GPU's bf16 matrix units (H100-like: bf16 tensor cores), so ``ns_dtype``
"auto" resolves by ``muon_ds.device``'s rule as it would on that GPU."""
MEGATRON_ALIGN = 64
"""Megatron's ``pad_param_start``: every param starts on a 64-element boundary."""


# -- models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLA:
    """DeepSeek-V3 multi-head latent attention without query compression (Moonlight's)."""

    kv_lora_rank: int
    qk_head_dim: int
    rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class Model:
    key: str
    description: str
    shape: ModelShape
    mla: MLA | None = None


MODELS = {
    m.key: m
    for m in (
        Model(
            "moonlight-16b",
            "Moonlight-16B-A3B: 27 layers (first dense, ffn 11264), hidden 2048, MLA 16 heads "
            "(kv rank 512, qk 128+64 rope, v 128, no q compression), 64 routed experts "
            "(top-6) + 2 shared of ffn 1408, vocab 163840, untied head",
            full_size(MOE),
            MLA(kv_lora_rank=512, qk_head_dim=128, rope_head_dim=64, v_head_dim=128),
        ),
        Model(
            "llama3-8b",
            "Llama-3-8B: 32 layers, hidden 4096, 32 heads / 8 KV, SwiGLU 14336, vocab 128256",
            full_size(DENSE),
        ),
        Model(
            "llama-70b",
            "Llama-3-70B-like: 80 layers, hidden 8192, 64 heads / 8 KV, SwiGLU 28672, vocab 128256",
            dataclasses.replace(
                full_size(DENSE), layers=80, hidden=8192, heads=64, query_groups=8, ffn=28672
            ),
        ),
    )
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as a 2-D matrix before tensor parallelism.

    ``tp_dim`` is the dim tensor parallelism splits (0 column-, 1 row-parallel); None
    means every TP rank holds it whole. ``fused`` names a layout of several logical
    matrices; ``expert`` is a routed expert's global index.
    """

    name: str
    shape: tuple[int, int]
    muon: bool
    tp_dim: int | None = None
    fused: Literal["", "qkv", "gated"] = ""
    expert: int | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def transformer_params(model: Model) -> list[ParamSpec]:
    """Every parameter in model order, named like Megatron-core's GPTModel."""
    s = model.shape
    specs = [ParamSpec("embedding", (s.vocab, s.hidden), muon=False, tp_dim=0)]
    for layer in range(s.layers):
        prefix = f"layers.{layer:02d}."
        specs.append(ParamSpec(prefix + "input_norm", (s.hidden, 1), muon=False))
        specs += _attention(model, prefix + "attention.")
        specs.append(ParamSpec(prefix + "mlp_norm", (s.hidden, 1), muon=False))
        if s.experts and layer >= s.first_dense_layers:
            specs.append(ParamSpec(prefix + "mlp.router", (s.experts, s.hidden), muon=True))
            specs += _mlp(prefix + "mlp.shared_experts.", s.hidden, s.shared_experts * s.expert_ffn)
            for e in range(s.experts):
                # Zero-padded: the planner sorts by name, so every EP rank's experts sort alike.
                specs += _mlp(f"{prefix}mlp.experts.{e:03d}.", s.hidden, s.expert_ffn, expert=e)
        else:
            specs += _mlp(prefix + "mlp.", s.hidden, s.ffn)
    specs.append(ParamSpec("final_norm", (s.hidden, 1), muon=False))
    specs.append(ParamSpec("output", (s.vocab, s.hidden), muon=False, tp_dim=0))
    return specs


def _attention(model: Model, prefix: str) -> list[ParamSpec]:
    s, mla = model.shape, model.mla
    if mla is None:
        qkv_rows = (s.heads + 2 * s.query_groups) * s.head_dim
        return [
            ParamSpec(prefix + "linear_qkv", (qkv_rows, s.hidden), True, tp_dim=0, fused="qkv"),
            ParamSpec(prefix + "linear_proj", (s.hidden, s.heads * s.head_dim), True, tp_dim=1),
        ]
    q_rows = s.heads * (mla.qk_head_dim + mla.rope_head_dim)
    kv_rows = s.heads * (mla.qk_head_dim + mla.v_head_dim)
    return [
        ParamSpec(prefix + "linear_q_proj", (q_rows, s.hidden), True, tp_dim=0),
        # Megatron builds the KV down-projection "duplicated": whole on every TP rank.
        ParamSpec(
            prefix + "linear_kv_down_proj", (mla.kv_lora_rank + mla.rope_head_dim, s.hidden), True
        ),
        ParamSpec(prefix + "kv_norm", (mla.kv_lora_rank, 1), muon=False),
        ParamSpec(prefix + "linear_kv_up_proj", (kv_rows, mla.kv_lora_rank), True, tp_dim=0),
        ParamSpec(prefix + "linear_proj", (s.hidden, s.heads * mla.v_head_dim), True, tp_dim=1),
    ]


def _mlp(prefix: str, hidden: int, ffn: int, expert: int | None = None) -> list[ParamSpec]:
    """Gated fc1 ``[gate; up]`` and fc2; routed experts are not TP-split (expert TP 1)."""
    dense = expert is None
    return [
        ParamSpec(prefix + "fc1", (2 * ffn, hidden), True, 0 if dense else None, "gated", expert),
        ParamSpec(prefix + "fc2", (hidden, ffn), True, 1 if dense else None, "", expert),
    ]


def active_params(model: Model, specs: Sequence[ParamSpec]) -> int:
    """Matmul weights one token passes through: top-k routed experts, the head, no embedding."""
    s = model.shape
    routed = sum(p.numel for p in specs if p.expert is not None)
    dense = sum(p.numel for p in specs if p.expert is None and p.muon)
    head = next(p.numel for p in specs if p.name == "output")
    return dense + head + (routed * s.top_k // s.experts if s.experts else 0)


# -- layouts and shard views -----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def expert_dp(self) -> int:
        return self.gpus // self.ep

    def label(self) -> str:
        return f"DP{self.dp}xTP{self.tp}" + (f", EP{self.ep} (EDP{self.expert_dp})" * (self.ep > 1))


def check_layout(model: Model, layout: Layout, gpus_per_node: int) -> None:
    """Refuse layouts the shards cannot describe, naming what is wrong and what is allowed."""
    s = model.shape
    problems = []
    if layout.gpus < 1 or layout.tp < 1 or layout.ep < 1:
        problems.append("gpus, tp and ep must be >= 1")
    elif layout.gpus % layout.tp or gpus_per_node % layout.tp:
        problems.append(f"tp={layout.tp} must divide gpus and gpus_per_node={gpus_per_node}")
    elif layout.gpus % layout.ep:
        problems.append(f"ep={layout.ep} must divide gpus={layout.gpus}")
    if layout.ep > 1 and (not s.experts or s.experts % layout.ep):
        problems.append(f"ep={layout.ep} must divide the {s.experts} routed experts")
    if layout.tp > 1:
        sizes = {"heads": s.heads, "ffn": s.ffn, "hidden": s.hidden}
        if model.mla is None:
            sizes["query_groups"] = s.query_groups
        if s.shared_experts:
            sizes["shared expert ffn"] = s.shared_experts * s.expert_ffn
        problems += [
            f"tp={layout.tp} must divide {k}={v}" for k, v in sizes.items() if v % layout.tp
        ]
    if problems:
        raise ValueError(f"{model.key} on {layout}: " + "; ".join(problems))


@dataclass(frozen=True)
class LocalParam:
    """A Muon param as one TP rank holds it: the ``ShardView`` fields that do not vary."""

    name: str
    matrix_shape: tuple[int, int]
    tp: TensorParallel
    blocks: tuple[RowBlock, ...]
    group: str


def local_param(spec: ParamSpec, model: Model, tp: int, tp_rank: int) -> LocalParam:
    rows, cols = spec.shape
    split = spec.tp_dim is not None and tp > 1
    if split:
        rows, cols = (rows // tp, cols) if spec.tp_dim == 0 else (rows, cols // tp)
    blocks: tuple[RowBlock, ...] = ()
    if spec.fused == "gated":
        blocks = gated_blocks(rows)
    elif spec.fused == "qkv":
        s = model.shape
        blocks = qkv_blocks(s.query_groups // tp, s.heads // s.query_groups, s.head_dim)
    group = "expert" if spec.expert is not None else "dense_tp" if split else "dense"
    tp_split = TensorParallel(tp_rank, tp, spec.tp_dim) if split else NOT_SPLIT
    return LocalParam(spec.name, (rows, cols), tp_split, blocks, group)


def zero1_views(params: Sequence[LocalParam], ranks: int) -> list[list[ShardView]]:
    """ZeRO-1: the params concatenated into one flat buffer, split evenly over ``ranks``."""
    numels = [p.matrix_shape[0] * p.matrix_shape[1] for p in params]
    return [
        [
            ShardView(
                params[s.param].name,
                params[s.param].matrix_shape,
                s.start,
                s.end,
                0,
                s.offset,
                tp=params[s.param].tp,
                blocks=params[s.param].blocks,
                group=params[s.param].group,
            )
            for s in rank
        ]
        for rank in even_split(numels, ranks)
    ]


@dataclass(frozen=True)
class Group:
    """One exchange group: every copy's views and global ranks.

    Copy ``k``'s group rank ``i`` holds ``views[k][i]`` and is global rank
    ``replicas[k][i]``. ``copies`` says the copies hold the same matrices (TP copies of
    replicated params, sharing one views object) rather than different ones (the experts
    of different EP ranks).
    """

    name: str
    views: tuple[tuple[tuple[ShardView, ...], ...], ...]
    replicas: tuple[tuple[int, ...], ...]
    copies: bool


def build_groups(model: Model, layout: Layout) -> list[Group]:
    """The exchange groups of ``layout``, every copy with its own views."""
    specs = [s for s in transformer_params(model) if s.muon]
    tp, dp, ep = layout.tp, layout.dp, layout.ep
    groups = []
    # Dense buffer: TP rank t's dense Muon params; its DP rank d is global rank t + tp * d.
    by_tp = [
        zero1_views([local_param(s, model, tp, t) for s in specs if s.expert is None], dp)
        for t in range(tp)
    ]
    tp_split = tuple(
        tuple(v for v in by_tp[t][d] if v.group == "dense_tp") for d in range(dp) for t in range(tp)
    )
    if any(tp_split):
        groups.append(Group("dense_tp", (tp_split,), (tuple(range(layout.gpus)),), copies=False))
    # Every TP rank's buffer has the same TP-local sizes, so its replicated params sit at
    # the same places: TP rank 0's views are every TP rank's.
    whole = tuple(tuple(v for v in by_tp[0][d] if v.group == "dense") for d in range(dp))
    if any(whole):
        replicas = tuple(tuple(t + tp * d for d in range(dp)) for t in range(tp))
        groups.append(Group("dense", (whole,) * tp, replicas, copies=True))
    if model.shape.experts:
        local = model.shape.experts // ep
        views = tuple(
            tuple(
                map(
                    tuple,
                    zero1_views(
                        [
                            local_param(s, model, 1, 0)
                            for s in specs
                            if s.expert is not None and s.expert // local == e
                        ],
                        layout.expert_dp,
                    ),
                )
            )
            for e in range(ep)
        )
        replicas = tuple(tuple(e + ep * j for j in range(layout.expert_dp)) for e in range(ep))
        groups.append(Group("expert", views, replicas, copies=False))
    return groups


def plan_muon_ds(
    groups: Sequence[Group], config: MuonConfig, wire_bytes: int
) -> tuple[dict[str, list[Plan]], list[int]]:
    """Every copy of every group planned by production's own ``plan_groups``.

    One ledger per model, as muon_ds's Megatron adapter keeps: the dense optimizer's core
    plans "dense" then "dense_tp", the expert optimizer's core "expert" (sorted names give
    this order), each group's copies in sorted order of their global ranks, each plan
    balanced against the Newton-Schulz FLOPs its ranks already own. Returns each group's
    plans in ``replicas`` order and the ledger (FLOPs per global rank).
    """
    world = 1 + max(r for g in groups for ranks in g.replicas for r in ranks)
    ledger = NsLedger()
    planned = plan_groups(
        {g.name: dict(zip(g.replicas, g.views, strict=True)) for g in groups},
        ledger,
        ns_steps=config.ns_steps,
        imbalance_limit=config.owner_imbalance_limit,
        bucket_bytes=int(config.exchange_bucket_mb * 2**20),
        wire_bytes=wire_bytes,
    )
    plans = {g.name: [planned[g.name, ranks] for ranks in g.replicas] for g in groups}
    return plans, ledger.of(range(world))


# -- what each scheme moves and computes, per group rank --------------------------------------


@dataclass
class Cost:
    """Bytes sent between ranks (``flows[(src, dst)]``) and Newton-Schulz FLOPs per rank."""

    flows: dict[tuple[int, int], int]
    ns_flops: list[int]
    ns_calls: list[int]

    @classmethod
    def empty(cls, ranks: int) -> Cost:
        return cls(defaultdict(int), [0] * ranks, [0] * ranks)


def muon_ds_cost(plan: Plan, wire_bytes: int) -> Cost:
    """The plan as executed: each piece off its owner goes to the owner and comes back."""
    cost = Cost.empty(plan.world)
    for m in plan.matrices:
        cost.ns_flops[m.owner] += m.flops
        cost.ns_calls[m.owner] += 1
        for p in m.pieces:
            if p.holder != m.owner:
                cost.flows[(p.holder, m.owner)] += wire_bytes * p.numel
                cost.flows[(m.owner, p.holder)] += wire_bytes * p.numel
    return cost


def algorithm1_cost(plan: Plan, tp: int, wire_bytes: int) -> Cost:
    """Moonlight's Algorithm 1 on the plan's pieces (owners ignored).

    Every holder of part of a TP-local matrix receives the other holders' pieces (DP
    gather); for a TP-split matrix each then receives the other TP ranks' parts from its
    TP peers (group rank ``t + tp * d``, same d); every holder runs the full NS.
    """
    cost = Cost.empty(plan.world)
    for m in plan.matrices:
        held: dict[int, int] = defaultdict(int)
        part_of: dict[int, int] = {}
        for p in m.pieces:
            held[p.holder] += p.numel
            part_of[p.holder] = p.tp_rank
        for h, numel in held.items():
            cost.ns_flops[h] += m.flops
            cost.ns_calls[h] += 1
            for peer in held:
                if peer != h and part_of[peer] == part_of[h]:
                    cost.flows[(h, peer)] += wire_bytes * numel
            if m.tp_size > 1:
                d = h // tp
                for t in range(tp):
                    if t != part_of[h]:
                        cost.flows[(h, t + tp * d)] += wire_bytes * m.numel // m.tp_size
    return cost


@dataclass(frozen=True)
class WholeParam:
    """A param as Megatron's layer-wise layout places it: whole, on one DP rank."""

    name: str
    numel: int
    """TP-local elements."""
    tp_split: bool
    flops: int
    """NS FLOPs of its logical matrices (whole, after any TP gather)."""
    matrices: int


def whole_params(plans: Iterable[Plan], order: Sequence[str]) -> list[WholeParam]:
    """The params of ``plans``' matrices in model ``order``, with their NS work."""
    by_name: dict[str, list] = defaultdict(list)
    for plan in plans:
        for m in plan.matrices:
            by_name[m.name].append(m)
    return [
        WholeParam(
            name,
            sum(m.numel // m.tp_size for m in by_name[name]),
            by_name[name][0].tp_size > 1,
            sum(m.flops for m in by_name[name]),
            len(by_name[name]),
        )
        for name in order
        if name in by_name
    ]


@dataclass(frozen=True)
class MegatronLayout:
    shard_of: dict[str, int]
    loads: list[int]
    """Real elements per DP rank."""
    shard_size: int
    """Every rank's padded shard."""
    padding: int
    """Elements of the buffer that are no parameter's."""


def megatron_layout(params: Sequence[WholeParam], dp: int) -> MegatronLayout:
    """Megatron 0.19's LayerWiseDistributedOptimizer layout of one buffer, one bucket.

    Backprop order, largest first (a stable sort), each param to the least-loaded shard
    (lowest index on ties) at a 64-aligned start; shards padded to the largest, rounded
    to the shard divisor lcm(64, lcm(dp, 128) / dp).
    """
    cursors = [0] * dp
    loads = [0] * dp
    shard_of = {}
    for p in sorted(reversed(params), key=lambda p: -p.numel):
        shard = min(range(dp), key=lambda s: cursors[s])
        cursors[shard] = -(-cursors[shard] // MEGATRON_ALIGN) * MEGATRON_ALIGN + p.numel
        loads[shard] += p.numel
        shard_of[p.name] = shard
    divisor = math.lcm(MEGATRON_ALIGN, math.lcm(dp, 128) // dp)
    shard_size = -(-max(cursors) // divisor) * divisor
    return MegatronLayout(shard_of, loads, shard_size, dp * shard_size - sum(loads))


def megatron_cost(
    params: Sequence[WholeParam], layout: MegatronLayout, tp: int, wire_bytes: int
) -> Cost:
    """Per rank ``t + tp * d`` of the buffer's DP x TP grid: NS of every param on shard d,
    repeated on every TP rank, and the duplicated mode's TP all-gather of split params."""
    dp = len(layout.loads)
    cost = Cost.empty(dp * tp)
    for p in params:
        d = layout.shard_of[p.name]
        for t in range(tp):
            cost.ns_flops[t + tp * d] += p.flops
            cost.ns_calls[t + tp * d] += p.matrices
            if p.tp_split:
                for peer in range(tp):
                    if peer != t:
                        cost.flows[(t + tp * d, peer + tp * d)] += wire_bytes * p.numel
    return cost


# -- from counts to time -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Everything the time model assumes; printed with every run."""

    global_batch: int = 1024
    seq_len: int = 4096
    peak_tflops: float = 989.0
    mfu: float = 0.40
    ns_efficiency: float = 0.40
    nvlink_gbps: float = 450.0
    ib_gbps: float = 50.0
    hbm_tbps: float = 3.35
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ValueError(f"{field.name}={value} is not allowed: it must be > 0")
        for name in ("mfu", "ns_efficiency"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} is a fraction of peak: (0, 1]")

    def describe(self) -> list[str]:
        peak = self.peak_tflops
        return [
            f"global batch {self.global_batch} x seq {self.seq_len} = "
            f"{self.global_batch * self.seq_len:,} tokens per step",
            f"bf16 dense peak {peak:g} TFLOP/s per GPU; model MFU {self.mfu:.0%} "
            f"({self.mfu * peak:g} TFLOP/s); Newton-Schulz at {self.ns_efficiency:.0%} of peak "
            f"({self.ns_efficiency * peak:g} TFLOP/s)",
            f"NVLink {self.nvlink_gbps:g} GB/s per direction per GPU inside a node of "
            f"{self.gpus_per_node}; InfiniBand {self.ib_gbps:g} GB/s per direction per GPU "
            "between nodes",
            f"HBM {self.hbm_tbps:g} TB/s; elementwise update {MUON_BYTES_PER_ELEMENT} B per "
            f"Muon element, {ADAMW_BYTES_PER_ELEMENT} B per AdamW element",
        ]


RATE_HELP = {
    "global_batch": "sequences per step over all GPUs",
    "seq_len": "tokens per sequence",
    "peak_tflops": "bf16 dense peak per GPU, TFLOP/s",
    "mfu": "model FLOPs utilisation of the training step, fraction of peak",
    "ns_efficiency": "Newton-Schulz throughput, fraction of peak",
    "nvlink_gbps": "intra-node bandwidth per GPU per direction, GB/s",
    "ib_gbps": "inter-node bandwidth per GPU per direction, GB/s",
    "hbm_tbps": "memory bandwidth for the elementwise update, TB/s",
    "gpus_per_node": "GPUs per node (TP must fit inside one)",
}


@dataclass
class GlobalCost:
    """One scheme's counts over every global rank."""

    flows: dict[tuple[int, int], int]
    ns_flops: list[int]
    ns_calls: list[int]
    elements: list[tuple[int, int]]
    """(Muon, AdamW) shard elements per rank."""

    def add(self, cost: Cost, ranks: Sequence[int]) -> None:
        for (src, dst), nbytes in cost.flows.items():
            self.flows[(ranks[src], ranks[dst])] += nbytes
        for i, r in enumerate(ranks):
            self.ns_flops[r] += cost.ns_flops[i]
            self.ns_calls[r] += cost.ns_calls[i]


@dataclass(frozen=True)
class SchemeResult:
    optimizer_ms: float
    share: float
    exchange_ms: float
    ns_ms: float
    elementwise_ms: float
    """The three parts of the slowest rank's time."""
    max_bytes_sent: int
    max_inter_node_bytes_sent: int
    total_bytes_sent: int
    max_ns_tflop: float
    ns_redundancy: float
    """NS FLOPs over all ranks / each logical matrix's NS FLOPs once."""
    ns_call_redundancy: float
    ns_imbalance: float
    """max / mean NS FLOPs over ranks."""
    mean_ns_ms: float
    """NS time at the mean load: what perfect balance would give."""
    padding: float | None = None
    """Megatron: padding elements / parameter elements of its Muon buffers."""


def evaluate(
    cost: GlobalCost, rates: Rates, compute_s: float, logical_flops: int, logical_calls: int
) -> SchemeResult:
    world = len(cost.ns_flops)
    node = [r // rates.gpus_per_node for r in range(world)]
    sent = [[0, 0] for _ in range(world)]  # [intra, inter]
    recv = [[0, 0] for _ in range(world)]
    for (src, dst), nbytes in cost.flows.items():
        link = int(node[src] != node[dst])
        sent[src][link] += nbytes
        recv[dst][link] += nbytes
    bandwidth = (rates.nvlink_gbps * 1e9, rates.ib_gbps * 1e9)
    ns_rate = rates.ns_efficiency * rates.peak_tflops * 1e12
    parts = []
    for r in range(world):
        exchange = sum(max(sent[r][k], recv[r][k]) / bandwidth[k] for k in (0, 1))
        muon, adamw = cost.elements[r]
        elementwise = (muon * MUON_BYTES_PER_ELEMENT + adamw * ADAMW_BYTES_PER_ELEMENT) / (
            rates.hbm_tbps * 1e12
        )
        parts.append(
            (exchange + cost.ns_flops[r] / ns_rate + elementwise, exchange, r, elementwise)
        )
    total, exchange, slowest, elementwise = max(parts)
    mean_flops = sum(cost.ns_flops) / world
    return SchemeResult(
        optimizer_ms=1e3 * total,
        share=total / (compute_s + total),
        exchange_ms=1e3 * exchange,
        ns_ms=1e3 * cost.ns_flops[slowest] / ns_rate,
        elementwise_ms=1e3 * elementwise,
        max_bytes_sent=max(sum(s) for s in sent),
        max_inter_node_bytes_sent=max(s[1] for s in sent),
        total_bytes_sent=sum(cost.flows.values()),
        max_ns_tflop=max(cost.ns_flops) / 1e12,
        ns_redundancy=sum(cost.ns_flops) / logical_flops,
        ns_call_redundancy=sum(cost.ns_calls) / logical_calls,
        ns_imbalance=max(cost.ns_flops) / mean_flops if mean_flops else 1.0,
        mean_ns_ms=1e3 * mean_flops / ns_rate,
    )


SCHEMES = ("muon_ds", "moonlight_alg1", "megatron_whole")


def model_layout(
    model: Model, layout: Layout, rates: Rates, config: MuonConfig
) -> dict[str, object]:
    """Every scheme's counts and times for one model on one layout."""
    check_layout(model, layout, rates.gpus_per_node)
    wire_bytes = choose_ns_dtype(config.ns_dtype, MODELLED_BF16_UNITS).itemsize
    specs = transformer_params(model)
    groups = build_groups(model, layout)
    plans, _ = plan_muon_ds(groups, config, wire_bytes)
    world, tp, dp = layout.gpus, layout.tp, layout.dp

    # Each logical matrix once: TP copies of a replicated matrix are the same matrix.
    logical_flops = logical_calls = 0
    for g in groups:
        for plan in plans[g.name][: 1 if g.copies else None]:
            logical_flops += sum(m.flops for m in plan.matrices)
            logical_calls += len(plan.matrices)

    adamw_local = sum(s.numel // (tp if s.tp_dim is not None else 1) for s in specs if not s.muon)
    adamw_shard = -(-adamw_local // dp)

    def zero1_elements() -> list[list[int]]:
        elements = [[0, adamw_shard] for _ in range(world)]
        for g in groups:
            for copy_views, replica in zip(g.views, g.replicas, strict=True):
                for i, views in enumerate(copy_views):
                    elements[replica[i]][0] += sum(v.numel for v in views)
        return elements

    def blank(elements: list[list[int]]) -> GlobalCost:
        return GlobalCost(defaultdict(int), [0] * world, [0] * world, [tuple(e) for e in elements])

    muon_ds = blank(zero1_elements())
    alg1 = blank(zero1_elements())
    for g in groups:
        group_tp = tp if g.name == "dense_tp" else 1
        for plan, replica in zip(plans[g.name], g.replicas, strict=True):
            muon_ds.add(muon_ds_cost(plan, wire_bytes), replica)
            alg1.add(algorithm1_cost(plan, group_tp, wire_bytes), replica)

    # Megatron: one layer-wise buffer for the dense Muon params (split or not), one for
    # each EP rank's experts; padding is what the layout adds to both.
    order = [s.name for s in specs]
    dense = whole_params([plans[n][0] for n in ("dense_tp", "dense") if n in plans], order)
    dense_layout = megatron_layout(dense, dp)
    megatron_elements = [[dense_layout.loads[r // tp], adamw_shard] for r in range(world)]
    padding, buffer_numel = dense_layout.padding * tp, sum(p.numel for p in dense) * tp
    megatron = GlobalCost(defaultdict(int), [0] * world, [0] * world, [])
    megatron.add(megatron_cost(dense, dense_layout, tp, wire_bytes), range(world))
    if "expert" in plans:
        expert_replicas = next(g for g in groups if g.name == "expert").replicas
        for plan, replica in zip(plans["expert"], expert_replicas, strict=True):
            experts = whole_params([plan], order)
            expert_layout = megatron_layout(experts, layout.expert_dp)
            megatron.add(megatron_cost(experts, expert_layout, 1, wire_bytes), replica)
            for j, r in enumerate(replica):
                megatron_elements[r][0] += expert_layout.loads[j]
            padding += expert_layout.padding
            buffer_numel += sum(p.numel for p in experts)
    megatron.elements = [tuple(e) for e in megatron_elements]

    n_active = active_params(model, specs)
    tokens_per_gpu = rates.global_batch * rates.seq_len / world
    compute_s = 6 * n_active * tokens_per_gpu / (rates.mfu * rates.peak_tflops * 1e12)
    results = {
        name: evaluate(cost, rates, compute_s, logical_flops, logical_calls)
        for name, cost in zip(SCHEMES, (muon_ds, alg1, megatron), strict=True)
    }
    results["megatron_whole"] = dataclasses.replace(
        results["megatron_whole"], padding=padding / buffer_numel
    )
    return {
        "model": model.key,
        "gpus": world,
        "tp": tp,
        "ep": layout.ep,
        "dp": dp,
        "expert_dp": layout.expert_dp if model.shape.experts else None,
        "layout": layout.label(),
        "params": sum(s.numel for s in specs),
        "active_params": n_active,
        "logical_matrices": logical_calls,
        "tokens_per_gpu": tokens_per_gpu,
        "compute_s": compute_s,
        "plans": {
            g.name: {
                "ranks": len(g.replicas[0]),
                "copies": len(g.replicas),
                "planned": len({id(p) for p in plans[g.name]}),
                "matrices": [len(p.matrices) for p in plans[g.name]],
                "local_matrices": [len(p.local) for p in plans[g.name]],
                "buckets": [len(p.buckets) for p in plans[g.name]],
            }
            for g in groups
        },
        "schemes": {name: dataclasses.asdict(r) for name, r in results.items()},
    }


# -- report ----------------------------------------------------------------------------------------

LADDER = (8, 64, 256, 512, 1024)
DEFAULT_LAYOUTS = [
    *[("moonlight-16b", Layout(n, 1, 8)) for n in LADDER],
    ("moonlight-16b", Layout(256, 2, 8)),
    *[("llama3-8b", Layout(n, 1, 1)) for n in LADDER],
    ("llama3-8b", Layout(1024, 4, 1)),
    *[("llama-70b", Layout(n, 8, 1)) for n in LADDER],
]


def parse_layout(text: str) -> tuple[str, Layout]:
    """``model:gpus[:tp[:ep]]``, e.g. ``moonlight-16b:256:1:8``."""
    parts = text.split(":")
    if parts[0] not in MODELS or not 2 <= len(parts) <= 4:
        raise argparse.ArgumentTypeError(
            f"layout {text!r}: expected model:gpus[:tp[:ep]] with model one of {sorted(MODELS)}"
        )
    try:
        numbers = [int(x) for x in parts[1:]]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layout {text!r}: gpus, tp and ep must be integers"
        ) from None
    return parts[0], Layout(*numbers)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(rows: Sequence[dict]) -> str:
    head = (
        "| model | GPUs | layout | compute s | muon_ds opt ms (share) | Alg-1 opt ms (share) "
        "| Megatron whole opt ms (share) |\n|---|---:|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        s = row["schemes"]
        cells = [f"{s[k]['optimizer_ms']:.2f} ({_pct(s[k]['share'])})" for k in SCHEMES]
        lines.append(
            f"| {row['model']} | {row['gpus']} | {row['layout']} | {row['compute_s']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    detail = (
        "| model | GPUs | layout | scheme | exchange ms | NS ms | elementwise ms | max MB sent "
        "(inter-node) | max NS TFLOP | NS redundancy | NS max/mean | padding |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    details = []
    for row in rows:
        for k in SCHEMES:
            r = row["schemes"][k]
            pad = "" if r["padding"] is None else _pct(r["padding"])
            details.append(
                f"| {row['model']} | {row['gpus']} | {row['layout']} | {k} | "
                f"{r['exchange_ms']:.2f} | {r['ns_ms']:.2f} | {r['elementwise_ms']:.2f} | "
                f"{r['max_bytes_sent'] / 1e6:.1f} ({r['max_inter_node_bytes_sent'] / 1e6:.1f}) | "
                f"{r['max_ns_tflop']:.2f} | {r['ns_redundancy']:.2f} | {r['ns_imbalance']:.2f} | "
                f"{pad} |"
            )
    return (
        "Optimizer time per step (slowest rank) and its share of step time\n\n"
        + head
        + "\n".join(lines)
        + "\n\nCounted costs (slowest rank's time parts; bytes and FLOPs are per step)\n\n"
        + detail
        + "\n".join(details)
    )


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    styles = {
        "muon_ds": ("C0", "o-"),
        "moonlight_alg1": ("C1", "s--"),
        "megatron_whole": ("C2", "^:"),
    }
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for n, tp in enumerate(
            sorted({r["tp"] for r in mine}, key=lambda t: -sum(r["tp"] == t for r in mine))
        ):
            series = sorted((r for r in mine if r["tp"] == tp), key=lambda r: r["gpus"])
            for k in SCHEMES:
                color, style = styles[k]
                ax.plot(
                    [r["gpus"] for r in series],
                    [100 * r["schemes"][k]["share"] for r in series],
                    style,
                    color=color,
                    markerfacecolor=color if n == 0 else "none",
                    label=f"{k} (TP{tp})",
                )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["gpus"] for r in mine}))
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        for formatter in (ax.xaxis.set_major_formatter, ax.yaxis.set_major_formatter):
            formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("optimizer share of step time (%)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Rates()
    for field in dataclasses.fields(Rates):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
            help=f"{RATE_HELP[field.name]} (default {getattr(defaults, field.name)})",
        )
    parser.add_argument(
        "--layout",
        type=parse_layout,
        action="append",
        help="model:gpus[:tp[:ep]], repeatable; default: a ladder of 8..1024 GPUs per model",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/scale_model"), help="writes OUT.json and OUT.png"
    )
    args = parser.parse_args()
    config = MuonConfig()
    layouts = args.layout or DEFAULT_LAYOUTS
    try:
        rates = Rates(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Rates)})
        for key, layout in layouts:
            check_layout(MODELS[key], layout, rates.gpus_per_node)
    except ValueError as error:
        parser.error(str(error))

    print("Scale model (counted by muon_ds.plan; no GPU ran). Parameters:")
    for line in rates.describe():
        print("  " + line)
    wire = str(choose_ns_dtype(config.ns_dtype, MODELLED_BF16_UNITS)).removeprefix("torch.")
    print(
        f"  Muon: {config.ns_steps} NS steps, {wire} on the wire (ns_dtype "
        f"{config.ns_dtype!r} on {MODELLED_BF16_UNITS}), owner imbalance "
        f"limit {config.owner_imbalance_limit}, buckets of {config.exchange_bucket_mb:g} MiB"
    )
    for key in dict.fromkeys(k for k, _ in layouts):
        print(f"  {key}: {MODELS[key].description}")
    rows = []
    for key, layout in layouts:
        started = time.perf_counter()
        row = model_layout(MODELS[key], layout, rates, config)
        row["seconds_to_count"] = time.perf_counter() - started
        print(f"  counted {key} on {layout.label()} in {row['seconds_to_count']:.1f} s", flush=True)
        rows.append(row)
    print()
    print(markdown(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "rates": dataclasses.asdict(rates),
        "muon_bytes_per_element": MUON_BYTES_PER_ELEMENT,
        "adamw_bytes_per_element": ADAMW_BYTES_PER_ELEMENT,
        "muon_config": dataclasses.asdict(config),
        "models": {k: MODELS[k].description for k in dict.fromkeys(k for k, _ in layouts)},
        "rows": rows,
    }
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=1))
    plot(rows, png_path)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
