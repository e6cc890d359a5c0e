"""ShardedMuon on real gloo ranks against single-process ``muon_ds.Muon``.

Every scenario runs the reference Muon on the unsharded model inside each rank (same
seeds, same gradients) and each rank checks the elements it holds, so together the ranks
check every element. Each scenario is one spawn of gloo processes (module-scoped
fixtures) whose results several tests read. Counted quantities are asserted exactly.

Tolerances: with ``ns_dtype="float32"`` only matmul summation order may differ, so
2e-6; with bf16 Newton-Schulz (forced: "auto" would follow the device) the sharded path
rounds exactly what the single-process path rounds (the wire carries the NS dtype), so
results must be bitwise equal.

With ``MUON_DS_TEST_DEVICE=cuda`` (the GPU check) every buffer, gradient and reference
lives on the GPU: gloo carries the CUDA tensors (NCCL refuses two ranks on one GPU), the
kernel orthogonalises, and each step's host synchronisations are counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from muon_ds import Muon, MuonConfig, device
from muon_ds.sharded import ShardedMuon
from tests.dist.models import (
    DENSE_SHAPES,
    MOE_SHAPES,
    TP_SHAPES,
    LocalParam,
    dense_dp_locals,
    make_grads,
    make_params,
    moe_locals,
    tp_locals,
)
from tests.conftest import TEST_DEVICE
from tests.dist.zero1 import move_shard, read_shard, run_ranks, set_shard_grads, zero1_shard

STEPS = 3
FP32_TOL = 2e-6
CONFIGS = {
    "fp32": MuonConfig(ns_dtype="float32"),
    "bf16": MuonConfig(ns_dtype="bfloat16"),
    # Never move a matrix for balance: every matrix stays with its largest holder.
    "locality": MuonConfig(ns_dtype="bfloat16", owner_imbalance_limit=1e9),
    # About 100 bytes per bucket: one matrix per bucket, so gathers overlap Newton-Schulz.
    "small_buckets": MuonConfig(ns_dtype="bfloat16", exchange_bucket_mb=1e-4),
    # Every matrix through its Gram matrix (the reference runs the same algorithm).
    "gram": MuonConfig(ns_dtype="bfloat16", ns_algorithm="gram"),
}
TOLERANCE = {"fp32": FP32_TOL, "bf16": 0.0, "locality": 0.0, "small_buckets": 0.0, "gram": 0.0}


def _reference(shapes: dict[str, tuple[int, ...]], config: MuonConfig) -> dict[str, torch.Tensor]:
    params = {name: p.to(TEST_DEVICE) for name, p in make_params(shapes).items()}
    optimizer = Muon(list(params.items()), config)
    for step in range(STEPS):
        for name, grad in make_grads(shapes, step).items():
            params[name].grad = grad.to(TEST_DEVICE)
        optimizer.step()
    return {name: p.cpu() for name, p in params.items()}


@contextlib.contextmanager
def _host_syncs() -> Iterator[list[str]]:
    """The synchronising CUDA calls made inside the block, one Python stack each (torch's
    sync debug mode warns at each); an empty list off the GPU."""
    if TEST_DEVICE.type != "cuda":
        yield []
        return
    stacks: list[str] = []

    def record(*_: Any, **__: Any) -> None:
        stacks.append("".join(traceback.format_stack(limit=12)[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield stacks
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _train(
    config: MuonConfig,
    shapes: dict[str, tuple[int, ...]],
    locals_of: Callable[[dict[str, torch.Tensor]], list[LocalParam]],
    shard_of: Callable[[list[LocalParam]], Any],
    process_groups: dict[str, Any],
    group_ranks: dict[str, int],
) -> dict[str, Any]:
    """Train ``STEPS`` sharded steps; report errors against the reference and counts."""
    shard = move_shard(shard_of(locals_of(make_params(shapes))), TEST_DEVICE)
    optimizer = ShardedMuon(shard.param_groups, shard.views, config, process_groups)
    syncs: list[list[str]] = []
    for step in range(STEPS):
        local_grads = {lp.name: lp.values for lp in locals_of(make_grads(shapes, step))}
        set_shard_grads(shard, local_grads)
        with _host_syncs() as stacks:
            optimizer.step()
        syncs.append(stacks)
    expected = {lp.name: lp.values for lp in locals_of(_reference(shapes, config))}
    errors = {}
    for name, values in expected.items():
        held = read_shard(shard, name)
        if held is not None:
            start, end, got = held
            errors[name] = (got - values.reshape(-1)[start:end]).abs().max().item()
    buffers = [(g["algorithm"], b) for g in shard.param_groups for b in g["params"]]
    wire = optimizer.core.ns_dtype.itemsize
    momentum = [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]
    return {
        "errors": errors,
        "ns_matrices": optimizer.counter.ns_matrices,
        "matrices": {k: len(p.matrices) for k, p in optimizer.plans.items()},
        "bytes": {
            key: sum(
                n
                for (op, g), n in optimizer.counter.bytes_sent.items()
                if g == key and op.startswith("muon_")
            )
            for key in optimizer.plans
        },
        "predicted": {
            key: plan.bytes_sent(group_ranks[key], wire) * STEPS
            for key, plan in optimizer.plans.items()
        },
        "imbalance": {k: p.imbalance() for k, p in optimizer.plans.items()},
        "buckets": {k: len(p.buckets) for k, p in optimizer.plans.items()},
        "exchanged": {k: len(p.matrices) - len(p.local) for k, p in optimizer.plans.items()},
        "state_bytes": optimizer.state_bytes(),
        "expected_state_bytes": sum(
            (4 if algorithm == "muon" else 8) * b.numel() for algorithm, b in buffers
        ),
        "momentum_dtypes": {str(m.dtype) for m in momentum},
        "momentum_numel": sum(m.numel() for m in momentum),
        "muon_buffer_numel": sum(b.numel() for a, b in buffers if a == "muon"),
        "wire": wire,
        "ns_dtype": str(optimizer.core.ns_dtype),
        "views": [(v.name, v.start, v.end) for v in shard.views if v.route == "muon"],
        "host_syncs": syncs,
    }


# --- scenarios (run inside each gloo rank) -----------------------------------------------


def _data_parallel(rank: int, world: int) -> dict[str, Any]:
    def shard_of(locals_: list[LocalParam]) -> Any:
        return zero1_shard({"dense": (locals_, rank, world)})

    return {
        name: _train(
            config,
            DENSE_SHAPES,
            lambda full, c=config: dense_dp_locals(full, c),
            shard_of,
            {"dense": None},
            {"dense": rank},
        )
        for name, config in CONFIGS.items()
    }


def _tensor_parallel(rank: int, world: int) -> dict[str, Any]:
    """World 4 as TP=2 x DP=2, rank = dp * 2 + tp; the exchange group is all four."""
    tp, dp = rank % 2, rank // 2

    def shard_of(locals_: list[LocalParam]) -> Any:
        return zero1_shard({"dense": (locals_, dp, 2)})

    return {
        name: _train(
            config,
            TP_SHAPES,
            lambda full, c=config: tp_locals(full, tp, 2, c),
            shard_of,
            {"dense": None},
            {"dense": rank},
        )
        for name, config in CONFIGS.items()
        if name != "locality"
    }


def _expert_parallel(rank: int, world: int) -> dict[str, Any]:
    """World 4 as EP=2 with expert-DP=2 (rank = edp * 2 + ep); dense params DP=4."""
    ep, edp = rank % 2, rank // 2
    expert_groups = [dist.new_group([e, e + 2]) for e in range(2)]

    def shard_of(locals_: list[LocalParam]) -> Any:
        dense = [lp for lp in locals_ if lp.group == "dense"]
        experts = [lp for lp in locals_ if lp.group == "expert"]
        return zero1_shard({"dense": (dense, rank, world), "expert": (experts, edp, 2)})

    return {
        name: _train(
            config,
            MOE_SHAPES,
            lambda full, c=config: moe_locals(full, ep, 2, c),
            shard_of,
            {"dense": None, "expert": expert_groups[ep]},
            {"dense": rank, "expert": edp},
        )
        for name, config in CONFIGS.items()
        if name != "locality"
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["dp2", "dp4"])
def data_parallel(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    return request.param, run_ranks(request.param, _data_parallel)


@pytest.fixture(scope="module")
def tensor_parallel() -> list[dict[str, Any]]:
    return run_ranks(4, _tensor_parallel)


@pytest.fixture(scope="module")
def expert_parallel() -> list[dict[str, Any]]:
    return run_ranks(4, _expert_parallel)


def _assert_matches_reference(results: list[dict[str, Any]]) -> None:
    for rank, by_config in enumerate(results):
        for name, result in by_config.items():
            worst = max(result["errors"].values())
            assert worst <= TOLERANCE[name], (rank, name, result["errors"])


# --- equivalence --------------------------------------------------------------------------


def test_data_parallel_shards_equal_single_process_muon(data_parallel) -> None:
    _, results = data_parallel
    _assert_matches_reference(results)


def test_pipelined_buckets_give_the_same_result(data_parallel, tensor_parallel) -> None:
    """Many in-flight buckets (gather of b+1 during NS of b) change nothing but the count."""
    assert tensor_parallel[0]["small_buckets"]["buckets"]["dense"] > 2
    for results in (data_parallel[1], tensor_parallel):
        small = results[0]["small_buckets"]
        assert small["buckets"]["dense"] == small["exchanged"]["dense"]
        assert results[0]["bf16"]["buckets"]["dense"] == 1
        for by_config in results:
            assert by_config["small_buckets"]["bytes"] == by_config["bf16"]["bytes"]


def test_tensor_parallel_logical_matrices_equal_single_process_muon(tensor_parallel) -> None:
    """Column/row-parallel weights, interleaved QKV and gated fc1 at TP=2 x DP=2."""
    _assert_matches_reference(tensor_parallel)


def test_expert_parallel_experts_equal_single_process_muon(expert_parallel) -> None:
    _assert_matches_reference(expert_parallel)


# --- counted ------------------------------------------------------------------------------


def _ns_once_per_matrix(results: list[dict[str, Any]], expected: dict[str, int]) -> None:
    for name in results[0]:
        per_group = {k: v for k, v in results[0][name]["matrices"].items()}
        assert per_group == expected
        total = sum(r[name]["ns_matrices"] for r in results)
        # Expert groups: each instance (one per EP rank) has its own matrices.
        instances = {"dense": 1, "expert": 2}
        logical = sum(n * instances[k] for k, n in expected.items())
        assert total == logical * STEPS, (name, total)


def test_newton_schulz_runs_once_per_logical_matrix(
    data_parallel, tensor_parallel, expert_parallel
) -> None:
    muon_params = [n for n, s in DENSE_SHAPES.items() if len(s) >= 2]
    muon_params = [n for n in muon_params if "embed" not in n and "lm_head" not in n]
    _ns_once_per_matrix(data_parallel[1], {"dense": len(muon_params)})
    # Q, K, V, proj, gate, up, fc2
    _ns_once_per_matrix(tensor_parallel, {"dense": 7})
    # router, attn; per expert group: 2 experts x (fc1, fc2)
    _ns_once_per_matrix(expert_parallel, {"dense": 2, "expert": 4})


def test_exchange_bytes_equal_plan_prediction(
    data_parallel, tensor_parallel, expert_parallel
) -> None:
    for results in (data_parallel[1], tensor_parallel, expert_parallel):
        for result in (r for by_config in results for r in by_config.values()):
            assert result["bytes"] == result["predicted"]


def _held(results: list[dict[str, Any]], name: str) -> dict[str, list[int]]:
    """Each matrix's element counts on the ranks holding a piece of it, from the views."""
    held: dict[str, list[int]] = {}
    for by_config in results:
        for matrix, start, end in by_config[name]["views"]:
            held.setdefault(matrix, []).append(end - start)
    return held


