"""``ns_dtype``'s resolution on a device (``muon_ds.device``), on faked device capabilities.

The real probes (CUDA compute capability, torch's CPU feature probes) are replaced, so
each test knows which hardware it describes whatever machine runs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from muon_ds import MuonConfig, device
from muon_ds.device import (
    bf16_matrix_units,
    choose_ns_dtype,
    describe_ns_dtype,
    resolve_ns_dtype,
)
from muon_ds.kernels import orthogonalize


@pytest.fixture
def cpu_probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """Torch's CPU probes answer from this dict; the cache is emptied around the test."""
    probes = {"amx": False, "avx512_bf16": False}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: probes["amx"])
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probes["avx512_bf16"])
    device._cpu_bf16_units.cache_clear()
    yield probes
    device._cpu_bf16_units.cache_clear()


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "units"),
    [
        (False, False, None),
        (False, True, "AVX-512 BF16"),
        (True, False, "AMX"),
        (True, True, "AMX"),
    ],
)
def test_cpu_auto_is_bf16_exactly_with_amx_or_avx512_bf16(
    cpu_probes: dict[str, bool], amx: bool, avx512_bf16: bool, units: str | None
) -> None:
    cpu_probes.update(amx=amx, avx512_bf16=avx512_bf16)
    assert bf16_matrix_units(torch.device("cpu")) == units
    expected = torch.bfloat16 if units else torch.float32
    assert resolve_ns_dtype("auto", "cpu") == expected


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 0), torch.float32),  # V100: no bf16 tensor cores
        ((7, 5), torch.float32),  # T4
        ((8, 0), torch.bfloat16),  # A100
        ((8, 9), torch.bfloat16),  # L4 / Ada
        ((9, 0), torch.bfloat16),  # H100 / H200
        ((10, 0), torch.bfloat16),  # B200
    ],
)
def test_cuda_auto_is_bf16_from_compute_capability_8_0(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: torch.dtype
) -> None:
    asked = []
    monkeypatch.setattr(device, "_cuda_capability", lambda d: asked.append(d) or capability)
    assert resolve_ns_dtype("auto", "cuda:1") == expected
    assert asked == [torch.device("cuda", 1)]  # the tensor's own device, not device 0


def test_other_device_types_resolve_auto_to_float32() -> None:
    for name in ("meta", "mps", "xpu"):
        assert resolve_ns_dtype("auto", name) == torch.float32
        assert describe_ns_dtype("auto", name) == (
            f"float32 (ns_dtype 'auto' on {name}: no bf16 matrix units found ('auto' takes "
            f"bf16 only on CUDA and CPUs, not {name}))"
        )


@pytest.mark.parametrize("units", [None, "AVX-512 BF16"])
def test_forced_dtypes_ignore_the_device(cpu_probes: dict[str, bool], units: str | None) -> None:
    cpu_probes.update(avx512_bf16=units is not None)
    assert resolve_ns_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_ns_dtype("float32", "cpu") == torch.float32
    assert choose_ns_dtype("bfloat16", None) == torch.bfloat16
    assert choose_ns_dtype("float32", units) == torch.float32
    assert describe_ns_dtype("float32", "cpu") == "float32 (forced by ns_dtype)"


def test_description_says_what_auto_became_and_why(cpu_probes: dict[str, bool]) -> None:
    assert describe_ns_dtype("auto", "cpu") == (
        "float32 (ns_dtype 'auto' on cpu: no bf16 matrix units found (neither AMX nor "
        "AVX-512 BF16 usable through torch's oneDNN))"
    )
    cpu_probes.update(avx512_bf16=True)
    device._cpu_bf16_units.cache_clear()
    assert describe_ns_dtype("auto", "cpu") == "bfloat16 (ns_dtype 'auto' on cpu: AVX-512 BF16)"


def test_an_unknown_name_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"ns_dtype='fp16' is not allowed: expected one of "
        r"\['auto', 'bfloat16', 'float32'\]",
    ):
        choose_ns_dtype("fp16", "AMX")


@pytest.mark.parametrize(
    ("avx512_bf16", "expected"), [(False, torch.float32), (True, torch.bfloat16)]
)
def test_orthogonalize_runs_newton_schulz_in_what_auto_resolves_to(
    cpu_probes: dict[str, bool], avx512_bf16: bool, expected: torch.dtype
) -> None:
    cpu_probes.update(avx512_bf16=avx512_bf16)
    assert MuonConfig().ns_dtype == "auto"
    out = orthogonalize(torch.randn(2, 8, 12), MuonConfig())
    assert out.dtype == expected
