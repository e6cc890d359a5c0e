"""``--optimizer muon`` through ``launch/megatron/train_cpu.sh``: Megatron's own
``pretrain()`` on 4 CPU ranks (torchrun, gloo), end to end.

Each test runs the launcher as a user would and reads what the ranks print:
Megatron's per-iteration ``lm loss`` and validation loss, muon_ds's effective-config line
(rank 0) and each rank's counted Newton-Schulz matrices. The launcher's model has
``LAYERS`` layers with separate Q/K/V (query groups), gated fc1 (gate, up) and fc2 in
every layer; the MoE variant has ``EXPERTS`` SequentialMLP experts and a router instead of
the dense MLP. Every logical matrix is orthogonalised exactly once per step in the whole
world, so the ranks' counts add up to matrices x steps (also with two interleaved pipeline stages).
The resume tests interrupt the dense TP=2 and interleaved PP=2 runs with Megatron's own
``--save``/``--exit-interval`` and continue them with ``--load``.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from muon_ds import MuonConfig
from muon_ds.device import describe_ns_dtype
from muon_ds.testing.ports import free_port

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch" / "megatron" / "train_cpu.sh"
RANKS, STEPS = 4, 10
LAYERS, EXPERTS = 2, 6
DENSE_MATRICES = LAYERS * (3 + 1 + 2 + 1)  # Q, K, V; proj; gate, up; fc2
MOE_MATRICES = LAYERS * (3 + 1 + 1 + 3 * EXPERTS)  # ...; router; gate, up, fc2 per expert
# The launcher's lr and weight decay; every other field is Moonlight's, spelled out there
# with Megatron's --muon-* flags.
EXPECTED_CONFIG = MuonConfig(lr=2e-2, weight_decay=0.1)

_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|")
_GRAD_NORM = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? grad norm: (\S+) \|")
_VALIDATION = re.compile(
    r"validation loss at iteration \d+ on validation set \| lm loss value: (\S+) "
)
_NS = re.compile(r"muon_ds: rank (\d+): Newton-Schulz on (\d+) matrices")


def _launch(*flags: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "RANKS": str(RANKS),
        "STEPS": str(STEPS),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", str(LAUNCHER), *flags],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )


def _losses(run: subprocess.CompletedProcess) -> list[float]:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = {int(step): float(loss) for step, loss in _ITERATION.findall(run.stdout)}
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    return [losses[step] for step in range(1, STEPS + 1)]


def _assert_trains(run: subprocess.CompletedProcess) -> None:
    """Finite losses that fall well below the first; held-out validation below it too."""
    losses = _losses(run)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    (validation,) = (float(v) for v in _VALIDATION.findall(run.stdout))
    assert math.isfinite(validation), validation
    assert validation < 0.75 * losses[0], (validation, losses)


def _ns_by_rank(run: subprocess.CompletedProcess) -> dict[int, int]:
    return {int(rank): int(n) for rank, n in _NS.findall(run.stdout)}


def _assert_muon_ds_ran(run: subprocess.CompletedProcess, matrices: int) -> None:
    # Counted in the whole output, not per line: the ranks share one stdout, and another
    # rank's write can land on the same line (seen in CI).
    assert run.stdout.count("muon_ds: effective") == 1, run.stdout[-3000:]
    assert run.stdout.count(f"muon_ds: effective {EXPECTED_CONFIG}") == 1, run.stdout[-3000:]
    # The ranks run on this machine's CPU, so "auto" resolves there as it does here.
    expected = describe_ns_dtype(EXPECTED_CONFIG.ns_dtype, "cpu")
    assert run.stdout.count("muon_ds: Newton-Schulz and") == 1, run.stdout[-3000:]
    resolved = f"muon_ds: Newton-Schulz and exchange in {expected}"
    assert run.stdout.count(resolved) == 1, run.stdout[-3000:]
    by_rank = _ns_by_rank(run)
    assert sorted(by_rank) == list(range(RANKS)), by_rank
    assert sum(by_rank.values()) == matrices * STEPS, by_rank


@pytest.fixture(scope="module")
def dense_muon_ds() -> subprocess.CompletedProcess:
    return _launch(TP="2", EP="1")


def test_dense_tp2_dp2_trains_with_muon_ds_through_pretrain(dense_muon_ds) -> None:
    _assert_trains(dense_muon_ds)
    _assert_muon_ds_ran(dense_muon_ds, DENSE_MATRICES)


def test_rank_0_prints_the_routing_once_before_the_first_step(dense_muon_ds) -> None:
    """Totals per route, then the matrices on AdamW: here only the embedding (tied to
    the output head), with rank 0's TP slice of it (vocabulary 256 over TP=2)."""
    lines = [line for line in dense_muon_ds.stdout.splitlines() if "muon_ds routing:" in line]
    assert len(lines) == 2, lines
    assert lines[0].startswith("muon_ds routing: Muon "), lines
    assert lines[1].endswith("(1): module.module.embedding.word_embeddings.weight [128, 64]")