def _locality_bytes(held: dict[str, list[int]], wire: int) -> int:
    """Brute force: with owners kept on the largest holder, each matrix's elements held
    elsewhere travel there and back, ``wire`` bytes each, every step."""
    return sum(2 * wire * (sum(c) - max(c)) for c in held.values()) * STEPS


def test_only_straddling_matrices_move_bytes_when_owners_keep_locality(data_parallel) -> None:
    """Brute force from the views: each matrix costs 2 x (elements not on its largest holder)."""
    _, results = data_parallel
    held = _held(results, "locality")
    expected = _locality_bytes(held, wire=2)  # forced bfloat16
    assert sum(r["locality"]["bytes"]["dense"] for r in results) == expected
    whole = [n for n, c in held.items() if len(c) == 1]
    assert whole, "the model must have matrices wholly inside one shard"
    straddling = [n for n, c in held.items() if len(c) > 1]
    assert straddling, "the model must have matrices cut by a shard boundary"


def test_optimizer_state_is_fp32_and_shard_shaped(
    data_parallel, tensor_parallel, expert_parallel
) -> None:
    for results in (data_parallel[1], tensor_parallel, expert_parallel):
        for result in (r for by_config in results for r in by_config.values()):
            assert result["state_bytes"] == result["expected_state_bytes"]
            assert result["momentum_dtypes"] == {"torch.float32"}
            assert result["momentum_numel"] == result["muon_buffer_numel"]


