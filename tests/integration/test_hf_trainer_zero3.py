"""Hugging Face ``Trainer`` + DeepSpeed ZeRO-3 + MuonDS on 2 CPU ranks through torchrun.

One launch of ``tests.integration.hf_trainer_zero3_job``: the model comes from
``from_pretrained`` inside HF's ``zero.Init`` (the way fine-tuning tools load one, and
where users report Muon failing or silently doing nothing), trained with
``launch/configs/hf_trainer_zero3.json`` (the README's config), against the same run on
ZeRO-1, resumed from a checkpoint, and with part of the model frozen. Tolerance against
ZeRO-1: as in ``test_deepspeed_zero3``: fp32 Newton-Schulz, only the reduction order
differs (2e-5 on updates of ~1e-2).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_hf_trainer import launch

TOL = 2e-5
PARAMS = 21  # embeddings, head, final norm; per layer 7 projections and 2 norms


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str]:
    """Every rank's results and the launch's combined output."""
    return launch("tests.integration.hf_trainer_zero3_job", tmp_path_factory.mktemp("zero3"))


def test_from_pretrained_builds_the_model_partitioned_under_zero_init(runs) -> None:
    """Every param had an empty local shape when MuonDS saw it: routing had only
    ``ds_shape`` to go on."""
    results, _ = runs
    for result in results:
        assert result["zero3"]["stage"] == 3
        assert result["zero3"]["built"] == {
            "params": PARAMS,
            "partitioned": PARAMS,
            "empty_shape": PARAMS,
        }


def test_zero3_routes_every_param_as_zero1_does(runs) -> None:
    """Embeddings, head and norms on AdamW, the 14 projections on Muon, with the same weight
    decay, though ``param.shape`` was empty under ``zero.Init``."""
    results, output = runs
    for result in results:
        assert result["zero3"]["routes"] == result["zero1"]["routes"]
        routes = {name: route for name, route, _ in result["zero3"]["routes"]}
        assert sorted(n for n, r in routes.items() if r == "muon") == sorted(
            n for n in routes if n.endswith("_proj.weight")
        )
        assert len(routes) == PARAMS
    # The three runs (ZeRO-1, ZeRO-3, resumed) each print the same report once.
    assert output.count("muon_ds routing: Muon 14 tensors (18,432 elements), AdamW 7") == 3


def test_zero3_trains_like_zero1(runs) -> None:
    results, _ = runs
    for result in results:
        assert result["zero3"]["moved"] > 1e-3  # training changed the parameters
        assert result["zero3"]["max_difference_to_zero1"] <= TOL


def test_zero3_resume_from_checkpoint_equals_the_uninterrupted_run(runs) -> None:
    results, _ = runs
    for result in results:
        assert result["resume"]["max_difference"] == 0.0


def test_frozen_params_stay_put_and_only_trainable_ones_are_routed(runs) -> None:
    """Partial fine-tuning (embeddings and layer 0 frozen): the frozen params end bitwise
    where they started, the 11 trainable ones are routed as before (layer 1's 7
    projections on Muon) and ZeRO-3 trains like ZeRO-1."""
    results, _ = runs
    for result in results:
        frozen = result["frozen"]
        trainable = [
            route
            for route in result["zero1"]["routes"]
            if not route[0].startswith(("model.embed_tokens.", "model.layers.0."))
        ]
        for stage in ("zero1", "zero3"):
            assert frozen[stage]["frozen_moved"] == 0.0
            assert frozen[stage]["moved"] > 1e-3
            assert frozen[stage]["routes"] == trainable
        assert len(trainable) == 11
        assert sum(route == "muon" for _, route, _ in trainable) == 7
        assert frozen["max_difference_zero3_to_zero1"] <= TOL