def test_moe_ep2_trains_with_muon_ds_through_pretrain() -> None:
    run = _launch(MOE="1", TP="1", EP="2")
    _assert_trains(run)
    _assert_muon_ds_ran(run, MOE_MATRICES)


PIPELINE = (
    *("--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights"),
    *("--num-layers", str(2 * LAYERS), "--num-virtual-stages-per-pipeline-rank", "2"),
)
"""PP=2 x DP=2, interleaved: twice the layers, two model chunks of one layer per rank.
Untied embeddings: with PP, Megatron's tied-embedding setup moves the weight to CUDA."""
PIPELINE_MATRICES = 2 * DENSE_MATRICES


@pytest.fixture(scope="module")
def pp2_muon_ds() -> subprocess.CompletedProcess:
    return _launch(*PIPELINE, TP="1", EP="1")


def test_interleaved_pp2_dp2_trains_with_muon_ds_through_pretrain(pp2_muon_ds) -> None:
    """Pipeline parallelism with virtual stages: each stage's optimizer orthogonalises
    its own two chunks' matrices, so over the world each is still done once a step, and
    each stage's two ranks (Megatron puts PP outermost: ranks 0, 1 and 2, 3) share half."""
    run = pp2_muon_ds
    _assert_trains(run)
    _assert_muon_ds_ran(run, PIPELINE_MATRICES)
    by_rank = _ns_by_rank(run)
    per_stage = PIPELINE_MATRICES // 2 * STEPS
    assert by_rank[0] + by_rank[1] == by_rank[2] + by_rank[3] == per_stage, by_rank


def test_overlapped_grad_reduce_and_param_gather_give_the_same_losses(dense_muon_ds) -> None:
    """``--overlap-grad-reduce --overlap-param-gather`` (what large runs use) move the same
    reductions and gathers into backward and the next forward: the same arithmetic, so
    exactly the same losses (measured: equal to every printed digit)."""
    run = _launch("--overlap-grad-reduce", "--overlap-param-gather", TP="2", EP="1")
    _assert_muon_ds_ran(run, DENSE_MATRICES)
    assert _losses(run) == _losses(dense_muon_ds)


def test_muon_impl_megatron_follows_the_same_losses_with_moonlight_settings(
    dense_muon_ds,
) -> None:
    """``--muon-impl megatron`` runs Megatron's own Muon (no muon_ds line); given the same
    Moonlight flags it is the same method, so the loss curves agree: within 1% at every
    step (measured: 0.05%; with Megatron's own defaults instead they differ by 15%)."""
    run = _launch(TP="2", EP="1", IMPL="megatron")
    _assert_trains(run)
    assert "muon_ds:" not in run.stdout
    for step, (ours, megatron) in enumerate(
        zip(_losses(dense_muon_ds), _losses(run), strict=True), start=1
    ):
        assert abs(ours - megatron) <= 0.01 * ours, (step, ours, megatron)


