"""muon_ds as the inner optimizer of Megatron-core's DistributedOptimizer.

Megatron's ``DistributedOptimizer`` already does everything around the update that a
ZeRO-1 Muon needs and that users rely on: the DDP grad reduce-scatter into each rank's
shard, the fp32 main-param shards, the grad norm and clipping on the *raw* gradients,
found-inf handling, ``step() -> (success, grad_norm, num_zeros)``, the param all-gather
and the checkpoint plumbing. ``MuonDistributedOptimizer`` keeps all of it and swaps only
the inner torch optimizer for ``ShardedMuon``, fed with ``ShardView``s read from the
distributed optimizer's own ranges (``muon_ds.megatron.views``).

Checkpoints: ``muon_ds.megatron.checkpoint``; building one per model (dense and expert,
chained): ``muon_ds.megatron.factory``. Written against megatron-core 0.19; what it needs
of Megatron's internals (the ``DistributedOptimizer`` methods overridden here, DDP's bucket
groups) goes through ``muon_ds.patches.megatron``, which checks the version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer import ChainedOptimizer

from muon_ds.comm import all_ranks_finite
from muon_ds.config import MuonConfig
from muon_ds.megatron.checkpoint import MuonCheckpointing, init_muon_state
from muon_ds.megatron.views import EXPERT, ModelLayout, shard_views
from muon_ds.patches import megatron as patches
from muon_ds.plan import NsLedger
from muon_ds.routing import RoutedTensor, RoutingReport, print_on_rank0
from muon_ds.sharded import ShardedMuon


class MuonDistributedOptimizer(MuonCheckpointing, DistributedOptimizer):
    """Megatron's DistributedOptimizer with ``ShardedMuon`` as the inner optimizer.

    ``param_groups`` are Megatron param groups (model params) each marked with
    ``"algorithm": "muon"`` or ``"adamw"``. Megatron first lays out the shards with a
    plain ``torch.optim.Optimizer`` holding the groups (the same two-phase construction it
    uses for ``HybridDeviceOptimizer``), then ``ShardedMuon`` is built over the resulting
    fp32 main shards; its construction is collective over the world.

    ``exchange_groups`` maps the view group names of ``muon_ds.megatron.views`` to process
    groups: every rank holding a piece of a logical matrix must be in its group.
    ``ledger`` is shared by the dense and the expert optimizer of one model, so each
    rank's Newton-Schulz FLOPs are balanced over both (``ShardedMuonCore``).
    """

    def __init__(
        self,
        param_groups: Sequence[dict[str, Any]],
        config: OptimizerConfig,
        muon_config: MuonConfig,
        exchange_groups: Mapping[str, dist.ProcessGroup],
        layout: ModelLayout,
        names: Mapping[torch.nn.Parameter, str],
        ledger: NsLedger,
        grad_scaler: MegatronGradScaler | None = None,
        **distributed_optimizer_args: Any,
    ) -> None:
        patches.check_distributed_optimizer(DistributedOptimizer)
        # Every model param of this optimizer, not only this rank's (checkpoints list all),
        # taken before Megatron puts the shards into these same group dicts.
        muon_params = {
            p: names[p]
            for group in param_groups
            if group["algorithm"] == "muon"
            for p in group["params"]
        }
        holder = torch.optim.Optimizer(
            list(param_groups), {"lr": config.lr, "weight_decay": config.weight_decay}
        )
        # Megatron swaps each group's params for shards below and sets its weight decay
        # at every step: keep the model params, read the decay from the live group.
        self._routed = [(list(group["params"]), group, names) for group in param_groups]
        self._reported = False
        super().__init__(holder, config, grad_scaler, init_muon_state, **distributed_optimizer_args)
        self._muon_params = muon_params
        self._muon_record: list[str] | None = None  # set by sharded_state_dict
        tp = layout.expert_tp if EXPERT in exchange_groups else layout.tp
        self._records_routing = tp.rank == 0 and self.data_parallel_group.rank() == 0
        self._loading_checkpoint = False
        shard_groups = self.optimizer.param_groups
        self._make_fp32_shards_leaves(shard_groups)
        model_params = [
            [*fp32, *fp16]
            for fp32, fp16 in zip(self.model_fp32_groups, self.model_float16_groups, strict=True)
        ]
        ranges = {}
        for models in model_params:
            for param in models:
                piece = self._get_model_param_range_map(param)["param"]
                ranges[param] = (piece.start, piece.end)
        views = shard_views(shard_groups, model_params, ranges, names, layout)
        # prepare_grads below votes on finiteness across ranks before step() is reached.
        self.optimizer = ShardedMuon(
            shard_groups,
            views,
            muon_config,
            exchange_groups,
            framework_skips_nonfinite=True,
            ledger=ledger,
        )

    def _make_fp32_shards_leaves(self, shard_groups: list[dict[str, Any]]) -> None:
        """Replace the shards of fp32 model params by detached views of the same memory.

        Megatron's shard of an fp32 param (e.g. an RMSNorm weight) is a view into the
        param, a non-leaf tensor that ``torch.optim.Optimizer`` refuses. A detached view
        shares the storage, so updates still land in the model param, and is put in both
        lists Megatron reads, so its grad copy and the inner step see the same tensor.
        """
        for group, shards in zip(shard_groups, self.shard_fp32_groups, strict=True):
            for index, shard in enumerate(shards):
                leaf = shard.detach()
                leaf.__dict__.update(shard.__dict__)
                shards[index] = leaf
                group["params"][index] = leaf

    def routed_tensors(self) -> list[RoutedTensor]:
        """This rank's model parameters: name, local shape, route and weight decay
        (``muon_ds.routing_report``; under TP the shapes are this rank's slices)."""
        return [
            RoutedTensor(names[p], tuple(p.shape), group["algorithm"], group["weight_decay"])
            for params, group, names in self._routed
            for p in params
        ]

    def step_with_ready_grads(self) -> bool:
        """Megatron's step; before the first, rank 0 prints this optimizer's routing."""
        if not self._reported:
            self._reported = True
            print_on_rank0(RoutingReport(tuple(self.routed_tensors())).lines())
        return super().step_with_ready_grads()

    def start_param_sync_for_bucket_group_subset(self) -> None:
        """All-gather the parameters of this optimizer's own buffers, once.

        Megatron 0.19.2's version walks every bucket group of the model, dense and
        expert alike, so with MoE each of the two chained distributed optimizers gathers
        every parameter and each one travels twice per step (its Adam does the same).
        """
        own = [bucket for buffer in self.buffers for bucket in buffer.buckets]
        patches.start_own_param_sync(self.model_chunks, own)

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Megatron's grad copy, then True (skip) if any rank holds a non-finite grad.

        Without a loss scaler (bf16) Megatron checks nothing; muon_ds skips such steps
        (as ``muon_ds.Muon`` does). Reporting it here, as found-inf, makes the
        ChainedOptimizer skip the dense *and* the expert optimizer together and return
        ``(False, None, None)``, the contract of a skipped fp16 step.
        """
        found_inf = super().prepare_grads()
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        finite = all_ranks_finite(
            [g for g in grads if g is not None], self.buffers[0].grad_data.device
        )
        return found_inf or not finite


def report_muon_ds_work(optimizer: ChainedOptimizer) -> str:
    """Print (and return) this rank's counted Newton-Schulz matrices and Muon exchange
    bytes over the run: what an entry point says when ``pretrain()`` returns."""
    ns_matrices = bytes_sent = 0
    for part in optimizer.chained_optimizers:
        counter = part.optimizer.counter
        ns_matrices += counter.ns_matrices
        bytes_sent += counter.exchange_bytes()
    line = (
        f"muon_ds: rank {dist.get_rank()}: Newton-Schulz on {ns_matrices} "
        f"matrices, {bytes_sent} Muon exchange bytes sent over this run"
    )
    print(line, flush=True)
    return line
