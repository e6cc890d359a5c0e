"""Hugging Face ``Trainer`` + DeepSpeed ZeRO-1 + MuonDS on 2 CPU ranks through torchrun.

One launch of ``tests.integration.hf_trainer_job`` (a tiny Llama built in code) covers
the JSON route with HF's unchanged "auto" template (``launch/configs/hf_trainer_zero1.json``,
the README's config), ``resume_from_checkpoint``, and the ``optimizer_cls_and_kwargs``
route with and without ``model``. Results are compared per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RANKS = 2


def launch(job: str, out: Path) -> tuple[list[dict[str, Any]], str]:
    """``torchrun`` the job module ``job`` on ``RANKS`` CPU ranks writing into ``out``:
    every rank's results and the launch's combined output."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={RANKS}",
            "-m",
            job,
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return results, completed.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str]:
    return launch("tests.integration.hf_trainer_job", tmp_path_factory.mktemp("hf_trainer"))


def test_hf_auto_template_fills_lr_betas_eps_and_weight_decay(runs) -> None:
    """ "auto" is filled from TrainingArguments (adam_beta2=0.98, not HF's default)."""
    results, _ = runs
    for result in results:
        json_route = result["json"]
        assert (json_route["lr"], json_route["weight_decay"]) == (0.02, 0.1)
        assert (json_route["betas"], json_route["eps"]) == ([0.9, 0.98], 1e-8)


def test_json_route_keeps_embeddings_head_and_vectors_on_adamw(runs) -> None:
    results, _ = runs
    routes = {name: route for name, route, _ in results[0]["json"]["routes"]}
    assert routes["model.embed_tokens.weight"] == routes["lm_head.weight"] == "adamw"
    assert routes["model.norm.weight"] == "adamw"
    projections = [n for n in routes if n.endswith("_proj.weight")]
    assert len(projections) == 14  # q, k, v, o, gate, up, down in 2 layers
    assert all(routes[n] == "muon" for n in projections)
    assert sorted(n for n, r in routes.items() if r == "muon") == sorted(projections)


def test_routing_report_is_printed_once_per_run_on_rank_0(runs) -> None:
    """Three runs train (JSON, resumed, client); two ranks; the report comes from rank 0."""
    _, output = runs
    assert (
        output.count(
            "muon_ds routing: Muon 14 tensors (18,432 elements), AdamW 7 tensors (4,256 elements)"
        )
        == 3
    )
    assert (
        output.count(
            "muon_ds routing: tensors of ndim >= 2 on AdamW (2): model.embed_tokens.weight "
            "[64, 32], lm_head.weight [64, 32]"
        )
        == 3
    )


def test_resume_from_checkpoint_equals_the_uninterrupted_run(runs) -> None:
    results, _ = runs
    for result in results:
        assert result["json"]["moved"] > 1e-3  # training changed the parameters
        assert result["resume"]["max_difference"] == 0.0


def test_optimizer_cls_and_kwargs_with_model_routes_and_trains_like_the_json_route(runs) -> None:
    results, _ = runs
    for result in results:
        assert result["client"]["routes"] == result["json"]["routes"]
        assert result["client"]["max_difference_to_json"] == 0.0


def test_optimizer_cls_and_kwargs_without_model_is_refused_naming_both_ways(runs) -> None:
    results, _ = runs
    for result in results:
        message = result["client_without_model"]
        assert message.startswith("MuonDS needs every parameter's name"), message
        assert "21 of 21 parameters have none" in message
        assert (
            'optimizer_cls_and_kwargs=(OrthogonalizedZeroOptimizer, {"model": model, ...})'
            in message
        )
        assert "OrthogonalizedZeroOptimizer(model.named_parameters(), ...)" in message
