"""The optimizer DeepSpeed builds for ``"type": "MuonDS"``: a thin shell around the core.

DeepSpeed constructs it with the model's parameters and the JSON ``"params"``, then
ZeRO-1/2 flattens each param group into one fp32 partition per rank and calls ``step()``
once per group with only that group in ``param_groups`` (all groups at once under
``BF16_Optimizer``). Before that swap we split every user group into a Muon half and an
AdamW half and remember each half's model parameters; at a group's first step its
``ShardedMuonCore`` is built from DeepSpeed's own partition map (each parameter's
``_hp_mapping``) and its DP group (``param._dp_group``, the expert-DP group for MoE).

The class name deliberately lacks "muon": DeepSpeed 0.19.8 enters its own Muon code path
when the optimizer's class name contains it (``_is_muon_group`` in stage_1_and_2.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from muon_ds.config import MuonConfig
from muon_ds.device import describe_ns_dtype
from muon_ds.layout import ShardView, route_param, tag_embeddings
from muon_ds.math import matrix_shape
from muon_ds.sharded import ShardedMuonCore

GROUP_KEY = "muon_ds_group"
"""Param-group key naming which split half a group is (a plain int, saved by torch)."""

MOMENTUM_KEY = "exp_avg"
"""Muon's momentum is stored as ``exp_avg``: DeepSpeed 0.19.8's universal-checkpoint
converter (``ds_to_universal``) carries only ``exp_avg`` and ``exp_avg_sq`` (its issue
#8608), and that converter is how a checkpoint moves to another DP size. Muon groups have
no second moment; ``state_dict`` writes zeros under ``exp_avg_sq`` for the converter and
loading drops them again. So ``safe_get_full_optimizer_state(p, "exp_avg")`` returns a
Muon matrix's full momentum (and an AdamW parameter's first moment)."""


class UnsupportedDeepSpeedSetupError(RuntimeError):
    """The DeepSpeed configuration is one muon_ds does not train correctly."""


class DeepSpeedZeroOrtho(torch.optim.Optimizer):
    """muon_ds under DeepSpeed ZeRO stage 1 or 2 (registered as ``"MuonDS"``)."""

    def __init__(self, params: Iterable[Any], **config_params: Any) -> None:
        self.config = MuonConfig.from_dict(config_params)
        engine = _building_engine()
        names: dict[int, str] = {}
        if engine is not None:
            _refuse_unsupported(engine)
            tag_embeddings(engine.module)
            names = {id(p): n for n, p in engine.module.named_parameters()}
        groups, self._model_params = _split_groups(params, self.config, names)
        _print_effective_config(self.config, groups)
        self._names = names
        defaults = {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
        super().__init__(groups, defaults)
        self._cores: dict[int, ShardedMuonCore] = {}
        # Newton-Schulz FLOPs per global rank over every group's core built so far.
        self._ns_load: dict[int, int] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            core = self._cores.get(group[GROUP_KEY]) or self._build_core(group)
            if group["algorithm"] == "muon":
                self.state[group["params"][0]].pop("exp_avg_sq", None)  # a universal load's
            core.run([(group["lr"], group["weight_decay"])], self.state)
            self._link_state(group)
        return loss

    def _link_state(self, group: dict[str, Any]) -> None:
        """Point each model param's DeepSpeed fragment at its slice of our state.

        DeepSpeed links these views (what ``safe_get_full_optimizer_state`` reads) only
        after group 0's first step; linking every group after its step keeps them valid.
        """
        model_params = self._model_params[group[GROUP_KEY]]
        lazy_init_hp_params_optimizer_state(model_params, group["params"][0], self.state)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus a zero ``exp_avg_sq`` per Muon group (see MOMENTUM_KEY)."""
        packed = super().state_dict()
        for group in packed["param_groups"]:
            if group["algorithm"] == "muon":
                for param_id in group["params"]:
                    state = packed["state"].get(param_id)
                    if state and MOMENTUM_KEY in state:
                        zeros = torch.zeros_like(state[MOMENTUM_KEY])
                        packed["state"][param_id] = {**state, "exp_avg_sq": zeros}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                for param in group["params"]:
                    self.state[param].pop("exp_avg_sq", None)

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
            if hasattr(param, "ds_id"):
                raise UnsupportedDeepSpeedSetupError(
                    "MuonDS supports ZeRO stage 1 and 2, not stage 3"
                )
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue
            if mapping.use_offload:
                raise UnsupportedDeepSpeedSetupError(
                    "MuonDS does not support offload_optimizer; remove it from zero_optimization"
                )
            start = mapping.lp_fragment_address.start
            numel = mapping.lp_fragment_address.numel
            views.append(
                ShardView(
                    name=f"{key}.{index}:{self._names.get(id(param), '')}",
                    matrix_shape=(
                        matrix_shape(param.shape)
                        if group["algorithm"] == "muon"
                        else (1, param.numel())
                    ),
                    start=start,
                    end=start + numel,
                    buffer=0,
                    offset=mapping.hp_fragment_address.start,
                    route=group["algorithm"],
                )
            )
        dp_group = getattr(model_params[0], "_dp_group", None) if model_params else None
        core = ShardedMuonCore(
            group["params"],
            [group["algorithm"]],
            views,
            self.config,
            {"dense": dp_group},
            momentum_key=MOMENTUM_KEY,
            # ZeRO's step returns before calling us when the gradient norm is not finite.
            framework_skips_nonfinite=True,
            ns_load=self._ns_load,
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
        """Matrices this rank orthogonalised since construction (all groups)."""
        return sum(core.counter.ns_matrices for core in self._cores.values())


def _split_groups(
    params: Iterable[Any], config: MuonConfig, names: dict[int, str]
) -> tuple[list[dict[str, Any]], dict[int, list[torch.Tensor]]]:
    """User groups -> a Muon half and an AdamW half each, remembering their model params.

    ZeRO flattens each group into one partition, so each half becomes a buffer that is
    wholly Muon (fp32 momentum, 4 bytes/element) or wholly AdamW (8 bytes/element).
    """
    items = list(params)
    user_groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups: list[dict[str, Any]] = []
    model_params: dict[int, list[torch.Tensor]] = {}
    for user_group in user_groups:
        halves: dict[str, list[torch.Tensor]] = {"muon": [], "adamw": []}
        for param in user_group["params"]:
            if getattr(param, "use_muon", False):
                raise UnsupportedDeepSpeedSetupError(
                    "a parameter carries use_muon=True, DeepSpeed's own Muon tag; MuonDS routes "
                    "with muon_ds.set_route(param, 'muon') instead (remove use_muon)"
                )
            halves[route_param(names.get(id(param)), param, config)].append(param)
        extra = {k: v for k, v in user_group.items() if k != "params"}
        for algorithm, members in halves.items():
            if members:
                key = len(groups)
                model_params[key] = members
                groups.append({**extra, "params": members, "algorithm": algorithm, GROUP_KEY: key})
    return groups, model_params


def _print_effective_config(config: MuonConfig, groups: list[dict[str, Any]]) -> None:
    """Rank 0 prints the config and the Newton-Schulz dtype ``ns_dtype`` resolves to on the
    parameters' device (DeepSpeed has moved the model there before building us), so a
    run's log says whether "auto" picked bf16 or fp32, and why."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    ns = describe_ns_dtype(config.ns_dtype, device)
    print(f"muon_ds: effective {config}\nmuon_ds: Newton-Schulz and exchange in {ns}", flush=True)


def _building_engine() -> Any | None:
    """The DeepSpeedEngine constructing this optimizer, found on the call stack, if any.

    DeepSpeed passes no engine to a config-built optimizer; reading it from the caller's
    frame lets unsupported setups fail inside ``deepspeed.initialize``, before training.
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DeepSpeedEngine):
            return candidate
        frame = frame.f_back
    return None


def _refuse_unsupported(engine: Any) -> None:
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2):
        raise UnsupportedDeepSpeedSetupError(
            f"MuonDS needs zero_optimization stage 1 or 2, got {stage}: it shards Muon's "
            "momentum like ZeRO-1 and exchanges only partition-straddling matrices"
        )
    if engine.zero_cpu_offload():
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support offload_optimizer; remove it from zero_optimization"
        )
    zero_config = engine._config.zero_config
    if zero_config.round_robin_gradients:
        raise UnsupportedDeepSpeedSetupError(
            "MuonDS does not support round_robin_gradients: DeepSpeed 0.19.8's partition map "
            "(_hp_mapping) does not follow the round-robin order; set it to false"
        )