def test_expert_matrices_move_only_within_their_expert_group(expert_parallel) -> None:
    for result in (r for by_config in expert_parallel for r in by_config.values()):
        assert set(result["bytes"]) == {"dense", "expert"}
        assert result["bytes"]["expert"] == result["predicted"]["expert"]


# --- ns_dtype "auto": the device decides, the wire follows ---------------------------------


@contextlib.contextmanager
def _bf16_units(units: str | None) -> Iterator[None]:
    """Inside a rank: make ``muon_ds.device`` see a device with (or without) bf16 units:
    the CPU's probe, and a GPU's compute capability (Hopper, or Turing without them)."""
    real = device._cpu_bf16_units, device._cuda_capability
    device._cpu_bf16_units = lambda: units  # type: ignore[assignment]
    device._cuda_capability = lambda _: (9, 0) if units else (7, 5)  # type: ignore[assignment]
    try:
        yield
    finally:
        device._cpu_bf16_units, device._cuda_capability = real


AUTO_CPUS = {"no_bf16_units": None, "avx512_bf16": "AVX-512 BF16"}
"""The CPUs ``ns_dtype="auto"`` runs on in ``_auto_dtype``: what its probe reports."""


def _auto_dtype(rank: int, world: int) -> dict[str, Any]:
    """DP ranks with the default ``ns_dtype="auto"`` on each faked CPU (owners kept local,
    so the bytes have a brute-force count); the single-process reference sees the same CPU."""
    config = MuonConfig(owner_imbalance_limit=1e9)
    assert config.ns_dtype == "auto"
    results = {}
    for name, units in AUTO_CPUS.items():
        with _bf16_units(units):
            results[name] = _train(
                config,
                DENSE_SHAPES,
                lambda full: dense_dp_locals(full, config),
                lambda locals_: zero1_shard({"dense": (locals_, rank, world)}),
                {"dense": None},
                {"dense": rank},
            )
    return results


