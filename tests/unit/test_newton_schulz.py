"""Newton-Schulz reference (muon_ds.math.newton_schulz): spectrum, shapes, zeros, flops.

An odd polynomial iteration ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` acts on the
singular values of ``X`` only: if ``X = U diag(s) V^T`` then after the iteration
``X = U diag(P(s)) V^T``, where ``P`` is the composition of the scalar polynomials
``p_k(s) = a_k s + b_k s^3 + c_k s^5``. The input is first divided by
``norm_factor * ||X||_F + eps``. So the guarantee "every output singular value lies in
the band the coefficient set is designed for" has an exact meaning: build inputs whose
singular values we choose (``U diag(s) V^T`` with a set condition number), map the
normalised interval ``[s_min, s_max] / (norm_factor * ||s|| + eps)`` through ``P`` in
float64 (exactly: the image of an interval under a polynomial is spanned by its endpoints
and its critical points), and check the output's singular values against that image.

The coefficients and normalisation factors are typed here again from their sources
(Moonlight's paper; Amsel et al. 2025 as quoted in PEERS.md), not imported, so a typo in
the product's constants fails these tests.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from muon_ds.math import coefficient_schedule, newton_schulz, newton_schulz_flops

MOONLIGHT = [(3.4445, -4.7750, 2.0315)] * 5
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SCHEDULES = {"moonlight": MOONLIGHT, "polar_express": POLAR_EXPRESS}
# Polar Express divides by 1.02 * ||X||_F (its first triple expects values just below 1).
NORM_FACTOR = {"moonlight": 1.0, "polar_express": 1.02}
EPS = 1e-7

# Allowed distance of an output singular value outside the exact float64 band.
# float64 / float32: a few hundred units of roundoff (measured: 5e-14 and 1.3e-5 worst
# over 4 seeds x 8 shapes x 5 condition numbers; the float32 figure is the polar_express
# 1 x N case, whose first step has slope ~16 at the normalised value 0.98).
# bfloat16: each step rounds the iterate to 8 significant bits several times (gram, its
# square, the polynomial, the product) and the terms a X and (b A + c A^2) X largely
# cancel, so one step's error is a few times |a| * 2^-8 ~ 0.01-0.03; measured worst 0.07
# (polar_express on a 1 x N vector). 0.1 is 25 bf16 units at 1, still well inside the
# gap to the failures it must catch (a missing normalisation, a wrong or missing step).
BAND_MARGIN = {torch.bfloat16: 0.1, torch.float32: 1e-4, torch.float64: 1e-10}

# Rounding the normalised input (Frobenius norm <= 1) to ``dtype`` changes each element by
# at most one unit roundoff relative, so the rounding error E has ||E||_2 <= ||E||_F <= u,
# and by Weyl's inequality every normalised singular value moves by at most u. The input
# interval is widened by u before it is mapped: in bf16 (u = 2^-8) singular values below
# about 0.004 are not resolved at all, so a cond = 1000 input has no lower band there.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}

SHAPES = {
    "square": (32, 32),
    "tall": (48, 16),
    "wide": (16, 48),
    "row_1xN": (1, 40),
    "column_Nx1": (40, 1),
    "batched_wide": (3, 24, 40),
    "batched_tall": (3, 40, 24),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These matrices are tiny: intra-op threads only add OpenMP spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _poly_image(a: float, b: float, c: float, lo: float, hi: float) -> tuple[float, float]:
    """Exact image of [lo, hi] under a s + b s^3 + c s^5 (endpoints and critical points)."""
    points = [lo, hi]
    # p'(s) = a + 3b s^2 + 5c s^4 = 0 is a quadratic in t = s^2.
    disc = 9 * b * b - 20 * a * c
    if disc >= 0:
        for t in ((-3 * b + math.sqrt(disc)) / (10 * c), (-3 * b - math.sqrt(disc)) / (10 * c)):
            if t > 0 and lo < math.sqrt(t) < hi:
                points.append(math.sqrt(t))
    values = [a * s + b * s**3 + c * s**5 for s in points]
    return min(values), max(values)


def _band(name: str, lo: float, hi: float) -> tuple[float, float]:
    """Image of the normalised singular-value interval [lo, hi] under the composed P."""
    for a, b, c in SCHEDULES[name]:
        lo, hi = _poly_image(a, b, c, lo, hi)
    return lo, hi


def _composed(name: str, s: torch.Tensor) -> torch.Tensor:
    for a, b, c in SCHEDULES[name]:
        s = a * s + b * s**3 + c * s**5
    return s


def _with_spectrum(
    shape: tuple[int, ...], cond: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``U diag(s) V^T`` of ``shape`` with singular values log-spaced in [1/cond, 1]."""
    *batch, m, n = shape
    k = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=gen))
    s = torch.logspace(0.0, -math.log10(cond), k, dtype=torch.float64).expand(*batch, k)
    # A random permutation per matrix so the largest value is not always first.
    s = s.gather(-1, torch.rand(*batch, k, generator=gen).argsort(dim=-1))
    return (u * s.unsqueeze(-2)) @ v.mT, u, s, v


