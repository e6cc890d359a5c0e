"""Scale model: the Muon optimizer's share of step time at full size, up to 1024 GPUs.

No GPU runs here. For full-size shapes (Moonlight-16B-A3B, a Llama-3-8B- and a 70B-like
dense model) and DP x TP x EP layouts, the script counts exactly what each scheme moves
and computes per step, then turns the counts into time with stated H100-like rates:

* **muon_ds**: ``muon_ds.plan.build_plan`` over ``ShardView``s of the layout's shards
  (ZeRO-1 unless ``--sharding`` says otherwise). Each logical matrix has one owner, or
  (``--owner-team-max`` > 1) a team of ranks of one node when it is too big for any one
  rank; straddling slices travel to it in bf16 and the update travels back; Newton-Schulz
  runs once per matrix (a team's collectives run as rings over its members, charged at
  their bytes and a fixed latency per call).
  Owners balance each rank's total Newton-Schulz load over all its groups, as muon_ds's
  Megatron adapter plans them: one per-rank ledger (``muon_ds.plan.NsLedger``), the dense
  optimizer's groups ("dense", then "dense_tp") and the expert optimizer's, the experts
  first when teams are on (``muon_ds.plan.experts_planned_first``), each group's
  copies in ascending global ranks, each plan given its ranks' load so far as
  ``prior_flops``. Bytes and FLOPs are the plans' own (``Plan.matrices`` segments, owners
  and teams, ``bytes_sent``, ``team_traffic``).
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

**Shards.** As DeepSpeed ZeRO-1 lays them out with muon_ds's param groups (``--sharding
zero1``, the default): on each TP rank, the TP-local Muon matrices in model order form
one flat buffer (dense) split evenly over the DP group; each EP rank's experts form
another, split over the expert-data-parallel group (expert TP = 1). ``--sharding zero3``
(DeepSpeed ZeRO-3) instead gives DP rank r the flat elements [r*p, (r+1)*p) of every
TP-local param, p = ceil(numel / DP); ``--sharding fsdp2`` (FSDP2's ``Shard(0)``) its
rows [r*q, (r+1)*q), q = ceil(rows / DP): either way every matrix spans (nearly) every
DP rank and travels to its owner and back. AdamW params (embedding, output head, norms)
are sharded the same way, sit in their own buffers and only add to the elementwise
update (DeepSpeed steps its padding too). Megatron's whole-matrix layout is its own and
does not change with ``--sharding``. No pipeline parallelism.
Global rank = t + TP * d (TP innermost, so TP stays inside a node) and, for experts,
e + EP * j; node = rank // gpus_per_node. A byte between two ranks of one node moves at
NVLink speed, else at InfiniBand speed.

**Exactness.** Every exchange group is planned whole, every layer (no layer is assumed
to shard like another), and every copy of a group on its own views with its own priors:
each EP rank's expert-DP group meets a different dense load (or, experts first, each
TP copy of the dense DP group a different expert load), so its owners may differ. The
unit tests replay the ledger plan by plan. (Under DeepSpeed, muon_ds plans per param
group in the user's group order; that order is not modelled here.)

**Step time.** ``compute = 6 * N_active * tokens_per_gpu / (mfu * peak)``, with N_active
every matmul weight a token passes through (top-k of the routed experts, the output
head; not the input embedding) and tokens_per_gpu = global batch x sequence / GPUs; the
framework's own gradient reduce-scatter and parameter all-gather are the same for every
optimizer and sit inside the MFU. ``optimizer = max over ranks of [exchange + NS +
elementwise]``: exchange = max(sent, received) intra-node bytes / NVLink + the same for
inter-node / IB, NS = the rank's Newton-Schulz FLOPs / (ns_efficiency * peak),
elementwise = shard elements x bytes touched per element / HBM bandwidth. Nothing is
assumed to overlap (muon_ds does overlap buckets with NS: the model is conservative for
it). The share is optimizer / (compute + optimizer). Its *floor* (``--compare``) is what no
placement of the same shards can beat: the logical Newton-Schulz FLOPs spread evenly over
every rank plus the mean elementwise update, exchange and team traffic free. Megatron's
padding is reported but not charged (it inflates the framework's gradient and parameter
collectives and memory).

    .venv/bin/python -m benchmarks.scale_model [--sharding zero1|zero3|fsdp2]
        [--out out/scale_model] [--help for rates]
"""

from __future__ import annotations

from benchmarks.scale_model.costs import (
    Cost,
    MegatronLayout,
    WholeParam,
    algorithm1_cost,
    megatron_cost,
    megatron_layout,
    muon_ds_cost,
    whole_params,
)
from benchmarks.scale_model.layouts import (
    SHARDERS,
    SHARDING_NAMES,
    SHARDINGS,
    Group,
    Layout,
    LocalParam,
    Sharding,
    adamw_elements,
    build_groups,
    check_layout,
    fsdp2_views,
    local_param,
    plan_muon_ds,
    zero1_views,
    zero3_views,
)
from benchmarks.scale_model.report import (
    DEFAULT_LAYOUTS,
    LADDER,
    main,
    markdown,
    parse_layout,
    plot,
)
from benchmarks.scale_model.specs import (
    ADAMW_BYTES_PER_ELEMENT,
    MEGATRON_ALIGN,
    MLA,
    MODELLED_BF16_UNITS,
    MODELS,
    MUON_BYTES_PER_ELEMENT,
    Model,
    ParamSpec,
    active_params,
    transformer_params,
)
from benchmarks.scale_model.timing import (
    RATE_HELP,
    SCHEMES,
    GlobalCost,
    Rates,
    SchemeResult,
    evaluate,
    model_layout,
)

__all__ = [
    "ADAMW_BYTES_PER_ELEMENT",
    "DEFAULT_LAYOUTS",
    "LADDER",
    "MEGATRON_ALIGN",
    "MLA",
    "MODELLED_BF16_UNITS",
    "MODELS",
    "MUON_BYTES_PER_ELEMENT",
    "RATE_HELP",
    "SCHEMES",
    "SHARDERS",
    "SHARDINGS",
    "SHARDING_NAMES",
    "Cost",
    "GlobalCost",
    "Group",
    "Layout",
    "LocalParam",
    "MegatronLayout",
    "Model",
    "ParamSpec",
    "Rates",
    "SchemeResult",
    "Sharding",
    "WholeParam",
    "active_params",
    "adamw_elements",
    "algorithm1_cost",
    "build_groups",
    "check_layout",
    "evaluate",
    "fsdp2_views",
    "local_param",
    "main",
    "markdown",
    "megatron_cost",
    "megatron_layout",
    "model_layout",
    "muon_ds_cost",
    "parse_layout",
    "plan_muon_ds",
    "plot",
    "transformer_params",
    "whole_params",
    "zero1_views",
    "zero3_views",
]
