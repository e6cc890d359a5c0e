"""``ShardedMuon``: Moonlight's Muon on ZeRO-1 shards, framework-agnostic.

A framework adapter hands over its flat fp32 shard buffers (as torch param groups, each
marked ``"algorithm": "muon"`` or ``"adamw"``) and ``ShardView``s saying which elements
of which parameter each buffer holds. Per step:

1. every rank updates fp32 momentum on its own shard only (shard-shaped state);
2. the exchange gathers each logical matrix's direction to its one owner, which runs
   Newton-Schulz once (batched by shape) and scatters the pieces back (``comm``);
3. every rank applies decoupled decay and the scaled update to its own shard;
AdamW shards are updated locally. The framework's parameter all-gather follows as usual.

Construction checks, on every rank alike, that the ranks agree on the config, the
groups and the sharding (one ``all_gather_object`` of metadata over the world), so bad
input fails with the same clear error everywhere instead of hanging a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from muon_ds.agreement import check_agreement, local_problem
from muon_ds.closure import loss_from_closure
from muon_ds.comm import CommCounter, Exchange, all_ranks_finite
from muon_ds.config import MuonConfig
from muon_ds.device import resolve_ns_dtype
from muon_ds.kernels import orthogonalize, orthogonalize_block
from muon_ds.layout import ShardView
from muon_ds.math import (
    MOMENTUM,
    adamw_step,
    ensure_state,
    muon_direction,
    update_scale,
)
from muon_ds.matrices import MatrixPlan
from muon_ds.plan import NsLedger, Plan, plan_groups
from muon_ds.staging import HeldRange, Slot

logger = logging.getLogger("muon_ds")


class ShardedMuonCore:
    """The sharded step over fixed buffers: plans at construction, one ``run`` per step.

    ``buffers`` are flat fp32 shard tensors, each wholly ``"muon"`` or ``"adamw"``
    (``algorithms``); ``views`` say which parameter elements each holds; ``process_groups``
    maps each view's ``group`` name ("dense", "expert", ...) to the process group spanning
    every rank that holds a piece of those parameters (DP, DP x TP, expert-DP); ``None``
    means the default group. Optimizer state lives with the caller (a torch optimizer's
    ``state``), so frameworks checkpoint it their usual way; ``momentum_key`` names Muon's
    momentum there, for frameworks whose checkpoint tools only know some keys. A
    framework that already skips steps with a non-finite gradient on every rank before
    calling the optimizer (DeepSpeed's overflow check, the Megatron adapter's found-inf)
    sets ``framework_skips_nonfinite``, which drops our own per-step all-reduce vote.
    ``ledger`` (``muon_ds.plan.NsLedger``) holds the Newton-Schulz FLOPs each rank already
    owns: cores built one after another over one model (DeepSpeed's param groups,
    Megatron's dense and expert optimizers) share one, so owners balance each rank's
    total. Every rank plans every group, so the ledger stays identical across ranks.
    """

    def __init__(
        self,
        buffers: Sequence[torch.Tensor],
        algorithms: Sequence[str],
        views: Sequence[ShardView],
        config: MuonConfig,
        process_groups: Mapping[str, dist.ProcessGroup | None] | None = None,
        momentum_key: str = MOMENTUM,
        framework_skips_nonfinite: bool = False,
        ledger: NsLedger | None = None,
    ) -> None:
        self.buffers = list(buffers)
        self.momentum_key = momentum_key
        self.framework_skips_nonfinite = framework_skips_nonfinite
        self.algorithms = list(algorithms)
        self.views = tuple(views)
        self.config = config
        self.counter = CommCounter()
        # Newton-Schulz and the wire share one dtype, resolved for the shards' device; the
        # ranks check below that they agree on it (``auto`` could differ across machines).
        self.device = self.buffers[0].device if self.buffers else torch.device("cpu")
        self.ns_dtype = resolve_ns_dtype(config.ns_dtype, self.device)
        groups = dict(process_groups or {"dense": None})
        problem = local_problem(self.buffers, self.algorithms, self.views, groups)
        self.plans, self._exchanges = self._agree_and_plan(
            groups, problem, NsLedger() if ledger is None else ledger
        )

    # -- construction ---------------------------------------------------------------

    def _agree_and_plan(
        self,
        groups: Mapping[str, dist.ProcessGroup | None],
        problem: str | None,
        ledger: NsLedger,
    ) -> tuple[dict[str, Plan], list[Exchange]]:
        """Gather every rank's metadata, check agreement, build every group's plan.

        Every rank checks everything, so an error is raised on all ranks at once.
        """
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        members = {
            key: tuple(dist.get_process_group_ranks(g or dist.group.WORLD)) if distributed else (0,)
            for key, g in groups.items()
        }
        mine = {
            "config": dataclasses.asdict(self.config),
            "ns_dtype": self.ns_dtype,
            "members": members,
            "views": [v for v in self.views if v.route == "muon"],
            "problem": problem,
            "host": socket.gethostname(),
        }
        everyone: list[Any] = [None] * (dist.get_world_size() if distributed else 1)
        if distributed:
            dist.all_gather_object(everyone, mine)
        else:
            everyone[0] = mine
        check_agreement(everyone)

        views = {
            key: {
                ranks: [[v for v in everyone[r]["views"] if v.group == key] for r in ranks]
                for ranks in {m["members"][key] for m in everyone}
            }
            for key in groups
        }
        hosts = sorted({m["host"] for m in everyone})
        every_plan = plan_groups(
            views,
            ledger,
            ns_steps=self.config.ns_steps,
            ns_algorithm=self.config.ns_algorithm,
            imbalance_limit=self.config.owner_imbalance_limit,
            bucket_bytes=int(self.config.exchange_bucket_mb * 2**20),
            wire_bytes=self.ns_dtype.itemsize,
            max_team=self.config.owner_team_max,
            flops_per_byte=self.config.team_flops_per_byte,
            nodes={r: hosts.index(m["host"]) for r, m in enumerate(everyone)},
        )
        team_groups = _team_groups(every_plan)
        plans: dict[str, Plan] = {}
        exchanges = []
        for (key, ranks), plan in every_plan.items():
            if rank not in ranks:
                continue
            plans[key] = plan
            locate = {
                (v.name, v.tp.rank): HeldRange(v.buffer, v.offset, v.start)
                for v in self.views
                if v.group == key and v.route == "muon"
            }
            exchanges.append(
                Exchange(
                    plan,
                    rank=ranks.index(rank),
                    group=groups[key],
                    group_name=key,
                    locate=locate,
                    wire_dtype=self.ns_dtype,
                    counter=self.counter,
                    members=ranks,
                    team_groups=team_groups,
                )
            )
        return plans, exchanges

    def planned_bytes(self) -> dict[str, int]:
        """Bytes the plans say this rank sends per step, by exchange group name."""
        return {
            e.group_name: e.plan.bytes_sent(e.rank, e.wire_dtype.itemsize) for e in self._exchanges
        }

    # -- step -------------------------------------------------------------------------

    def run(
        self, lr_and_decay: Sequence[tuple[float, float]], state: MutableMapping[Any, Any]
    ) -> bool:
        """One step; ``lr_and_decay[i]`` is buffer i's (lr, weight_decay). False if skipped.

        Reads each buffer's ``.grad`` (a missing one counts as zero: ZeRO's averaged
        gradient of an unused parameter). A non-finite gradient on any rank skips the
        step on every rank, leaving parameters and ``state`` untouched.
        """
        grads = [b.grad if b.grad is not None else torch.zeros_like(b) for b in self.buffers]
        vote = not self.framework_skips_nonfinite
        if vote and not all_ranks_finite(grads, self.device, self.counter):
            return False
        for index, buffer in enumerate(self.buffers):
            if self.algorithms[index] == "adamw":
                self._adamw_step(buffer, grads[index], *lr_and_decay[index], state[buffer])
        self._muon_step(grads, lr_and_decay, state)
        return True

    def _muon_step(
        self,
        grads: list[torch.Tensor],
        lr_and_decay: Sequence[tuple[float, float]],
        state: MutableMapping[Any, Any],
    ) -> None:
        cfg = self.config
        directions: list[torch.Tensor] = []
        for index, buffer in enumerate(self.buffers):
            if self.algorithms[index] != "muon":
                directions.append(buffer.new_empty(0))
                continue
            buffer_state = state[buffer]
            ensure_state(buffer_state, buffer, "muon", self.momentum_key)
            momentum = buffer_state[self.momentum_key]
            directions.append(
                muon_direction(momentum, grads[index], mu=cfg.momentum, nesterov=cfg.nesterov)
            )
        # Decoupled decay first, as W (1 - lr wd) - lr scale O in the single-process rule.
        for view in self.views:
            if view.route == "muon":
                lr, weight_decay = lr_and_decay[view.buffer]
                shard = self.buffers[view.buffer][view.offset : view.offset + view.numel]
                shard.mul_(1.0 - lr * weight_decay)

        def deliver(matrix: MatrixPlan, slot: Slot, values: torch.Tensor) -> None:
            scale = update_scale(matrix.rows, matrix.cols, cfg.scale_mode)
            shard = slot.view(self.buffers[slot.buffer])
            # In-place add upcasts the NS-dtype values itself: no fp32 temporary per piece.
            shard.add_(values, alpha=-lr_and_decay[slot.buffer][0] * scale)

        for exchange in self._exchanges:
            exchange.run(
                directions,
                lambda batch: orthogonalize(batch, cfg),
                deliver,
                lambda block, team, mode: orthogonalize_block(block, team, mode, cfg),
            )

    def _adamw_step(
        self,
        buffer: torch.Tensor,
        grad: torch.Tensor,
        lr: float,
        weight_decay: float,
        buffer_state: MutableMapping[str, Any],
    ) -> None:
        ensure_state(buffer_state, buffer, "adamw")
        adamw_step(
            [buffer],
            [grad],
            [buffer_state["exp_avg"]],
            [buffer_state["exp_avg_sq"]],
            [buffer_state["step"]],
            lr=lr,
            betas=self.config.adamw_betas,
            eps=self.config.adamw_eps,
            weight_decay=weight_decay,
        )


def _team_groups(
    plans: Mapping[tuple[str, tuple[int, ...]], Plan],
) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A process group for every team of every plan, keyed by its global ranks (ascending).

    ``new_group`` is collective over the world: every rank plans every group, so every
    rank creates the same groups in the same order (plans sorted, then matrix order).
    """
    groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for (_, ranks), plan in sorted(plans.items()):
        for matrix in plan.matrices:
            if matrix.team is None:
                continue
            team = tuple(sorted(ranks[r] for r in matrix.team.members))
            if team not in groups:
                groups[team] = dist.new_group(list(team))
    return groups


