"""Every runtime patch of ``muon_ds.patches.deepspeed`` refuses a DeepSpeed it was not
written for (a fake version) or one that lacks what it patches (a removed attribute),
before touching anything; and the diffs in ``patches/`` apply to DeepSpeed 0.19.8 and do
what ``patches/README.md`` says."""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import muon_ds.deepspeed  # installs the patches the tests below look at
from muon_ds.patches import PatchError
from muon_ds.patches import deepspeed as patches
from muon_ds.patches import deepspeed_zero as zero

PATCHES = Path(__file__).resolve().parents[2] / "patches"


def _engine_stub() -> Any:
    """What ``zero_settings`` reads of an engine, as DeepSpeed 0.19.8 has it by default."""
    zero_config = SimpleNamespace(
        round_robin_gradients=False,
        zero_quantized_weights=False,
        zero_quantized_gradients=False,
        zenflow=None,
    )
    config = SimpleNamespace(
        zero_config=zero_config, expert_parallel_config=SimpleNamespace(enabled=False)
    )
    return SimpleNamespace(
        zero_optimization_stage=lambda: 1,
        zero_offload_optimizer=lambda: None,
        zero_offload_param=lambda: SimpleNamespace(device="none"),
        zero_hpz_partition_size=lambda: 1,
        autotp_size=lambda: 0,
        _config=config,
    )


def _zero3_param() -> torch.Tensor:
    """A ZeRO-3 parameter of 10 elements, 5 per rank, in sub-group 1 at offset 3."""
    param = torch.nn.Parameter(torch.empty(0))
    stage3 = SimpleNamespace(
        get_param_id=lambda p: 7,
        grad_position={7: [1, 3, 5]},
        sub_group_process_groups=[None, None],
        fp32_partitioned_groups_flat=[torch.zeros(1), torch.zeros(8)],
        optimizer=None,
    )
    param.ds_id = 7  # type: ignore[attr-defined]
    param.ds_shape = (2, 5)  # type: ignore[attr-defined]
    param.ds_numel = 10  # type: ignore[attr-defined]
    param.partition_numel = lambda: 5  # type: ignore[attr-defined]
    param._z3_optimizer = stage3  # type: ignore[attr-defined]
    return param


def _zero_stub() -> Any:
    class ZeroStub:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict_list: Any, checkpoint_folder: Any = None) -> None:
            pass

    return ZeroStub()


def _mapped_param() -> torch.Tensor:
    param = torch.nn.Parameter(torch.zeros(4, 4))
    address = SimpleNamespace(start=0, numel=16)
    param._hp_mapping = SimpleNamespace(  # type: ignore[attr-defined]
        lp_fragment_address=address, hp_fragment_address=address, use_offload=False
    )
    return param


VERSIONED: dict[str, Callable[[], Any]] = {
    "allow_under_zero": lambda: patches.allow_under_zero(torch.optim.AdamW),
    "build_from_config": lambda: patches.build_from_config("MuonDS", lambda *a: None),
    "adopt_client_optimizers": lambda: patches.adopt_client_optimizers(
        lambda *a: None, lambda *a: None
    ),
    "record_in_zero_checkpoints": lambda: patches.record_in_zero_checkpoints(
        _zero_stub(), "key", dict, lambda saved: None
    ),
    "zero_settings": lambda: zero.zero_settings(_engine_stub()),
    "zero3_partition": lambda: zero.zero3_partition(_zero3_param()),
    "restore_groups_on_zero3_universal_load": lambda: (
        patches.restore_groups_on_zero3_universal_load(
            SimpleNamespace(
                optimizer=torch.optim.SGD([torch.zeros(1)]),
                load_hp_checkpoint_state_from_checkpoint_dir_stage3=lambda d: None,
            )
        )
    ),
    "link_optimizer_state": lambda: zero.link_optimizer_state([], torch.zeros(1), {}),
    "skip_shm_op_build": patches.skip_shm_op_build,
}


@pytest.mark.parametrize("patch", sorted(VERSIONED))
def test_each_patch_refuses_a_deepspeed_outside_its_range(
    monkeypatch: pytest.MonkeyPatch, patch: str
) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "0.20.1" if name == "deepspeed" else real(name),
    )
    with pytest.raises(
        PatchError,
        match=rf"muon_ds\.patches\.deepspeed(_zero)?\.{patch} was written for deepspeed "
        r">= 0\.19\.8, < 0\.20\.0; found 0\.20\.1",
    ):
        VERSIONED[patch]()


def test_the_range_covers_the_installed_deepspeed() -> None:
    """The pinned DeepSpeed passes every guard (else the suite above proves nothing)."""
    for patch in VERSIONED:
        patches.check_version(patch)


def _without(monkeypatch: pytest.MonkeyPatch, module: str, attribute: str) -> None:
    monkeypatch.delattr(importlib.import_module(module), attribute)


