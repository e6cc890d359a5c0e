"""The dtype Newton-Schulz runs in on a device: the one home of ``ns_dtype="auto"``'s rule.

bf16 is Newton-Schulz's fast path only where the hardware multiplies bf16 natively: on
a CPU without bf16 matrix units torch converts every element, and a bf16 Newton-Schulz
measured about 15x slower than fp32 (issue 17: AMD EPYC without AVX-512, one thread),
while on a CPU with AVX-512 BF16 (AMD EPYC Zen 4) it ran about 2x faster than fp32, and
GPUs from Ampere on (compute capability 8.0+) have bf16 tensor cores. So ``"auto"``
resolves to bf16 exactly where such units are detected (a CUDA device of capability 8.0
or more; a CPU with AMX or AVX-512 BF16, as torch's own CPU probes report them) and to
fp32 everywhere else (older GPUs, other CPUs, other device types); ``"bfloat16"`` and
``"float32"`` force one. Everything that needs the dtype (the Newton-Schulz call, the
exchange's wire, the planner's byte counts, benchmarks, start-up lines) asks here.
"""

from __future__ import annotations

import functools

import torch

NS_DTYPE_BY_NAME: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
"""The dtypes ``ns_dtype`` can force, by their ``MuonConfig`` name."""

MIN_CUDA_CAPABILITY = (8, 0)
"""Ampere: the first CUDA compute capability with bf16 tensor cores."""


def choose_ns_dtype(ns_dtype: str, bf16_units: str | None) -> torch.dtype:
    """The rule itself: a forced name is kept, ``"auto"`` is bf16 iff bf16 units exist.

    ``bf16_units`` names what multiplies bf16 natively (see ``bf16_matrix_units``), or is
    None. Pure, so a model of hardware that is not here (the scale model's GPUs) uses the
    same rule as a run on a real device.
    """
    if ns_dtype == "auto":
        return torch.bfloat16 if bf16_units else torch.float32
    try:
        return NS_DTYPE_BY_NAME[ns_dtype]
    except KeyError:
        allowed = ["auto", *NS_DTYPE_BY_NAME]
        raise ValueError(
            f"ns_dtype={ns_dtype!r} is not allowed: expected one of {allowed}"
        ) from None


def resolve_ns_dtype(ns_dtype: str, device: torch.device | str) -> torch.dtype:
    """The Newton-Schulz (and wire) dtype ``ns_dtype`` means on ``device``."""
    if ns_dtype != "auto":
        return choose_ns_dtype(ns_dtype, None)
    return choose_ns_dtype(ns_dtype, bf16_matrix_units(torch.device(device)))


def gram_chain_dtype(ns_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype of Gram Newton-Schulz's small ``m x m`` chain for an iteration in ``ns_dtype``.

    A bf16 iteration keeps its chain in fp16 on CUDA (tensor cores multiply both at one
    rate; fp16's three extra mantissa bits keep the carried Gram matrix at or below the
    standard iteration's error) and in fp32 elsewhere (this project's CPU multiplies fp16
    28x slower than bf16, fp32 3x). Any other dtype is its own chain dtype.
    """
    if ns_dtype != torch.bfloat16:
        return ns_dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def describe_ns_dtype(ns_dtype: str, device: torch.device | str) -> str:
    """One line for start-up logs: the resolved dtype and why, e.g. ``bfloat16 (ns_dtype
    'auto' on cpu: AVX-512 BF16)``."""
    device = torch.device(device)
    name = str(resolve_ns_dtype(ns_dtype, device)).removeprefix("torch.")
    if ns_dtype != "auto":
        return f"{name} (forced by ns_dtype)"
    units = bf16_matrix_units(device)
    why = units or f"no bf16 matrix units found ({_wanted(device)})"
    return f"{name} (ns_dtype 'auto' on {device.type}: {why})"


def bf16_matrix_units(device: torch.device) -> str | None:
    """What multiplies bf16 natively on ``device`` (e.g. ``"sm_90"``, ``"AVX-512 BF16"``),
    or None: a CUDA device of capability 8.0+, a CPU with AMX or AVX-512 BF16."""
    if device.type == "cuda":
        major, minor = _cuda_capability(device)
        return f"sm_{major}{minor}" if (major, minor) >= MIN_CUDA_CAPABILITY else None
    if device.type == "cpu":
        return _cpu_bf16_units()
    return None


def _wanted(device: torch.device) -> str:
    """What ``bf16_matrix_units`` looks for on a device of this type, for messages."""
    if device.type == "cuda":
        major, minor = _cuda_capability(device)
        return f"compute capability {major}.{minor} < 8.0"
    if device.type == "cpu":
        return "neither AMX nor AVX-512 BF16 usable through torch's oneDNN"
    return f"'auto' takes bf16 only on CUDA and CPUs, not {device.type}"


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (a separate function so tests can fake it)."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def _cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units as torch's own probes (cpuinfo) see them, or None.

    torch multiplies bf16 on a CPU through oneDNN only; where its oneDNN bf16 path is
    off (a build without it, or an ISA capped by ``ONEDNN_MAX_CPU_ISA`` /
    ``ATEN_CPU_CAPABILITY``: measured 35x slower than fp32 on an AVX-512 BF16 CPU capped
    to AVX2) the units are of no use, so none are reported. Cached: the CPU does not
    change under a running process, and the answer is asked at every Newton-Schulz call.
    """
    if not _onednn_bf16():
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX-512 BF16"
    return None


def _onednn_bf16() -> bool:
    """Whether torch routes CPU bf16 matmuls to oneDNN (its own check, ISA caps included)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


__all__ = [
    "MIN_CUDA_CAPABILITY",
    "NS_DTYPE_BY_NAME",
    "bf16_matrix_units",
    "choose_ns_dtype",
    "describe_ns_dtype",
    "resolve_ns_dtype",
]