@pytest.fixture(scope="module")
def auto_dtype() -> list[dict[str, Any]]:
    return run_ranks(2, _auto_dtype)


@pytest.mark.parametrize(
    ("cpu", "dtype", "wire", "tolerance"),
    [
        ("no_bf16_units", "torch.float32", 4, FP32_TOL),
        ("avx512_bf16", "torch.bfloat16", 2, 0.0),
    ],
)
def test_auto_runs_and_sends_what_the_cpu_multiplies_fast(
    auto_dtype, cpu: str, dtype: str, wire: int, tolerance: float
) -> None:
    """A CPU without bf16 units runs Newton-Schulz in fp32 and its exchange counts 4 bytes
    per element moved; one with AVX-512 BF16 runs bf16 and counts 2. Either way the plan
    predicted the bytes and the result is single-process Muon's on the same CPU."""
    for result in (r[cpu] for r in auto_dtype):
        assert (result["ns_dtype"], result["wire"]) == (dtype, wire)
        assert result["bytes"] == result["predicted"]
        assert max(result["errors"].values()) <= tolerance
    held = _held(auto_dtype, cpu)
    moved = sum(r[cpu]["bytes"]["dense"] for r in auto_dtype)
    assert moved == _locality_bytes(held, wire) > 0


@pytest.mark.skipif(
    TEST_DEVICE.type != "cuda", reason="counts CUDA host syncs: MUON_DS_TEST_DEVICE=cuda"
)
def test_on_the_gpu_a_step_syncs_the_host_only_for_the_finite_gradient_vote(
    data_parallel, tensor_parallel, expert_parallel
) -> None:
    """After the first step (which creates state and autotunes the kernel per shape), the
    vote's ``.item()`` is the only place a step waits for the GPU: every rank must agree
    before anything is written. The exchange, Newton-Schulz and the updates are queued
    without waiting."""
    vote = "in _all_ranks_finite"
    for results in (data_parallel[1], tensor_parallel, expert_parallel):
        for name, result in ((n, r) for by_config in results for n, r in by_config.items()):
            for stacks in result["host_syncs"][1:]:
                others = [stack for stack in stacks if vote not in stack]
                assert others == [], (name, "\n".join(others))
                assert len(stacks) == 1, (name, "\n".join(stacks))


# --- bad input: the same clear error on every rank, no hang, nothing written ---------------