def _normalised(name: str, s: torch.Tensor) -> torch.Tensor:
    """Singular values after the iteration's Frobenius normalisation (per matrix)."""
    frob = s.norm(dim=-1, keepdim=True)
    return s / (frob * NORM_FACTOR[name] + EPS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cond", [10.0, 1000.0])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_singular_values_lie_in_band_of_composed_polynomial(
    name: str, shape: tuple[int, ...], cond: float, dtype: torch.dtype, device: torch.device
) -> None:
    x, _, s, _ = _with_spectrum(shape, cond, seed=zlib.crc32(repr((name, shape, cond)).encode()))
    out = newton_schulz(x.to(device), coefficients=name, eps=EPS, dtype=dtype).cpu()
    assert out.shape == x.shape
    assert out.dtype == dtype
    got = torch.linalg.svdvals(out.double()).reshape(-1, min(shape[-2:]))
    normalised = _normalised(name, s).reshape(got.shape)
    margin, unit = BAND_MARGIN[dtype], UNIT_ROUNDOFF[dtype]
    for sv, sn in zip(got, normalised, strict=True):
        lo, hi = _band(name, max(sn.min().item() - unit, 0.0), sn.max().item() + unit)
        assert sv.min().item() >= lo - margin, (sv.min().item(), lo, margin)
        assert sv.max().item() <= hi + margin, (sv.max().item(), hi, margin)


@pytest.mark.parametrize(
    ("name", "smallest", "band"),
    [
        # Keller Jordan's quintic: fast, not exact; "singular values in about 0.7 to 1.2".
        ("moonlight", 3e-3, (0.68, 1.21)),
        # Polar Express: tuned for normalised singular values down to about 1e-3.
        ("polar_express", 1e-3, (0.85, 1.15)),
    ],
)
def test_coefficient_set_maps_normalised_spectrum_into_its_design_band(
    name: str, smallest: float, band: tuple[float, float]
) -> None:
    """The product's schedule, composed, maps [smallest, 1] into the set's design band."""
    schedule = coefficient_schedule(name, 5)
    assert schedule == SCHEDULES[name]
    lo, hi = _band(name, smallest, 1.0)
    assert band[0] <= lo
    assert hi <= band[1]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_float64_result_is_u_times_composed_polynomial_of_spectrum_times_vt(
    name: str, shape: tuple[int, ...], device: torch.device
) -> None:
    """In float64 the whole output matrix is predicted, not just its spectrum's range:
    this pins the step count, each step's triple, the 1.02 factor and the eps placement."""
    x, u, s, v = _with_spectrum(shape, 100.0, seed=7)
    expected = (u * _composed(name, _normalised(name, s)).unsqueeze(-2)) @ v.mT
    out = newton_schulz(x.to(device), coefficients=name, eps=EPS, dtype=torch.float64)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(8, 8), (1, 5), (6, 3), (2, 4, 7)])
