"""One process, world 1: ``"type": "MuonDS"`` through ``deepspeed.initialize`` *without*
``import muon_ds.deepspeed``, against whatever ``deepspeed`` is first on the path.

Run by tests/integration/test_deepspeed_patches.py as ``python -m`` with a patched copy of
DeepSpeed (the diffs in ``patches/``) and an entry point declaring MuonDS on
``PYTHONPATH``, and with the stock one. Prints one JSON line: what happened.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from muon_ds.testing.ports import free_port
from tests.integration.deepspeed_harness import TinyLM, batch, ds_config


def main() -> dict[str, Any]:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    import deepspeed

    from muon_ds.patches.deepspeed import skip_shm_op_build

    skip_shm_op_build()
    deepspeed.init_distributed(dist_backend="gloo")
    result: dict[str, Any] = {"deepspeed": deepspeed.__file__}
    torch.manual_seed(0)
    model = TinyLM()
    config = ds_config({"type": "MuonDS", "params": {"lr": 0.02}})
    try:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
    except AssertionError as error:
        return {**result, "error": str(error)}
    engine.backward(engine(batch(0, 0, 0)))
    engine.step()
    from muon_ds import routing_report

    report = routing_report(engine)
    result["optimizer"] = type(engine.basic_optimizer).__name__
    result["adamw_matrices"] = [t.name for t in report.matrices_on_adamw()]
    result["deepspeed_builds_with_model"] = _stock_builder_passes_the_model(engine)
    return result


def _stock_builder_passes_the_model(engine: Any) -> list[str]:
    """DeepSpeed's own ``_configure_basic_optimizer`` (under muon_ds's hook), called on
    this engine: with the first diff it builds MuonDS with the model, so it routes by
    module type. Returns the matrices that optimizer keeps on AdamW."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from muon_ds import routing_report

    stock = DeepSpeedEngine._configure_basic_optimizer.__muon_ds_original__
    optimizer = stock(engine, list(engine.module.parameters()))
    return [t.name for t in routing_report(optimizer).matrices_on_adamw()]


if __name__ == "__main__":
    outcome = main()
    print(json.dumps(outcome))
    sys.stdout.flush()
