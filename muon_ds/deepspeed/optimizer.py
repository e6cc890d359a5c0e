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
        self._cores: dict[int, ShardedMuonCore] = {}
        # Newton-Schulz FLOPs per global rank over every group's core built so far.
        self._ledger = NsLedger()
        self._reported = False

    def attach(self, engine: Any) -> None:
        """Refuse ZeRO settings muon_ds does not train correctly; the engine hook calls
        this inside ``deepspeed.initialize``, before ZeRO wraps the optimizer."""
        refuse_unsupported(zero.zero_settings(engine))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = loss_from_closure(closure)
        if not self._reported:
            check_what_zero_built(p for ps in self._model_params.values() for p in ps)
            self._reported = True
            print_on_rank0(self.routing_report().lines())
        for group in self.param_groups:
            core = self._cores.get(group[GROUP_KEY]) or self._build_core(group)
            if group["algorithm"] == "muon":
                # DeepSpeed's universal-checkpoint loader writes every saved key into the
                # state directly, bypassing load_state_dict, so the zero exp_avg_sq written
                # for its converter comes back here: Muon keeps no second moment, drop it.
                self.state[group["params"][0]].pop("exp_avg_sq", None)
            core.run([(group["lr"], group["weight_decay"])], self.state)
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
                shape=tuple(param.shape),
                route=group["algorithm"],
                weight_decay=group["weight_decay"],
            )
            for group in self._groups
            for param in self._model_params[group[GROUP_KEY]]
        ]

    def routing_report(self) -> RoutingReport:
        return RoutingReport(tuple(self.routed_tensors()))

    def _build_core(self, group: dict[str, Any]) -> ShardedMuonCore:
        key = group[GROUP_KEY]
        model_params = self._model_params[key]
        if len(group["params"]) != 1:
            raise UnsupportedDeepSpeedSetupError(
                f"MuonDS expects ZeRO stage 1 or 2 to hand it one flat partition per param "
                f"group, got {len(group['params'])} tensors; enable zero_optimization stage 1 or 2"
            )
        views = []
        for index, param in enumerate(model_params):
            fragment = zero.partition_fragment(param)
            if fragment is None:
                continue
            views.append(
                ShardView(
                    name=f"{key}.{index}:{self._names[id(param)]}",
                    matrix_shape=(
                        matrix_shape(param.shape)
                        if group["algorithm"] == "muon"
                        else (1, param.numel())
                    ),
                    start=fragment.param_start,
                    end=fragment.param_start + fragment.numel,
                    buffer=0,
                    offset=fragment.partition_start,
                    route=group["algorithm"],
                )
            )
        dp_group = zero.data_parallel_group(model_params[0]) if model_params else None
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

    def exchange_bytes(self) -> int:
        """Bytes this rank sent in Muon exchanges since construction (all groups).

        Only the gather and scatter of matrix pieces; the 4-byte finite-gradient vote
        each step also makes is counted separately by each core's counter.
        """
        return sum(core.counter.exchange_bytes() for core in self._cores.values())

    def ns_matrices(self) -> int:
        """Matrices this rank orthogonalised whole since construction (all groups)."""
        return sum(core.counter.ns_matrices for core in self._cores.values())

    def plans(self) -> dict[tuple[Any, str], Plan]:
        """The plan of every exchange this rank takes part in, by (param group key,
        exchange group name): owners, teams, segments, predicted bytes."""
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
