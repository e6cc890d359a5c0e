"""The Triton Newton-Schulz kernel and the ``ns_backend`` dispatch, checked on the CPU.

How the kernel runs without a GPU: Triton chooses between compiling and interpreting a
kernel when it is decorated, i.e. when its module is imported (``@triton.jit`` reads
TRITON_INTERPRET at that moment; triton 3.8). Setting the variable inside the pytest
process would come too late if anything had imported the kernel module already, and would
leak into every later test. So one child process started with TRITON_INTERPRET=1 runs this
file as a script: it computes every kernel output the tests need and saves them; the tests
compare them with the float64 and torch references computed in the parent.

The interpreter is slow (about a second of CPU per 5-step Newton-Schulz on a 64 x 64
matrix), so the shapes are small; they still span several of the interpreter's 32-row
tiles, so the triangle, the mirror, the masks and the batch offsets are all exercised.

With ``MUON_DS_TEST_DEVICE=cuda`` (the GPU check) the same child runs the compiled
kernels on the GPU instead, and every test below checks the compiled code. Its
autotuned tiles are 64 or 128 wide, so there the small shapes fit one or two tiles;
the larger shapes of the GPU-only test at the end reach the triangle and the masks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from muon_ds import device, kernels
from muon_ds.config import MuonConfig, MuonConfigError
from muon_ds.kernels import orthogonalize
from muon_ds.math import newton_schulz
from muon_ds.math.gram_newton_schulz import gram_newton_schulz
from tests.conftest import TEST_DEVICE

SHAPES: dict[str, tuple[int, ...]] = {
    "square": (64, 64),
    "tall": (80, 40),  # transposed to 40 x 80 first, like the reference
    "wide": (48, 96),
    "odd": (37, 53),  # no side a tile multiple
    "batched": (2, 40, 56),  # one launch per kernel for both matrices
}
COEFFICIENTS = ("moonlight", "polar_express")
SMALL = (16, 24)  # one tile: cheap enough to run twice in the child
BF16_TRITON = MuonConfig(ns_backend="triton", ns_dtype="bfloat16")
"""The kernel forced to bf16, the dtype these tests pin ("auto" would follow the CPU)."""

GRAM_TRITON = MuonConfig(ns_backend="triton", ns_algorithm="gram", ns_dtype="bfloat16")
GRAM_SHAPES = ("tall", "wide", "batched")
"""Gram Newton-Schulz on the kernels: rectangular shapes, one transposed, one batched."""

MARGIN = 1.10
"""Allowed ratio of the kernel's error to the torch bf16 reference's (both against
float64). Measured ratio: 0.994 to 1.003, since both round each output element once
(the kernel's fp32 epilogues, the reference's baddbmm); the 10% is room for bf16 noise,
which five Newton-Schulz steps amplify (see ENVIRONMENT.md)."""


def _matrix(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The same fp32 test input (on the CPU) in the parent and in the child."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _relative_error(result: torch.Tensor, exact: torch.Tensor) -> float:
    return ((result.double() - exact).norm() / exact.norm()).item()


def _run_kernels(path: str) -> None:
    """Child process: every kernel output the tests use, saved to ``path`` (on the CPU).

    Interpreted (TRITON_INTERPRET=1) on CPU tensors, or compiled on ``TEST_DEVICE``
    when that is a GPU."""
    from muon_ds.kernels import triton_newton_schulz as tns

    interpreted = TEST_DEVICE.type != "cuda"
    assert interpreted == tns.INTERPRETED, "interpreted on the CPU, compiled on a GPU"
    outputs = _kernel_outputs(tns)
    torch.save({key: value.cpu() for key, value in outputs.items()}, path)


def _kernel_outputs(tns: ModuleType) -> dict[str, torch.Tensor]:
    def on_device(shape: tuple[int, ...]) -> torch.Tensor:
        return _matrix(shape).to(TEST_DEVICE)

    outputs = {}
    for name, shape in SHAPES.items():
        for coefficients in COEFFICIENTS:
            config = MuonConfig(
                ns_backend="triton", ns_coefficients=coefficients, ns_dtype="bfloat16"
            )
            outputs[f"{name}-{coefficients}"] = orthogonalize(on_device(shape), config)
    fp32 = MuonConfig(ns_backend="triton", ns_dtype="float32")
    outputs["float32"] = orthogonalize(on_device(SHAPES["odd"]), fp32)
    outputs["small-dispatched"] = orthogonalize(on_device(SMALL), BF16_TRITON)
    outputs["small-direct"] = tns.newton_schulz_triton(on_device(SMALL))
    for name in GRAM_SHAPES:
        outputs[f"gram-{name}"] = orthogonalize(on_device(SHAPES[name]), GRAM_TRITON)
    gram_fp32 = MuonConfig(ns_backend="triton", ns_algorithm="gram", ns_dtype="float32")
    outputs["gram-float32"] = orthogonalize(on_device(SHAPES["odd"]), gram_fp32)
    p, q = (t.to(TEST_DEVICE) for t in _symmetric_product_inputs())
    outputs["gram"] = tns.symmetric_product(p, torch.full_like(q, float("nan")))
    outputs["poly"] = tns.symmetric_product(
        q, torch.full_like(q, float("nan")), alpha=2.0, beta=-3.0, add=q
    )
    return outputs


def _symmetric_product_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A [2, 70, 45] stack (3 x 3 tiles of 32, the last ones partial: 6 programs per
    matrix) and a symmetric [2, 70, 70] stack, in fp32 so results compare tightly."""
    p = _matrix((2, 70, 45), seed=1)
    gram = p @ p.mT / 45
    return p, (gram + gram.mT) / 2  # a BLAS product need not be bitwise symmetric; this is


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    path = tmp_path_factory.mktemp("triton_ns") / "outputs.pt"
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    if TEST_DEVICE.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    child = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_triton_newton_schulz", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, f"kernel run failed:\n{child.stderr[-4000:]}"
    return torch.load(path)


