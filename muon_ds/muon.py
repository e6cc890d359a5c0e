"""``muon_ds.Muon``: Moonlight's Muon (with AdamW for the rest) on one process.

This is the reference the sharded optimizer is tested against, and a usable optimizer
for single-device training. The arithmetic lives in ``muon_ds.math``; this class only
routes parameters, keeps state and batches same-shape matrices into one Newton-Schulz call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from muon_ds.closure import loss_from_closure
from muon_ds.config import MuonConfig
from muon_ds.kernels import orthogonalize
from muon_ds.layout import group_key, split_param_group, tag_embeddings
from muon_ds.math import (
    MOMENTUM,
    adamw_step,
    all_finite,
    apply_muon_update,
    ensure_state,
    matrix_shape,
    muon_direction,
    update_scale,
)
from muon_ds.routing import RoutedTensor, RoutingReport, print_on_rank0

logger = logging.getLogger("muon_ds")

ParamsT = (
    torch.nn.Module
    | Iterable[torch.Tensor]
    | Iterable[tuple[str, torch.Tensor]]
    | Iterable[dict[str, Any]]
)


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices, AdamW for embeddings, head and ndim < 2 parameters.

    ``params`` is what ``torch.optim`` takes: tensors, ``model.named_parameters()`` (names
    let Moonlight's rule find embeddings and the head) or dicts of those with a per-group
    ``lr`` / ``weight_decay``; or the model itself, which also finds embeddings by module
    type (``tag_embeddings``) and is the safest way to follow Moonlight's rule.

    Each group is split in two, one per algorithm, marked by the group key
    ``"algorithm"`` (and, with ``decay_vectors_and_embeddings=False``, the exempt
    parameters into groups of their own with weight decay 0). ``lr`` and ``weight_decay``
    are read from the group at every step (so LR schedulers work); the other knobs come
    from ``config``. The first step prints the routing (``muon_ds.routing_report``).

    Non-finite gradients: if any gradient holds a NaN or an Inf, the whole step is
    skipped (no parameter and no state changes), ``skipped_steps`` is incremented,
    ``last_step_skipped`` is set and a warning is logged.
    """

    def __init__(self, params: ParamsT, config: MuonConfig | None = None, **overrides: Any) -> None:
        config = config or MuonConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.skipped_steps = 0
        self.last_step_skipped = False
        groups = _split_by_route(params, self.config)
        defaults = {"lr": self.config.lr, "weight_decay": self.config.weight_decay}
        super().__init__(groups, defaults)
        self._reported = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = loss_from_closure(closure)
        if not self._reported:
            self._reported = True
            print_on_rank0(RoutingReport(tuple(self.routed_tensors())).lines())
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_step_skipped = not bool(all_finite(grads))
        if self.last_step_skipped:
            self.skipped_steps += 1
            logger.warning(
                "muon_ds: non-finite gradient, step skipped (%d so far)", self.skipped_steps
            )
            return loss
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        cfg = self.config
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            ensure_state(state, p, "muon")
            direction = muon_direction(
                state[MOMENTUM], p.grad, mu=cfg.momentum, nesterov=cfg.nesterov
            )
            shape = matrix_shape(p.shape)
            by_shape[shape].append((p, direction.reshape(shape)))
        for (rows, cols), items in by_shape.items():
            orthogonal = orthogonalize(torch.stack([d for _, d in items]), cfg)
            scale = update_scale(rows, cols, cfg.scale_mode)
            for (p, _), o in zip(items, orthogonal, strict=True):
                apply_muon_update(
                    p, o.view_as(p), lr=group["lr"], weight_decay=group["weight_decay"], scale=scale
                )

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            ensure_state(state, p, "adamw")
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        adamw_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=group["lr"],
            betas=self.config.adamw_betas,
            eps=self.config.adamw_eps,
            weight_decay=group["weight_decay"],
        )

    def routed_tensors(self) -> list[RoutedTensor]:
        """Every parameter's name, shape, route and weight decay (``muon_ds.routing_report``).

        Names are those passed (``named_parameters()`` or the model); an unnamed tensor is
        ``<param i>``, its position among all the optimizer's parameters.
        """
        rows = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, param in zip(names, group["params"], strict=True):
                rows.append(
                    RoutedTensor(
                        name=name or f"<param {len(rows)}>",
                        shape=tuple(param.shape),
                        route=group["algorithm"],
                        weight_decay=group["weight_decay"],
                    )
                )
        return rows

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict``, but momentum stays fp32.

        torch casts every floating state tensor to its param's dtype on load, which would
        round a bf16 param's fp32 momentum; it is restored from ``state_dict`` afterwards.
        """
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, saved_id in zip(params, saved_ids, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            if MOMENTUM in saved:
                self.state[p][MOMENTUM] = saved[MOMENTUM].to(
                    device=p.device, dtype=torch.float32, copy=True
                )


def _split_by_route(params: ParamsT, config: MuonConfig) -> list[dict[str, Any]]:
    """User param groups -> one group per route (and decay exemption) per user group,
    empty ones dropped."""
    if isinstance(params, torch.nn.Module):
        tag_embeddings(params)
        params = params.named_parameters()
    items = list(params)
    if not items:
        raise ValueError("Muon got an empty parameter list")
    user_groups = items if isinstance(items[0], dict) else [{"params": items}]

    def key_of(member: Any) -> tuple[str, bool]:
        name, param = member if isinstance(member, tuple) else (None, member)
        if not isinstance(param, torch.Tensor):
            raise TypeError(
                f"Muon params must be tensors or (name, tensor) pairs, got {type(param)}"
            )
        return group_key(name, param, config)

    # torch.optim keeps (name, tensor) pairs as each group's "param_names".
    return [g for user_group in user_groups for g in split_param_group(user_group, key_of)]