class ShardedMuon(torch.optim.Optimizer):
    """Muon + AdamW over ZeRO-1 shard buffers, each matrix orthogonalised exactly once.

    ``param_groups``: torch-style groups of flat shard buffers, each with
    ``"algorithm"`` set; a buffer is referenced by its position across all groups.
    ``views``, ``process_groups`` and ``ledger``: as for ``ShardedMuonCore``. ``lr`` and
    ``weight_decay`` are read from the groups at every step, so LR schedulers work.
    Non-finite gradients skip the step on every rank, as in ``muon_ds.Muon``.
    """

    def __init__(
        self,
        param_groups: Sequence[dict[str, Any]],
        views: Sequence[ShardView],
        config: MuonConfig,
        process_groups: Mapping[str, dist.ProcessGroup | None] | None = None,
        framework_skips_nonfinite: bool = False,
        ledger: NsLedger | None = None,
    ) -> None:
        self.config = config
        self.skipped_steps = 0
        self.last_step_skipped = False
        defaults = {"lr": config.lr, "weight_decay": config.weight_decay}
        super().__init__([dict(g) for g in param_groups], defaults)
        self.core = ShardedMuonCore(
            [p for g in self.param_groups for p in g["params"]],
            [g.get("algorithm") for g in self.param_groups for _ in g["params"]],
            views,
            config,
            process_groups,
            framework_skips_nonfinite=framework_skips_nonfinite,
            ledger=ledger,
        )

    @property
    def counter(self) -> CommCounter:
        return self.core.counter

    @property
    def plans(self) -> dict[str, Plan]:
        return self.core.plans

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = loss_from_closure(closure)
        lr_and_decay = [
            (g["lr"], g["weight_decay"]) for g in self.param_groups for _ in g["params"]
        ]
        self.last_step_skipped = not self.core.run(lr_and_decay, self.state)
        if self.last_step_skipped:
            self.skipped_steps += 1
            logger.warning(
                "muon_ds: non-finite gradient on some rank, step skipped on every rank (%d so far)",
                self.skipped_steps,
            )
        return loss

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps (momentum, Adam moments; not steps)."""
        return sum(
            t.numel() * t.element_size()
            for state in self.state.values()
            for k, t in state.items()
            if k != "step"
        )
