"""The optimizer DeepSpeed builds for ``"type": "MuonDS"``: a thin shell around the core.

It routes by Moonlight's rule, which needs parameter names and module types, so it is
built with the model in hand: from the config, the engine hook in
``muon_ds.patches.deepspeed`` passes the engine's module; built by hand (Hugging Face's
``optimizer_cls_and_kwargs``, ``deepspeed.initialize(optimizer=...)``) it takes the model
(``OrthogonalizedZeroOptimizer(model, ...)`` or ``model=`` beside param groups) or
``named_parameters()``, and refuses to build without names. Either way the engine hook
hands it the engine before ZeRO wraps it (``attach``), where stage, offload and
round-robin settings are checked; the first step checks again what ZeRO built.

ZeRO-1/2 flattens each param group into one fp32 partition per rank and calls ``step()``
once per group with only that group in ``param_groups`` (all groups at once under
``BF16_Optimizer``). Before that swap we split every user group into a Muon half and an
AdamW half (and, with ``decay_vectors_and_embeddings=False``, exempt groups) and remember
each half's model parameters; at a group's first step its ``ShardedMuonCore`` is built
from DeepSpeed's own partition map and DP group (read through ``muon_ds.patches``).

The class name deliberately lacks "muon": DeepSpeed 0.19.8 enters its own Muon code path
for a tensor tagged ``use_muon`` when the optimizer's class name contains it
(``_is_muon_group`` and the gradient paths of ``deepspeed/runtime/zero/stage_1_and_2.py``).
Names, groups, checkpoints and refusals live beside this file (``groups``, ``checkpoint``,
``support``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from muon_ds.closure import loss_from_closure
from muon_ds.config import MuonConfig
from muon_ds.deepspeed.checkpoint import MOMENTUM_KEY, ZeroCheckpointing
from muon_ds.deepspeed.groups import GROUP_KEY, named_groups, split_groups
from muon_ds.deepspeed.support import (
    UnsupportedDeepSpeedSetupError,
    check_what_zero_built,
    refuse_unsupported,
)
from muon_ds.device import describe_ns_dtype
from muon_ds.layout import ShardView
from muon_ds.math import matrix_shape
from muon_ds.patches import deepspeed_zero as zero
from muon_ds.plan import NsLedger, Plan
from muon_ds.routing import RoutedTensor, RoutingReport, print_on_rank0
from muon_ds.sharded import ShardedMuonCore

logger = logging.getLogger("muon_ds")


class OrthogonalizedZeroOptimizer(ZeroCheckpointing, torch.optim.Optimizer):
    """muon_ds under DeepSpeed ZeRO stage 1 or 2 (registered as ``"MuonDS"``).

    ``params``: the model itself, ``model.named_parameters()``, or tensors / param groups
    with ``model=`` naming them; ``config_params``: MuonConfig keys (DeepSpeed's ``betas``
    and ``eps`` included). Without names for every parameter it refuses to build.
    """

    def __init__(
        self, params: Any, model: torch.nn.Module | None = None, **config_params: Any
    ) -> None:
        self.config = MuonConfig.from_dict(config_params)
        user_groups, names = named_groups(params, model)
        groups, self._model_params = split_groups(user_groups, self.config, names)
        _print_effective_config(self.config, groups)
        self._names = names
        defaults = {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
        super().__init__(groups, defaults)
        # ZeRO shows step() one group at a time; the report and record need them all.
        self._groups = list(self.param_groups)
        # One core per (split group, ZeRO-3 sub-group; 0 under ZeRO-1/2).
        self._cores: dict[tuple[int, int], ShardedMuonCore] = {}
        # Newton-Schulz FLOPs per global rank over every group's core built so far.
        self._ledger = NsLedger()
        # Whether ZeRO stage 3 partitions the parameters; known at the first step.
        self._zero3: bool | None = None

    def attach(self, engine: Any) -> None:
        """Refuse ZeRO settings muon_ds does not train correctly; the engine hook calls
        this inside ``deepspeed.initialize``, before ZeRO wraps the optimizer."""
        refuse_unsupported(zero.zero_settings(engine))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = loss_from_closure(closure)
        if self._zero3 is None:
            self._zero3 = check_what_zero_built(p for ps in self._model_params.values() for p in ps)
            print_on_rank0(self.routing_report().lines())
        for group in self.param_groups:
            if not group["params"]:
                continue  # ZeRO-3 hands over one sub-group's partition at a time
            buffer = group["params"][0]
            key = (group[GROUP_KEY], self._sub_group(group))
            core = self._cores.get(key) or self._build_core(group, key)
            if group["algorithm"] == "muon":
                # DeepSpeed's universal-checkpoint loader writes every saved key into the
                # state directly, bypassing load_state_dict, so the zero exp_avg_sq and the
                # step written for it come back here: Muon keeps neither, drop them.
                self.state[buffer].pop("exp_avg_sq", None)
                self.state[buffer].pop("step", None)
            core.run([(group["lr"], group["weight_decay"])], self.state)
            if not self._zero3:
                self._link_state(group)
        return loss

    def _link_state(self, group: dict[str, Any]) -> None:
        """Point each model param's DeepSpeed fragment at its slice of our state.

        DeepSpeed links these views (what ``safe_get_full_optimizer_state`` reads) only
        after group 0's first step; linking every group after its step keeps them valid.
        """
        model_params = self._model_params[group[GROUP_KEY]]
        zero.link_optimizer_state(model_params, group["params"][0], self.state)

    # -- routing ----------------------------------------------------------------------

    def routed_tensors(self) -> list[RoutedTensor]:
        """Every parameter's name, shape, route and weight decay (``muon_ds.routing_report``)."""
        return [
            RoutedTensor(
                name=self._names[id(param)],
                shape=zero.full_shape(param),
                route=group["algorithm"],
                weight_decay=group["weight_decay"],
            )
            for group in self._groups
            for param in self._model_params[group[GROUP_KEY]]
        ]

    def routing_report(self) -> RoutingReport:
        return RoutingReport(tuple(self.routed_tensors()))

    def _sub_group(self, group: dict[str, Any]) -> int:
        """Which ZeRO-3 sub-group's partition ``group`` holds now (0 under ZeRO-1/2,
        which gives each param group one partition)."""
        if not self._zero3:
            return 0
        buffer = group["params"][0]
        for param in self._model_params[group[GROUP_KEY]]:
            partition = zero.zero3_partition(param)
            if partition.buffer is buffer:
                return partition.sub_group
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS got a ZeRO-3 partition that holds none of its param group's parameters"
        )

    def _build_core(self, group: dict[str, Any], key: tuple[int, int]) -> ShardedMuonCore:
        if len(group["params"]) != 1:
            raise UnsupportedDeepSpeedSetupError(
                f"MuonDS expects ZeRO to hand it one flat partition per param group (per "
                f"sub-group under stage 3), got {len(group['params'])} tensors"
            )
        views, dp_group = (self._zero3_views if self._zero3 else self._zero12_views)(group)
        core = ShardedMuonCore(
            group["params"],
            [group["algorithm"]],
            views,
            self.config,
            {"dense": dp_group},
            momentum_key=MOMENTUM_KEY,
            # ZeRO's step returns before calling us when the gradient norm is not finite.
            framework_skips_nonfinite=True,
            ledger=self._ledger,
        )
        self._cores[key] = core
        return core

    def _zero12_views(self, group: dict[str, Any]) -> tuple[list[ShardView], Any]:
        """Views from ZeRO-1/2's partition map; the group's (expert-)DP group."""
        model_params = self._model_params[group[GROUP_KEY]]
        views = []
        for index, param in enumerate(model_params):
            fragment = zero.partition_fragment(param)
            if fragment is not None:
                views.append(
                    self._view(
                        group, index, fragment.param_start, fragment.numel, fragment.partition_start
                    )
                )
        dp_group = zero.data_parallel_group(model_params[0]) if model_params else None
        return views, dp_group

    def _zero3_views(self, group: dict[str, Any]) -> tuple[list[ShardView], Any]:
        """Views of the parameters in the ZeRO-3 sub-group whose partition ``group``
        holds (none for a rank holding only padding); their partition group."""
        buffer = group["params"][0]
        views, partition_group = [], None
        for index, param in enumerate(self._model_params[group[GROUP_KEY]]):
            partition = zero.zero3_partition(param)
            if partition.buffer is not buffer:
                continue
            partition_group = partition.group
            if partition.numel:
                views.append(
                    self._view(
                        group, index, partition.param_start, partition.numel, partition.offset
                    )
                )
        return views, partition_group

    def _view(
        self, group: dict[str, Any], index: int, start: int, numel: int, offset: int
    ) -> ShardView:
        """The view of ``numel`` elements of the group's ``index``-th parameter from
        ``start``, lying at ``offset`` in its flat partition."""
        param = self._model_params[group[GROUP_KEY]][index]
        shape = zero.full_shape(param)
        muon = group["algorithm"] == "muon"
        return ShardView(
            name=f"{group[GROUP_KEY]}.{index}:{self._names[id(param)]}",
            matrix_shape=matrix_shape(shape) if muon else (1, math.prod(shape)),
            start=start,
            end=start + numel,
            buffer=0,
            offset=offset,
            route=group["algorithm"],
        )

    def exchange_bytes(self) -> int:
        """Bytes this rank sent in Muon exchanges since construction (all groups).

        Only the gather and scatter of matrix pieces; the 4-byte finite-gradient vote
        each step also makes is counted separately by each core's counter.
        """
        return sum(core.counter.exchange_bytes() for core in self._cores.values())

    def ns_matrices(self) -> int:
        """Matrices this rank orthogonalised whole since construction (all groups)."""
        return sum(core.counter.ns_matrices for core in self._cores.values())

    def plans(self) -> dict[tuple[tuple[int, int], str], Plan]:
        """The plan of every exchange this rank takes part in, by ((param group key,
        ZeRO-3 sub-group), exchange group name): owners, teams, segments, bytes."""
        return {
            (key, name): plan
            for key, core in self._cores.items()
            for name, plan in core.plans.items()
        }


def _print_effective_config(config: MuonConfig, groups: list[dict[str, Any]]) -> None:
    """Rank 0 prints the config and the Newton-Schulz dtype ``ns_dtype`` resolves to on the
    parameters' device (DeepSpeed has moved the model there before building us), so a
    run's log says whether "auto" picked bf16 or fp32, and why."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    ns = describe_ns_dtype(config.ns_dtype, device)
    print(f"muon_ds: effective {config}\nmuon_ds: Newton-Schulz and exchange in {ns}", flush=True)