def test_unsupported_muon_flag_fails_on_every_rank_without_hanging(tmp_path: Path) -> None:
    """Every rank refuses the flag by itself, naming it and what is allowed, and exits.

    torchrun stops the remaining ranks as soon as it sees one fail. Checking its workers
    only every 60 s (the ranks refuse while parsing, about 15 s in, and are gone a few
    seconds later) lets every rank get there on its own: its per-rank log shows the
    message and the summary its own exit code, so no rank ran on or waited for another.
    """
    run = _launch(
        "--muon-extra-scale-factor",
        "0.5",
        PET_MONITOR_INTERVAL="60",
        PET_LOG_DIR=str(tmp_path),
        PET_REDIRECTS="3",
    )
    assert run.returncode != 0
    message = (
        "ValueError: muon_ds: --muon-extra-scale-factor 0.5: muon_ds supports 0.2 "
        "(Moonlight, the default) and 1.0"
    )
    for rank in range(RANKS):
        (log,) = tmp_path.glob(f"*/attempt_0/{rank}/stderr.log")
        assert message in log.read_text(), (rank, log.read_text()[-2000:])
    assert run.stderr.count("exitcode  : 1 ") == RANKS, run.stderr[-3000:]


SAVED_AT, RESHARDED_AT = STEPS // 2, STEPS // 2 + 2
FULLY_RESHARDABLE = (
    "--dist-ckpt-optim-fully-reshardable",
    # The other mode gathers over NCCL (.cuda()), which gloo ranks lack.
    "--distrib-optim-fully-reshardable-mem-efficient",
)


def _logged(pattern: re.Pattern, run: subprocess.CompletedProcess) -> dict[int, float]:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {int(step): float(value) for step, value in pattern.findall(run.stdout)}


def _assert_saved(run: subprocess.CompletedProcess, directory: Path, iteration: int) -> None:
    saved = f"successfully saved checkpoint from iteration {iteration:7d} to {directory} ["
    assert saved in run.stdout, run.stdout[-3000:]


def _assert_resumed(
    run: subprocess.CompletedProcess,
    directory: Path,
    iteration: int,
    matrices: int = DENSE_MATRICES,
) -> None:
    """Megatron says it loaded the checkpoint of ``iteration``; muon_ds ran the rest."""
    loaded = rf"successfully loaded checkpoint from {re.escape(str(directory))} \[.*\] at iteration"
    assert re.search(rf"{loaded} {iteration}\n", run.stdout), run.stdout[-3000:]
    assert sum(_ns_by_rank(run).values()) == matrices * (STEPS - iteration)


def _assert_continues(
    run: subprocess.CompletedProcess,
    uninterrupted: subprocess.CompletedProcess,
    iteration: int,
    rel_tol: float,
) -> None:
    """``run`` logs the uninterrupted run's losses for every iteration after ``iteration``.

    Megatron's first log of a run does not reset its loss accumulator (``training_log``'s
    ``should_reset``), so a run's second logged loss is the mean over its first two
    iterations: it is compared with the mean of the uninterrupted run's, allowing the 1e-6
    of rounding both to the 7 digits Megatron prints.
    """
    reference = _losses(uninterrupted)
    losses = _logged(_ITERATION, run)
    assert sorted(losses) == list(range(iteration + 1, STEPS + 1)), losses
    expected = {step: reference[step - 1] for step in losses}
    expected[iteration + 2] = (reference[iteration] + reference[iteration + 1]) / 2
    for step, loss in losses.items():
        rounding = 1e-6 if step == iteration + 2 else 0.0
        assert abs(loss - expected[step]) <= rel_tol * expected[step] + rounding, (
            step,
            loss,
            expected[step],
        )