MISSING: dict[str, tuple[Callable[[pytest.MonkeyPatch], Any], str]] = {
    "allow_under_zero": (
        lambda mp: _without(mp, "deepspeed.runtime.zero.utils", "ZERO_SUPPORTED_OPTIMIZERS"),
        "deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS",
    ),
    "build_from_config": (
        lambda mp: mp.delattr(
            importlib.import_module("deepspeed.runtime.engine").DeepSpeedEngine,
            "_configure_basic_optimizer",
        ),
        "DeepSpeedEngine._configure_basic_optimizer",
    ),
    "adopt_client_optimizers": (
        lambda mp: mp.delattr(
            importlib.import_module("deepspeed.runtime.engine").DeepSpeedEngine,
            "_configure_optimizer",
        ),
        "DeepSpeedEngine._configure_optimizer",
    ),
    "link_optimizer_state": (
        lambda mp: _without(
            mp,
            "deepspeed.utils.mixed_precision_linkage",
            "lazy_init_hp_params_optimizer_state",
        ),
        "deepspeed.utils.mixed_precision_linkage.lazy_init_hp_params_optimizer_state",
    ),
    "skip_shm_op_build": (
        lambda mp: _without(mp, "deepspeed.comm.torch", "build_shm_op"),
        "deepspeed.comm.torch.build_shm_op",
    ),
}


@pytest.mark.parametrize("patch", sorted(MISSING))
def test_each_patch_refuses_a_deepspeed_without_what_it_patches(
    monkeypatch: pytest.MonkeyPatch, patch: str
) -> None:
    remove, where = MISSING[patch]
    remove(monkeypatch)
    with pytest.raises(
        PatchError,
        match=rf"muon_ds\.patches\.deepspeed(_zero)?\.{patch} patches {where}, which this version "
        "does not have",
    ):
        VERSIONED[patch]()


def test_engine_reads_refuse_an_engine_without_the_zero_config() -> None:
    engine = _engine_stub()
    del engine._config.zero_config.round_robin_gradients
    with pytest.raises(PatchError, match=r"patches SimpleNamespace\.round_robin_gradients"):
        zero.zero_settings(engine)


def test_engine_reads_see_each_stage3_setting_muon_ds_refuses() -> None:
    engine = _engine_stub()
    assert zero.zero_settings(engine) == zero.ZeroSettings(1, False, False)
    engine.zero_offload_param = lambda: SimpleNamespace(device="cpu")
    engine.zero_hpz_partition_size = lambda: 2
    engine.autotp_size = lambda: 2
    engine._config.zero_config.zero_quantized_gradients = True
    engine._config.zero_config.zenflow = SimpleNamespace()
    engine._config.expert_parallel_config.enabled = True
    assert zero.zero_settings(engine) == zero.ZeroSettings(
        1, False, False, True, True, True, True, True, True
    )


def test_zero3_partition_reads_where_this_rank_holds_a_parameter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank r holds [5 r, 5 r + 5) of 10 elements; a third rank would hold padding only."""
    param = _zero3_param()
    for rank, (start, numel) in enumerate([(0, 5), (5, 5), (10, 0)]):
        monkeypatch.setattr(zero.dist, "get_rank", lambda group=None, rank=rank: rank)
        partition = zero.zero3_partition(param)
        assert (partition.sub_group, partition.offset) == (1, 3)
        assert (partition.param_start, partition.numel) == (start, numel)
        assert partition.buffer is param._z3_optimizer.fp32_partitioned_groups_flat[1]
    assert zero.full_shape(param) == (2, 5)


def test_group_read_refuses_a_partitioned_parameter_without_its_group() -> None:
    param = _mapped_param()
    with pytest.raises(PatchError, match=r"data_parallel_group patches Parameter\._dp_group"):
        zero.data_parallel_group(param)
    param._dp_group = "group"  # type: ignore[attr-defined]
    assert zero.data_parallel_group(param) == "group"


def test_partition_reads_refuse_a_mapping_of_another_shape() -> None:
    param = _mapped_param()
    assert zero.partition_fragment(param) == zero.Fragment(0, 0, 16, False)
    del param._hp_mapping.hp_fragment_address  # type: ignore[attr-defined]
    with pytest.raises(PatchError, match=r"patches SimpleNamespace\.hp_fragment_address"):
        zero.partition_fragment(param)


def test_checkpoint_record_refuses_a_load_state_dict_of_another_signature() -> None:
    class OtherZero:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: Any) -> None:
            pass

    with pytest.raises(
        PatchError,
        match=r"expects OtherZero\.load_state_dict to take \['state_dict_list', "
        r"'checkpoint_folder'\]; this DeepSpeed's takes \['state_dict'\]",
    ):
        patches.record_in_zero_checkpoints(OtherZero(), "key", dict, lambda saved: None)


class Bf16Like:
    """``BF16_Optimizer``'s argument order: the checkpoint folder second."""

    def __init__(self) -> None:
        self.loaded: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"base": 1}

    def load_state_dict(
        self,
        state_dict_list: Any,
        checkpoint_folder: Any = None,
        load_optimizer_states: bool = True,
    ) -> None:
        self.loaded.append((state_dict_list, checkpoint_folder, load_optimizer_states))