def _bad_inputs(rank: int, world: int) -> dict[str, str]:
    """Each case builds a ShardedMuon from one rank's bad input; returns each rank's error."""
    config = MuonConfig()
    pairs = [dist.new_group(r) for r in ([0, 1], [1, 2], [2, 3])]

    def shard() -> Any:
        return zero1_shard(
            {"dense": (dense_dp_locals(make_params(DENSE_SHAPES), config), rank, world)}
        )

    def attempt(build: Callable[[], Any]) -> str:
        try:
            build()
        except ValueError as error:
            return str(error)
        return "no error"

    def with_views(change: Callable[[list], list]) -> Callable[[], Any]:
        s = shard()
        return lambda: ShardedMuon(s.param_groups, change(s.views), config)

    def shifted(views: list) -> list:
        if rank != 3:
            return views
        v = views[0]
        return [dataclasses.replace(v, start=v.start - 1, end=v.end - 1), *views[1:]]

    def too_long(views: list) -> list:
        if rank != 2:
            return views
        return [dataclasses.replace(views[0], offset=10**6), *views[1:]]

    def reshaped(views: list) -> list:
        if rank != 1:
            return views
        muon = next(i for i, v in enumerate(views) if v.route == "muon")
        rows, cols = views[muon].matrix_shape
        views[muon] = dataclasses.replace(views[muon], matrix_shape=(cols, rows))
        return views

    s = shard()
    groups_by_rank = {0: pairs[0], 1: pairs[1], 2: pairs[1], 3: pairs[2]}
    return {
        "config": attempt(
            lambda: ShardedMuon(
                s.param_groups, s.views, MuonConfig(lr=2e-3) if rank == 1 else config
            )
        ),
        "buffer": attempt(with_views(too_long)),
        "overlap": attempt(with_views(shifted)),
        "shape": attempt(with_views(reshaped)),
        "group": attempt(
            lambda: ShardedMuon(s.param_groups, s.views, config, {"dense": groups_by_rank[rank]})
        ),
        "ns_dtype": _on_cpu(
            None if rank == 2 else "AMX",
            lambda: attempt(lambda: ShardedMuon(s.param_groups, s.views, MuonConfig())),
        ),
    }


def _on_cpu(units: str | None, run: Callable[[], str]) -> str:
    with _bf16_units(units):
        return run()


@pytest.fixture(scope="module")
def bad_inputs() -> list[dict[str, str]]:
    return run_ranks(4, _bad_inputs)


EXPECTED_ERRORS = {
    "config": r"MuonConfig differs across ranks: lr=0.001 on rank 0 but 0.002 on rank 1",
    "buffer": r"rank 2: view '.*': elements \[1000000, .*\) do not fit buffer",
    "overlap": r"parameter '.*' \(TP rank 0\): rank 3's range .* overlaps element",
    "shape": r"rank 1 describes it as matrix_shape=",
    "group": r"group 'dense' disagrees across ranks: rank 0 has \[0, 1\], its member rank 1 "
    r"has \[1, 2\]",
    "ns_dtype": r"ns_dtype='auto' resolves to torch.bfloat16 on rank 0 but torch.float32 on "
    r"rank 2 \(their devices differ in bf16 support\); set ns_dtype to 'bfloat16' or 'float32'",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_bad_input_raises_the_same_clear_error_on_every_rank(bad_inputs, case: str) -> None:
    messages = {result[case] for result in bad_inputs}
    assert len(messages) == 1, messages
    assert re.search(EXPECTED_ERRORS[case], messages.pop())


def _one_rank_sees_nan(rank: int, world: int) -> dict[str, Any]:
    config = MuonConfig()
    shard = zero1_shard(
        {"dense": (dense_dp_locals(make_params(DENSE_SHAPES), config), rank, world)}
    )
    optimizer = ShardedMuon(shard.param_groups, shard.views, config)
    buffers = [b for g in shard.param_groups for b in g["params"]]
    set_shard_grads(shard, make_grads(DENSE_SHAPES, 0))
    optimizer.step()
    before = [b.clone() for b in buffers]
    state_before = [v.clone() for s in optimizer.state.values() for v in s.values()]
    set_shard_grads(shard, make_grads(DENSE_SHAPES, 1))
    if rank == 1:
        buffers[0].grad[3] = float("nan")
    optimizer.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, buffers, strict=True))
    state_after = [v for s in optimizer.state.values() for v in s.values()]
    state_unchanged = len(state_before) == len(state_after) == 4 and all(
        torch.equal(a, b) for a, b in zip(state_before, state_after, strict=True)
    )
    return {
        "skipped": optimizer.last_step_skipped,
        "skipped_steps": optimizer.skipped_steps,
        "params_unchanged": unchanged,
        "state_unchanged": state_unchanged,
        "finite": all(b.isfinite().all().item() for b in buffers),
    }


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank() -> None:
    for result in run_ranks(2, _one_rank_sees_nan):
        assert result == {
            "skipped": True,
            "skipped_steps": 1,
            "params_unchanged": True,
            "state_unchanged": True,
            "finite": True,
        }