def test_resume_through_megatron_checkpointing_continues_the_uninterrupted_run(
    dense_muon_ds, tmp_path: Path
) -> None:
    """Megatron's own ``save_checkpoint``/``load_checkpoint`` inside ``pretrain()``.

    The interrupted run is the fixture's command (the same ``--train-iters``, so the same
    LR schedule) with ``--save --save-interval --exit-interval`` at SAVED_AT, in Megatron's
    default format (dist-ckpt, distributed optimizer "dp_reshardable"). Megatron restores
    the iteration, the consumed samples (so the data: its sampler, not an RNG, picks the
    batches) and the LR schedule; muon_ds's momentum, AdamW moments and fp32 main params
    come back through the distributed optimizer's own checkpoint code.

    Same layout (TP=2 x DP=2, ``--load``): the same arithmetic, so exactly the losses and
    grad norms of the uninterrupted run, to every printed digit (measured: its iteration-10
    checkpoint's model, main params and optimizer tensors are bit-identical to the
    uninterrupted run's; with the momentum zeroed after loading, iteration 7's loss moves
    by 4.5e-3 and its grad norm from 0.854 to 0.741). That run also saves at RESHARDED_AT,
    "fully_reshardable", which a TP=2 x DP=1 run (world 2) then loads: a DP change only
    reorders sums (gradient reduction, the exchange's owners), so the first loss after
    loading within 1e-6 (only the loss's own sum is reordered) and the rest within 1e-4
    (measured: all equal to the printed digits; a bf16 param one ulp apart would show).
    """
    dense = {"TP": "2", "EP": "1"}
    interrupted_at = tmp_path / "dp_reshardable"
    interrupted = _launch(
        *("--save", str(interrupted_at), "--save-interval", str(SAVED_AT)),
        *("--exit-interval", str(SAVED_AT)),
        **dense,
    )
    _assert_saved(interrupted, interrupted_at, SAVED_AT)
    losses = _logged(_ITERATION, interrupted)
    assert [losses[step] for step in sorted(losses)] == _losses(dense_muon_ds)[:SAVED_AT]

    resharded_at = tmp_path / "fully_reshardable"
    resumed = _launch(
        *("--load", str(interrupted_at), "--save", str(resharded_at)),
        *("--save-interval", str(RESHARDED_AT), *FULLY_RESHARDABLE),
        **dense,
    )
    _assert_resumed(resumed, interrupted_at, SAVED_AT)
    _assert_continues(resumed, dense_muon_ds, SAVED_AT, rel_tol=0.0)
    norms, reference_norms = _logged(_GRAD_NORM, resumed), _logged(_GRAD_NORM, dense_muon_ds)
    assert norms == {step: reference_norms[step] for step in norms}, (norms, reference_norms)
    _assert_saved(resumed, resharded_at, RESHARDED_AT)

    resharded = _launch(
        *("--load", str(resharded_at), "--ckpt-step", str(RESHARDED_AT)), RANKS="2", **dense
    )
    _assert_resumed(resharded, resharded_at, RESHARDED_AT)
    _assert_continues(resharded, dense_muon_ds, RESHARDED_AT, rel_tol=1e-4)
    first = _logged(_ITERATION, resharded)[RESHARDED_AT + 1]
    assert math.isclose(first, _losses(dense_muon_ds)[RESHARDED_AT], rel_tol=1e-6), first


def test_interleaved_pp2_resume_through_megatron_checkpointing_continues_the_uninterrupted_run(
    pp2_muon_ds, tmp_path: Path
) -> None:
    """As the dense resume above, with two interleaved pipeline stages: each stage saves
    and loads its own chunks' optimizer state, and the routing record of both is one."""
    interrupted = _launch(
        *PIPELINE,
        *("--save", str(tmp_path), "--save-interval", str(SAVED_AT)),
        *("--exit-interval", str(SAVED_AT)),
        TP="1",
        EP="1",
    )
    _assert_saved(interrupted, tmp_path, SAVED_AT)
    resumed = _launch(*PIPELINE, "--load", str(tmp_path), TP="1", EP="1")
    _assert_resumed(resumed, tmp_path, SAVED_AT, PIPELINE_MATRICES)
    _assert_continues(resumed, pp2_muon_ds, SAVED_AT, rel_tol=0.0)