def test_checkpoint_record_is_saved_and_checked_before_loading(tmp_path: Path) -> None:
    """Rigid (other ranks' entries None), universal (``zero/optimizer_state.pt``), none."""
    zero = Bf16Like()
    checked: list[Any] = []
    patches.record_in_zero_checkpoints(zero, "rec", lambda: {"a": "muon"}, checked.append)
    saved = zero.state_dict()
    assert saved == {"base": 1, "rec": {"a": "muon"}}
    zero.load_state_dict([None, saved])
    (tmp_path / "zero").mkdir()
    torch.save({"rec": {"b": "adamw"}}, tmp_path / "zero" / "optimizer_state.pt")
    zero.load_state_dict(None, str(tmp_path), False)  # positional, in BF16_Optimizer's order
    zero.load_state_dict([{"base": 1}])
    assert checked == [{"a": "muon"}, {"b": "adamw"}, None]
    assert zero.loaded[1] == (None, str(tmp_path), False)


def test_a_failing_check_stops_the_load() -> None:
    zero = Bf16Like()

    def refuse(saved: Any) -> None:
        raise ValueError(f"refused {saved}")

    patches.record_in_zero_checkpoints(zero, "rec", dict, refuse)
    with pytest.raises(ValueError, match="refused None"):
        zero.load_state_dict([{}])
    assert zero.loaded == []


def test_a_type_name_deepspeed_lower_cases_to_its_own_is_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer type 'MUON' lower-cases to DeepSpeed's own"):
        patches.build_from_config("MUON", lambda *a: None)


def test_the_engine_hooks_are_installed_once() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    hooked = DeepSpeedEngine._configure_basic_optimizer
    muon_ds.deepspeed.register()
    assert DeepSpeedEngine._configure_basic_optimizer is hooked
    original = hooked.__muon_ds_original__
    assert getattr(original, "__muon_ds_original__", None) is None


DIFFS = ("deepspeed-config-optimizer-gets-model.diff", "deepspeed-optimizer-entry-points.diff")
"""The diffs for DeepSpeed in ``patches/``, in the order they apply (the second on the first)."""

ENTRY_POINT = "MuonDS = muon_ds.deepspeed:OrthogonalizedZeroOptimizer"


def test_every_deepspeed_diff_is_listed() -> None:
    assert sorted(p.name for p in PATCHES.glob("deepspeed-*.diff")) == sorted(DIFFS)


def test_pyproject_declares_the_entry_point_the_diff_looks_up() -> None:
    import tomllib

    with open(PATCHES.parent / "pyproject.toml", "rb") as project:
        declared = tomllib.load(project)["project"]["entry-points"]["deepspeed.optimizers"]
    name, target = (part.strip() for part in ENTRY_POINT.split("="))
    assert declared == {name: target}
    module, attribute = target.split(":")
    assert (
        getattr(importlib.import_module(module), attribute)
        is muon_ds.deepspeed.OrthogonalizedZeroOptimizer
    )


def _run_plugin_job(site: Path) -> dict[str, Any]:
    """``deepspeed_plugin_job`` in a fresh process with ``site`` first on the path."""
    import json
    import os
    import sys

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    job = subprocess.run(
        [sys.executable, "-m", "tests.integration.deepspeed_plugin_job"],
        cwd=PATCHES.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    return json.loads(job.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the installed DeepSpeed 0.19.8 with both diffs applied, beside a
    distribution that declares ``ENTRY_POINT`` (what muon_ds's pyproject declares)."""
    import deepspeed

    assert importlib.metadata.version("deepspeed") == "0.19.8"
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(
        Path(deepspeed.__file__).parent,
        site / "deepspeed",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for diff in DIFFS:
        applied = subprocess.run(
            ["git", "apply", "-p1", str(PATCHES / diff)],
            cwd=site,
            capture_output=True,
            text=True,
            check=False,
        )
        assert applied.returncode == 0, f"{diff}: {applied.stderr}"
    info = site / "muon_ds_entry_point-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: muon_ds_entry_point\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[deepspeed.optimizers]\n{ENTRY_POINT}\n")
    return site


def test_with_the_diffs_muonds_needs_no_import_and_deepspeed_passes_the_model(
    patched_site: Path,
) -> None:
    outcome = _run_plugin_job(patched_site)
    assert outcome["deepspeed"].startswith(str(patched_site)), outcome
    assert outcome.get("optimizer") == "OrthogonalizedZeroOptimizer", outcome
    assert outcome["adamw_matrices"] == ["embed.weight", "lm_head.weight"]
    assert outcome["deepspeed_builds_with_model"] == ["embed.weight", "lm_head.weight"]


def test_without_the_diffs_deepspeed_names_only_the_type(tmp_path: Path) -> None:
    """Stock 0.19.8 with the same entry point installed: why patches/README.md says the
    import is needed (DeepSpeed's error does not mention muon_ds)."""
    info = tmp_path / "muon_ds_entry_point-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: muon_ds_entry_point\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[deepspeed.optimizers]\n{ENTRY_POINT}\n")
    outcome = _run_plugin_job(tmp_path)
    assert outcome.get("error") == "MuonDS is not a supported DeepSpeed Optimizer", outcome