@pytest.mark.parametrize("coefficients", COEFFICIENTS)
@pytest.mark.parametrize("name", SHAPES)
def test_kernel_error_vs_float64_is_no_worse_than_torch_bf16_reference(
    kernel_outputs: dict[str, torch.Tensor], name: str, coefficients: str
) -> None:
    matrix = _matrix(SHAPES[name])
    exact = newton_schulz(matrix, coefficients=coefficients, dtype=torch.float64)
    reference = newton_schulz(matrix, coefficients=coefficients)
    result = kernel_outputs[f"{name}-{coefficients}"]
    assert result.shape == matrix.shape
    assert result.dtype == torch.bfloat16
    kernel_error = _relative_error(result, exact)
    reference_error = _relative_error(reference, exact)
    assert kernel_error <= MARGIN * reference_error, (kernel_error, reference_error)


def test_kernel_in_float32_computes_the_same_iteration_as_the_reference(
    kernel_outputs: dict[str, torch.Tensor],
) -> None:
    """In fp32 rounding is far below the algorithm's scale: this catches a wrong
    coefficient, transpose or epilogue that the bf16 noise above could hide."""
    matrix = _matrix(SHAPES["odd"])
    reference = newton_schulz(matrix, dtype=torch.float32)
    assert _relative_error(kernel_outputs["float32"], reference.double()) < 1e-4


@pytest.mark.parametrize("name", GRAM_SHAPES)
def test_gram_kernels_error_vs_float64_is_no_worse_than_torch_gram(
    kernel_outputs: dict[str, torch.Tensor], name: str
) -> None:
    """Gram Newton-Schulz on the Triton kernels against its torch reference, same dtypes
    (bf16 wide products, the chain in ``gram_chain_dtype``: fp32 on a CPU, fp16 on CUDA)."""
    matrix = _matrix(SHAPES[name])
    exact = newton_schulz(matrix, dtype=torch.float64)
    on_device = matrix.to(TEST_DEVICE)
    chain = device.gram_chain_dtype(torch.bfloat16, on_device.device)
    reference = gram_newton_schulz(on_device, dtype=torch.bfloat16, chain_dtype=chain).cpu()
    result = kernel_outputs[f"gram-{name}"]
    assert result.shape == matrix.shape
    assert result.dtype == torch.bfloat16
    kernel_error = _relative_error(result, exact)
    reference_error = _relative_error(reference, exact)
    assert kernel_error <= MARGIN * reference_error, (kernel_error, reference_error)


def test_gram_kernels_in_float32_compute_the_same_iteration_as_the_reference(
    kernel_outputs: dict[str, torch.Tensor],
) -> None:
    matrix = _matrix(SHAPES["odd"])
    reference = newton_schulz(matrix, dtype=torch.float32)
    assert _relative_error(kernel_outputs["gram-float32"], reference.double()) < 1e-4


