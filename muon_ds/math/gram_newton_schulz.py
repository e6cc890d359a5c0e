"""Gram Newton-Schulz: the same polynomial iteration, carried out on the short side's Gram
matrix (Dao AI Lab, https://tridao.me/blog/2026/gram-newton-schulz/).

Each step of ``muon_ds.math.newton_schulz`` multiplies the wide ``m x n`` iterate by an
``m x m`` polynomial ``P_i = a I + b A + c A^2`` of ``A = X X^T``. So ``X_k = Q_k X_0`` with
``Q_k = P_{k-1} ... P_0``, and ``A`` can be updated without touching ``X``: ``P`` is a
polynomial in ``A``, the two commute, and ``A_{k+1} = P_k A_k P_k = P_k^2 A_k``. The
iteration then runs on ``m x m`` matrices only, and ``X`` is multiplied once at the end.
For ``n`` well above ``m`` that costs far fewer FLOPs (``gram_newton_schulz_flops``).

Carried across steps, the Gram matrix gathers rounding that the standard iteration, which
re-forms ``A`` from ``X`` each time, does not. Two things keep it at or below the standard
iteration's error: the small ``m x m`` chain (``A``, ``Z``, ``Q``) runs in ``chain_dtype``
(fp16 for a bf16 iteration on GPUs, as DeepSpeed's Gram path does: the same tensor-core
rate, three more mantissa bits; ``A``'s eigenvalues stay below about 1.5, the quintic's
band squared, and ``Q``'s below ``a^3`` ~ 41 with at most three steps between restarts:
far inside fp16's range), and at each step in ``restarts`` the iterate is formed
(``X = Q X_0``) and ``A`` recomputed from it, at the price of two wide products. Without
the restart a nearly low-rank matrix diverges in fp16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muon_ds.math.newton_schulz import (
    coefficient_schedule,
    newton_schulz_flops,
    normalized_wide_stack,
)

RESTARTS = (2,)
"""Steps before which the iterate and its Gram matrix are formed afresh: after two steps,
as DeepSpeed 0.19.8's Gram path does for its 5-step fp16 iteration (measured here: without
it a nearly low-rank matrix's error in fp16 grows past 1)."""


def gram_newton_schulz(
    matrix: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: str = "moonlight",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    chain_dtype: torch.dtype | None = None,
    restarts: Sequence[int] = RESTARTS,
) -> torch.Tensor:
    """``muon_ds.math.newton_schulz`` (same arguments, same result up to rounding) through the
    short side's Gram matrix: wide products in ``dtype``, the ``m x m`` chain in
    ``chain_dtype`` (default ``dtype``), restarts at the steps in ``restarts``."""
    chain_dtype = chain_dtype or dtype
    schedule = coefficient_schedule(coefficients, steps)
    x, restore = normalized_wide_stack(matrix, coefficients=coefficients, eps=eps, dtype=dtype)
    gram = (x @ x.mT).to(chain_dtype)
    product = None  # Q: the polynomials applied since the last restart, newest on the left
    for step, (a, b, c) in enumerate(schedule):
        if step in restarts and product is not None:
            x = product.to(dtype) @ x
            gram = (x @ x.mT).to(chain_dtype)
            product = None
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # Z = b A + c A A; P = a I + Z
        if product is None:
            product = poly + a * torch.eye(poly.size(-1), dtype=poly.dtype, device=poly.device)
        else:
            product = torch.baddbmm(product, poly, product, beta=a)  # P Q = a Q + Z Q
        if step + 1 < len(schedule) and step + 1 not in restarts:
            scaled = torch.baddbmm(gram, poly, gram, beta=a)  # P A
            gram = torch.baddbmm(scaled, poly, scaled, beta=a)  # P P A
    if product is not None:
        x = product.to(dtype) @ x
    return restore(x)


def gram_newton_schulz_flops(
    rows: int, cols: int, steps: int, restarts: Sequence[int] = RESTARTS
) -> int:
    """Multiply-add FLOPs (2 per MAC) of ``gram_newton_schulz`` on one rows x cols matrix.

    With m = min side and n = max side: the Gram matrix 2 m^2 n; per step ``A A`` 2 m^3,
    ``Z Q`` 2 m^3 (not at a first step after a start), the Gram update 4 m^3 (not before
    the last step or a restart); per restart ``Q X`` and ``X X^T``, 2 m^2 n each; the final
    ``Q X`` 2 m^2 n.
    """
    m, n = min(rows, cols), max(rows, cols)
    wide, square = 2 * m * m * n, 2 * m**3
    flops = wide  # the first Gram matrix
    fresh = True
    for step in range(steps):
        if step in restarts and not fresh:
            flops += 2 * wide
            fresh = True
        flops += square + (0 if fresh else square)
        fresh = False
        if step + 1 < steps and step + 1 not in restarts:
            flops += 2 * square
    return flops + wide


def uses_gram(rows: int, cols: int, steps: int, algorithm: str) -> bool:
    """Whether ``algorithm`` ("standard", "gram" or "auto") orthogonalises a rows x cols
    matrix through its Gram matrix: "auto" does where that takes fewer FLOPs (a long side
    more than 1.5 x the short one at 5 steps)."""
    if algorithm == "auto":
        return gram_newton_schulz_flops(rows, cols, steps) < newton_schulz_flops(rows, cols, steps)
    return algorithm == "gram"


def ns_flops(rows: int, cols: int, steps: int, algorithm: str) -> int:
    """FLOPs of orthogonalising one rows x cols matrix with ``algorithm``, as the planner
    balances and counts them."""
    if uses_gram(rows, cols, steps, algorithm):
        return gram_newton_schulz_flops(rows, cols, steps)
    return newton_schulz_flops(rows, cols, steps)
