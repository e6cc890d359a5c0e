"""Shared fixtures. ``MUON_DS_TEST_DEVICE`` (default ``cpu``) moves the tests that take
the ``device`` fixture onto another device: the GPU check (``benchmarks/gpu_check``) runs
the Newton-Schulz and kernel tests with ``MUON_DS_TEST_DEVICE=cuda``."""

from __future__ import annotations

import os

import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("MUON_DS_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    """The device the device-parametrised tests compute on; CPU unless the run says so."""
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("MUON_DS_TEST_DEVICE=cuda but torch sees no CUDA device")
    return TEST_DEVICE
