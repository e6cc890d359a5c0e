"""``python -m muon_ds.megatron.run``: an entry script that knows nothing of muon_ds.

``megatron_entry/pretrain_gpt_plain.py`` is written the way Megatron-LM's
``pretrain_gpt.py`` is (model provider, datasets provider on Megatron's mock data,
forward step, ``parse_and_validate_args`` then ``pretrain``). The runner adds muon_ds's
flags and optimizer; one run at TP=2 x DP=2 on 4 CPU gloo ranks (``--cpu``) shows that
muon_ds, not Megatron's Muon, trained: its effective-config line with Moonlight's
defaults (no ``--muon-*`` flag is passed), every logical matrix orthogonalised once per
step over the world, and a falling loss.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from muon_ds import MuonConfig
from muon_ds.megatron.run import run_script
from muon_ds.testing.ports import free_port
from tests.integration.test_megatron_launch import _ITERATION, _NS, DENSE_MATRICES

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "megatron_entry" / "pretrain_gpt_plain.py"
RANKS, STEPS = 4, 10
FLAGS = [
    # The launcher's model (test_megatron_launch's DENSE_MATRICES), on Megatron's mock data.
    *("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128"),
    *("--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2"),
    *("--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear"),
    *("--position-embedding-type", "rope", "--seq-length", "64"),
    *("--max-position-embeddings", "64", "--mock-data", "--vocab-size", "256"),
    # Megatron's fused kernels are CUDA kernels.
    *("--distributed-backend", "gloo", "--transformer-impl", "local"),
    *("--use-cpu-initialization", "--no-rope-fusion", "--no-masked-softmax-fusion"),
    *("--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"),
    *("--no-gradient-accumulation-fusion", "--no-persist-layer-norm"),
    *("--tensor-model-parallel-size", "2", "--micro-batch-size", "4"),
    *("--global-batch-size", "16", "--train-iters", str(STEPS), "--bf16"),
    *("--hidden-dropout", "0", "--attention-dropout", "0", "--clip-grad", "1.0"),
    *("--seed", "1234", "--eval-interval", str(STEPS), "--eval-iters", "1"),
    *("--log-interval", "1"),
    *("--optimizer", "muon", "--use-distributed-optimizer", "--lr", "2e-2"),
    *("--min-lr", "2e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2"),
    *("--weight-decay", "0.1"),
]


def test_entry_script_imports_nothing_of_muon_ds() -> None:
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert "megatron.training" in imported
    assert not [name for name in imported if name.split(".")[0] in ("muon_ds", "tests")]


def test_runner_trains_an_unmodified_entry_script_with_muon_ds_at_tp2_dp2() -> None:
    run = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS)),
            *("--master-port", str(free_port()), "-m", "muon_ds.megatron.run", "--cpu"),
            *(SCRIPT.name, *FLAGS),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        cwd=SCRIPT.parent,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    effective = [line for line in run.stdout.splitlines() if "muon_ds: effective" in line]
    assert effective == [f"muon_ds: effective {MuonConfig(lr=2e-2, weight_decay=0.1)}"]
    by_rank = {int(rank): int(n) for rank, n in _NS.findall(run.stdout)}
    assert sorted(by_rank) == list(range(RANKS)), by_rank
    assert sum(by_rank.values()) == DENSE_MATRICES * STEPS, by_rank
    losses = {int(step): float(loss) for step, loss in _ITERATION.findall(run.stdout)}
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    assert sum(losses[step] for step in range(STEPS - 2, STEPS + 1)) / 3 < 0.75 * losses[1]


def test_runner_refuses_an_entry_script_outside_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("raise SystemExit('the script must not run')\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_script sets the script's
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="must lie in the current directory"):
        run_script(script, [])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="the script must not run"):
        run_script(Path(script.name), [])
