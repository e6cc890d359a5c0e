"""Newton-Schulz orthogonalisation: the torch reference every other path is checked against.

Muon replaces a momentum matrix ``U = U_s S V^T`` by (approximately) ``U_s V^T``: all
singular values pushed towards 1, directions kept. An odd polynomial applied to ``X``
acts on its singular values only, so iterating ``X <- a X + (b A + c A^2) X`` with
``A = X X^T`` drives every singular value in (0, 1] into a band around 1. Normalising by
the Frobenius norm first puts every singular value in (0, 1], where the iteration is
designed to work.

Work is done on the short side (``X X^T`` is m x m with m <= n), so a tall matrix is
transposed first and back at the end. Leading dims are a batch: a stack of same-shape
matrices (a layer's experts, the Q/K/V blocks) is orthogonalised in one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MOONLIGHT_COEFFICIENTS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),)
"""Moonlight / Keller Jordan's quintic, used at every step: fast rather than exact, it
leaves singular values in a band around 1 (about 0.7 to 1.2) instead of converging to 1."""

POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
"""Amsel et al. 2025 ("The Polar Express"): one optimal triple per step, tighter band."""

_SETS = {
    "moonlight": (MOONLIGHT_COEFFICIENTS, 1.0),
    # Polar Express divides by 1.02 * ||X||_F: its first triple is tuned for singular
    # values slightly below 1, and the margin absorbs bf16 rounding of the norm.
    "polar_express": (POLAR_EXPRESS_COEFFICIENTS, 1.02),
}


def coefficient_schedule(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) triple used at each of ``steps`` iterations of the named set."""
    try:
        triples, _ = _SETS[name]
    except KeyError:
        raise ValueError(
            f"ns_coefficients={name!r} is not allowed: expected one of {sorted(_SETS)}"
        ) from None
    if len(triples) == 1:
        return list(triples) * steps
    if steps > len(triples):
        raise ValueError(f"ns_steps={steps} is not allowed with {name!r}: at most {len(triples)}")
    return list(triples[:steps])


def newton_schulz(
    matrix: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: str = "moonlight",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximate orthogonal factor of ``matrix`` (shape ``[..., m, n]``), in ``dtype``.

    Each matrix of the batch is normalised by its own Frobenius norm (plus ``eps``, so a
    zero matrix stays zero instead of becoming NaN), then iterated on its short side.
    """
    schedule = coefficient_schedule(coefficients, steps)
    x, restore = normalized_wide_stack(matrix, coefficients=coefficients, eps=eps, dtype=dtype)
    for a, b, c in schedule:
        gram = x @ x.mT
        # b A + c A A and a X + B X each in one call: the products accumulate in fp32 and
        # the sum is rounded once, as in the Triton kernel's epilogues, instead of a
        # rounding and a full pass over memory per scaled term (bf16 elementwise ops
        # were a quarter of this function's CPU time).
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return restore(x)


def normalized_wide_stack(
    matrix: torch.Tensor, *, coefficients: str, eps: float, dtype: torch.dtype
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``matrix`` cast to ``dtype``, short side first, each matrix divided by its Frobenius
    norm times the set's safety factor plus ``eps``, as one ``[k, m, n]`` stack; and the
    function that puts a result back in ``matrix``'s shape and orientation.

    Every Newton-Schulz implementation (reference, Triton, Gram) starts here, so they
    share the normalisation's constants. Batched matmuls (``baddbmm``, the kernels) take
    exactly one batch dim; for 2-D and 3-D inputs the stack is a view.
    """
    if matrix.ndim < 2:
        raise ValueError(
            f"newton_schulz needs a matrix or a batch of matrices, got {matrix.ndim}-D"
        )
    x = matrix.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * frobenius_margin(coefficients) + eps)
    shape = x.shape

    def restore(stacked: torch.Tensor) -> torch.Tensor:
        result = stacked.reshape(shape)
        return result.mT if transposed else result

    return x.reshape(-1, *shape[-2:]), restore


def frobenius_margin(coefficients: str) -> float:
    """What the named set multiplies the Frobenius norm by before dividing by it."""
    return _SETS[coefficients][1]


def newton_schulz_flops(rows: int, cols: int, steps: int) -> int:
    """Multiply-add FLOPs of ``steps`` iterations on one rows x cols matrix (2 per MAC).

    Per step with m = min side, n = max side: ``X X^T`` is 2 m^2 n, ``A A`` is 2 m^3 and
    ``B X`` is 2 m^2 n, so 4 m^2 n + 2 m^3.
    """
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)