@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_zero_matrix_orthogonalises_to_zero_without_nan(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    out = newton_schulz(torch.zeros(shape, device=device), coefficients=name, dtype=dtype)
    assert torch.equal(out, torch.zeros(shape, dtype=dtype, device=device))


# Batched and single products may take different BLAS kernels (bmm vs mm, other tilings
# on another CPU or GPU), which order each dot product's sums differently: the per-matrix
# guarantee holds up to a few units of roundoff, amplified by five steps of an iteration
# whose terms largely cancel. The tolerances are those of the layout test below, and far
# below what a batch-wide normalisation (a wrong result by a factor) would give.
REORDER_ATOL = {torch.float32: 1e-5, torch.float64: 1e-13}


@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_zero_matrix_in_batch_stays_zero_and_leaves_others_unchanged(
    name: str, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(3, 12, 20, generator=gen).to(device)
    batch[1] = 0.0
    out = newton_schulz(batch, coefficients=name, dtype=torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # 0 / (0 + eps), then products of 0
    for i in (0, 2):
        alone = newton_schulz(batch[i], coefficients=name, dtype=torch.float32)
        torch.testing.assert_close(out[i], alone, rtol=0, atol=REORDER_ATOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4, 24, 40), (4, 40, 24), (2, 3, 16, 16)])
@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_batched_result_equals_per_matrix_results(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """Each slice of a batch is normalised and iterated on its own, as if alone."""
    gen = torch.Generator().manual_seed(11)
    batch = torch.randn(shape, generator=gen).to(device)
    out = newton_schulz(batch, coefficients=name, dtype=dtype)
    flat_in = batch.reshape(-1, *shape[-2:])
    per_matrix = torch.stack([newton_schulz(m, coefficients=name, dtype=dtype) for m in flat_in])
    torch.testing.assert_close(out, per_matrix.reshape(out.shape), rtol=0, atol=REORDER_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_transposed_view_input_gives_transpose_of_result_bit_identically(
    name: str, dtype: torch.dtype, device: torch.device
) -> None:
    """A tall view of a wide matrix is worked on through its short side: the iteration
    runs the very same products on the very same wide matrix, so the result is its
    transpose, bit for bit (one call repeated on the same data, not two kernels)."""
    wide = torch.randn(16, 48, generator=torch.Generator().manual_seed(5)).to(device)
    out_wide = newton_schulz(wide, coefficients=name, dtype=dtype)
    out_tall = newton_schulz(wide.mT, coefficients=name, dtype=dtype)
    assert torch.equal(out_tall, out_wide.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(48, 16), (3, 40, 24)])
@pytest.mark.parametrize("name", ["moonlight", "polar_express"])
def test_tall_input_equals_transpose_of_wide_result(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """A contiguous tall matrix equals the transpose of the wide result up to roundoff
    (the BLAS may order sums differently for the other memory layout, so not bitwise)."""
    tall = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device)
    out_tall = newton_schulz(tall, coefficients=name, dtype=dtype)
    out_wide = newton_schulz(tall.mT.contiguous(), coefficients=name, dtype=dtype)
    torch.testing.assert_close(out_tall, out_wide.mT, rtol=0, atol=REORDER_ATOL[dtype])


def test_default_iteration_runs_in_bfloat16_with_moonlight_coefficients() -> None:
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, newton_schulz(x, steps=5, coefficients="moonlight", eps=1e-7))


def test_newton_schulz_flops_matches_hand_count() -> None:
    # m = 3 (short side), n = 5, 2 steps. Per step:
    #   X X^T : 3x5 @ 5x3 -> 9 outputs x 5 MACs  = 45 MACs
    #   A A   : 3x3 @ 3x3 -> 9 outputs x 3 MACs  = 27 MACs
    #   B X   : 3x3 @ 3x5 -> 15 outputs x 3 MACs = 45 MACs
    #   117 MACs = 234 FLOPs; 2 steps = 468.
    assert newton_schulz_flops(3, 5, 2) == 468
    assert newton_schulz_flops(5, 3, 2) == 468  # tall: same work on the short side
    # 1 x 40, 5 steps: (40 + 1 + 40) MACs = 162 FLOPs per step.
    assert newton_schulz_flops(1, 40, 5) == 810
    # 1024 x 4096: 2 * (2 * 1024^2 * 4096 + 1024^3) per step.
    assert newton_schulz_flops(4096, 1024, 1) == 2 * (2 * 1024**2 * 4096 + 1024**3)


class _MatmulFlops(TorchFunctionMode):
    """Counts 2 * MACs of every matrix product the reference actually runs.

    (A light stand-in for torch.utils.flop_counter, whose import alone costs seconds.)
    """

    _PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm)
    _FUSED = (torch.addmm, torch.baddbmm, torch.Tensor.addmm, torch.Tensor.baddbmm)

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in self._PRODUCTS or func in self._FUSED:
            a, b = args[1:3] if func in self._FUSED else args[:2]
            batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (1, 40), (3, 24, 40)])
@pytest.mark.parametrize(
    ("name", "steps"), [("moonlight", 5), ("moonlight", 3), ("polar_express", 5)]
)
def test_newton_schulz_flops_equals_matmul_flops_of_the_reference(
    name: str, steps: int, shape: tuple[int, ...]
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with _MatmulFlops() as counter:
        newton_schulz(x, steps=steps, coefficients=name)
    batch = math.prod(shape[:-2])
    assert counter.flops == batch * newton_schulz_flops(*shape[-2:], steps)


def test_one_dimensional_input_is_rejected_with_its_ndim() -> None:
    with pytest.raises(ValueError, match="matrix or a batch of matrices, got 1-D"):
        newton_schulz(torch.ones(5))


def test_unknown_coefficient_set_is_rejected_naming_it_and_the_allowed_sets() -> None:
    with pytest.raises(ValueError, match=r"ns_coefficients='quintic'.*moonlight.*polar_express"):
        newton_schulz(torch.ones(3, 3), coefficients="quintic")


def test_polar_express_with_more_steps_than_triples_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"ns_steps=6 .*'polar_express'.*at most 5"):
        newton_schulz(torch.ones(3, 3), steps=6, coefficients="polar_express")


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_polar_express_schedule_uses_the_first_steps_triples_in_order(steps: int) -> None:
    assert coefficient_schedule("polar_express", steps) == POLAR_EXPRESS[:steps]
    assert coefficient_schedule("moonlight", steps) == MOONLIGHT[:1] * steps