def test_symmetric_product_writes_the_mirrored_triangle(
    kernel_outputs: dict[str, torch.Tensor],
) -> None:
    """The output buffer starts as NaN: a tile left unwritten (the mirror) stays NaN."""
    p, _ = _symmetric_product_inputs()
    gram = kernel_outputs["gram"]
    torch.testing.assert_close(gram, p @ p.mT, rtol=1e-5, atol=1e-5)
    assert torch.equal(gram, gram.mT)


def test_symmetric_product_adds_the_scaled_term_in_its_epilogue(
    kernel_outputs: dict[str, torch.Tensor],
) -> None:
    """``B = c A A + b A`` in one kernel call, on a NaN-filled buffer, both triangles."""
    _, q = _symmetric_product_inputs()
    poly = kernel_outputs["poly"]
    torch.testing.assert_close(poly, 2.0 * (q @ q) - 3.0 * q, rtol=1e-5, atol=1e-5)
    assert torch.equal(poly, poly.mT)


def test_triton_backend_runs_the_kernel_under_the_interpreter(
    kernel_outputs: dict[str, torch.Tensor],
) -> None:
    dispatched = kernel_outputs["small-dispatched"]
    assert torch.equal(dispatched, kernel_outputs["small-direct"])
    assert not torch.equal(dispatched, newton_schulz(_matrix(SMALL)))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_and_auto_backends_on_cpu_run_the_reference(backend: str) -> None:
    matrix = _matrix((3, 24, 40))
    result = orthogonalize(matrix, MuonConfig(ns_backend=backend, ns_dtype="bfloat16"))
    assert torch.equal(result, newton_schulz(matrix))


def test_triton_backend_on_cpu_without_interpreter_raises_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from muon_ds.kernels import triton_newton_schulz

    monkeypatch.setattr(triton_newton_schulz, "INTERPRETED", False)
    with pytest.raises(
        RuntimeError, match=r"ns_backend='triton' needs a CUDA tensor, got one on cpu"
    ):
        orthogonalize(_matrix(SMALL), BF16_TRITON)


def test_triton_backend_without_triton_installed_raises_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs the triton package \(pip install"):
        orthogonalize(_matrix(SMALL), BF16_TRITON)
    auto = orthogonalize(_matrix(SMALL), MuonConfig(ns_backend="auto", ns_dtype="bfloat16"))
    assert torch.equal(auto, newton_schulz(_matrix(SMALL)))


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), ("kernel", torch.bfloat16)), ((7, 5), ("reference", torch.float32))],
    ids=["sm_90", "sm_75"],
)
def test_auto_takes_the_kernel_on_cuda_only_where_auto_resolves_to_bf16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: tuple
) -> None:
    """A GPU without bf16 tensor cores runs the torch reference in fp32 (the kernel has no
    fp32 tensor-core path); one with them the kernel in bf16. The GPU is faked: a stand-in
    batch on "cuda:0", the capability patched, both implementations recording their call."""
    from muon_ds.kernels import triton_newton_schulz

    calls = []
    monkeypatch.setattr(device, "_cuda_capability", lambda _: capability)
    monkeypatch.setattr(kernels, "_triton_installed", lambda: True)
    for module, name, label in [
        (triton_newton_schulz, "newton_schulz_triton", "kernel"),
        (kernels, "newton_schulz", "reference"),
    ]:
        monkeypatch.setattr(
            module, name, lambda batch, *, dtype, _l=label, **_: calls.append((_l, dtype))
        )
    batch = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), shape=(2, 8, 24))
    orthogonalize(batch, MuonConfig())  # type: ignore[arg-type]
    assert calls == [expected]


def test_ns_backend_error_names_key_value_and_allowed_values() -> None:
    with pytest.raises(MuonConfigError, match=r"ns_backend='cuda'.*\['auto', 'torch', 'triton'\]"):
        MuonConfig(ns_backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled kernel")
@pytest.mark.parametrize("shape", [(1024, 4096), (4096, 1024), (8, 352, 512), (1000, 1000)])
def test_compiled_kernel_on_gpu_is_no_worse_than_torch_bf16_reference(
    shape: tuple[int, ...],
) -> None:
    matrix = _matrix(shape).cuda()
    exact = newton_schulz(matrix, dtype=torch.float64)
    reference_error = _relative_error(newton_schulz(matrix), exact)
    result = orthogonalize(matrix, BF16_TRITON)
    assert _relative_error(result, exact) <= MARGIN * reference_error


if __name__ == "__main__":
    _run_kernels(sys.argv[1])
