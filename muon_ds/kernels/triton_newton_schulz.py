"""Newton-Schulz in Triton: three fused kernels per step instead of eight torch ops.

One step of the reference is ``A = X Xᵀ``, ``B = b A + c A A``, ``X <- a X + B X``: three
matmuls and five elementwise ops, each a round trip through memory. Here, for an m x n
``X`` (m <= n):

1. ``A = X Xᵀ`` is a symmetric product: only the lower triangle of output tiles is
   launched, each tile is stored at (i, j) and mirrored to (j, i); a diagonal tile
   mirrors its own lower triangle, so the output is exactly symmetric.
2. ``B = c A A + b A`` is the same kernel again: ``A`` is symmetric, so ``A A = A Aᵀ``
   and ``B`` is symmetric too; ``b A`` is added in the epilogue, while the tile is in
   registers.
3. ``X <- B X + a X`` is a plain matmul whose epilogue adds ``a X``.

So a step costs about 3 m²n + m³ FLOPs instead of 4 m²n + 2 m³. Operands are stored in
the iteration dtype (bf16 by default) and every product accumulates in fp32, so each
output element is rounded once instead of after every op. A leading batch dim (a layer's
experts, Q/K/V blocks) is the grid's second axis: one launch per kernel for the whole
stack. Masks make any shape work, not only tile multiples.

Gram Newton-Schulz (``gram_newton_schulz_triton``, the iteration of
``muon_ds.math.gram_newton_schulz``) runs on the same three kernels: its ``X Xᵀ`` and
``b A + c A A`` are the symmetric products, and every other product has the form
``B Y + a Y`` (``a Q + Z Q``, ``a A + Z A``; ``Q X`` with ``a = 0``).
"""

# Triton convention: matrix sizes and compile-time constants are upper case.
# ruff: noqa: N803

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from muon_ds.math import coefficient_schedule
from muon_ds.math.gram_newton_schulz import RESTARTS
from muon_ds.math.newton_schulz import normalized_wide_stack

INTERPRETED: bool = triton.knobs.runtime.interpret
"""Whether this module's kernels run in Triton's CPU interpreter. Read at import, like
``@triton.jit`` itself: TRITON_INTERPRET must be set before this module is imported."""


def _configs(
    gpu: list[tuple[int, ...]], interpreter: tuple[int, ...], names: tuple[str, ...]
) -> list[triton.Config]:
    """Autotuning candidates: a few tile shapes on a GPU, one small tile in the interpreter
    (small enough that the tests' small matrices span several tiles and reach the masks)."""
    if INTERPRETED:
        return [triton.Config(dict(zip(names, interpreter, strict=True)))]
    return [
        triton.Config(dict(zip(names, tiles, strict=True)), num_warps=warps, num_stages=stages)
        for *tiles, warps, stages in gpu
    ]


# The two helpers below are the only places where the interpreter takes another path, so
# that it computes what a GPU computes: in triton 3.8's interpreter, tl.dot on bf16
# operands returns garbage and the fp32 -> bf16 cast truncates instead of rounding.


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32 (``ieee``: fp32 operands are not cut to TF32;
    it is ignored for bf16). The interpreter gets fp32 operands: a bf16 x bf16 product
    is exact in fp32, so that is what a GPU's bf16 MMA with fp32 accumulation gives."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _rounded(acc, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``acc`` cast to ``dtype`` rounding to nearest even, as a GPU does. In the
    interpreter the bits are rounded first (add 0x7FFF plus the lowest kept bit, clear the
    low half), so its truncating cast is then exact."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        acc = bits.to(tl.float32, bitcast=True)
    return acc.to(dtype)


@triton.autotune(
    configs=_configs(
        gpu=[(128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 5)],
        interpreter=(32, 64),
        names=("BLOCK", "BLOCK_K"),
    ),
    key=["M", "K"],
)
@triton.jit
def _symmetric_product_kernel(
    p_ptr,
    q_ptr,
    out_ptr,
    M,
    K,
    alpha,
    beta,
    stride_pb,
    stride_pm,
    stride_pk,
    stride_ob,
    stride_om,
    stride_on,
    ADD_Q: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out = alpha P Pᵀ (+ beta Q)`` for one tile (i, j) of the lower triangle, j <= i.

    Program ``t`` of axis 0 takes the t-th tile in row-major order of the triangle:
    i = floor((sqrt(8t + 1) - 1) / 2), j = t - i(i+1)/2 (the two ``where`` correct any
    float rounding of the square root). The tile is stored at (i, j) and, transposed,
    at (j, i), so every element of ``out`` is written. ``Q`` must be symmetric and share
    ``out``'s strides.
    """
    t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    j = t - i * (i + 1) // 2

    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    rows_in = rows[:, None] < M
    cols_in = cols[None, :] < M
    p = p_ptr + batch * stride_pb
    left = p + rows[:, None] * stride_pm + ks[None, :] * stride_pk
    right = p + ks[:, None] * stride_pk + cols[None, :] * stride_pm  # P[cols, k] transposed
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = ks < K - k0
        a = tl.load(left, mask=rows_in & k_in[None, :], other=0.0)
        b = tl.load(right, mask=k_in[:, None] & cols_in, other=0.0)
        acc = _dot(a, b, acc, INTERPRETED)
        left += BLOCK_K * stride_pk
        right += BLOCK_K * stride_pk

    mask = rows_in & cols_in
    here = rows[:, None] * stride_om + cols[None, :] * stride_on
    acc = alpha * acc
    if ADD_Q:
        acc += beta * tl.load(q_ptr + batch * stride_ob + here, mask=mask).to(tl.float32)
    if i == j:
        # A diagonal tile is one dot, and no MMA or BLAS promises that its (r, c) and
        # (c, r) sums come out bitwise equal: keep the lower triangle and mirror it, so
        # the output is symmetric by construction on every backend.
        acc = tl.where(rows[:, None] >= cols[None, :], acc, tl.trans(acc))
    tile = _rounded(acc, out_ptr.dtype.element_ty, INTERPRETED)
    out = out_ptr + batch * stride_ob
    tl.store(out + here, tile, mask=mask)
    if i != j:
        tl.store(out + cols[None, :] * stride_om + rows[:, None] * stride_on, tile, mask=mask)


@triton.autotune(
    configs=_configs(
        gpu=[
            (128, 128, 64, 8, 8, 3),
            (128, 256, 64, 8, 8, 3),
            (64, 128, 32, 8, 4, 4),
            (64, 64, 32, 8, 4, 5),
        ],
        interpreter=(32, 64, 64, 8),
        names=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
    ),
    key=["M", "N"],
)
@triton.jit
def _matmul_add_kernel(
    b_ptr,
    x_ptr,
    out_ptr,
    M,
    N,
    alpha,
    stride_bb,
    stride_bm,
    stride_bk,
    stride_xb,
    stride_xm,
    stride_xn,
    stride_ob,
    stride_om,
    stride_on,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = B X + alpha X`` for one [BLOCK_M, BLOCK_N] tile; B is M x M, X is M x N.

    Tiles are visited in groups of GROUP_M tile rows (the ordering of Triton's matmul
    tutorial) so that programs running together share the columns of X in L2.
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_m
    tile_n = (pid % per_group) // group_m

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rows_in = rows[:, None] < M
    cols_in = cols[None, :] < N
    x = x_ptr + batch * stride_xb
    left = b_ptr + batch * stride_bb + rows[:, None] * stride_bm + ks[None, :] * stride_bk
    right = x + ks[:, None] * stride_xm + cols[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        k_in = ks < M - k0
        a = tl.load(left, mask=rows_in & k_in[None, :], other=0.0)
        b = tl.load(right, mask=k_in[:, None] & cols_in, other=0.0)
        acc = _dot(a, b, acc, INTERPRETED)
        left += BLOCK_K * stride_bk
        right += BLOCK_K * stride_xm

    mask = rows_in & cols_in
    own = tl.load(x + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask)
    acc += alpha * own.to(tl.float32)
    out = out_ptr + batch * stride_ob + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, _rounded(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def symmetric_product(
    p: torch.Tensor,
    out: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = alpha P Pᵀ + beta add`` for a [k, m, K] stack ``p``, ``add`` symmetric
    [k, m, m] with ``out``'s strides (or None: no term). Writes all of ``out``."""
    k, m, depth = p.shape

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(m, meta["BLOCK"])
        return tiles * (tiles + 1) // 2, k

    _symmetric_product_kernel[grid](
        p,
        out if add is None else add,  # never read when there is no term to add
        out,
        m,
        depth,
        alpha,
        beta,
        *p.stride(),
        *out.stride(),
        ADD_Q=add is not None,
        INTERPRETED=INTERPRETED,
    )
    return out


def matmul_add(
    b: torch.Tensor, x: torch.Tensor, out: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    """``out = B X + alpha X`` for [k, m, m] ``b`` and [k, m, n] ``x`` (``out`` not ``x``)."""
    k, m, n = x.shape

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), k

    _matmul_add_kernel[grid](
        b, x, out, m, n, alpha, *b.stride(), *x.stride(), *out.stride(), INTERPRETED=INTERPRETED
    )
    return out


def newton_schulz_triton(
    matrix: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: str = "moonlight",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``muon_ds.math.newton_schulz`` (same arguments, same result up to rounding) on the
    fused kernels: ``matrix`` on a CUDA device, or anywhere under the interpreter.

    Normalised and stacked short side first as the reference does
    (``normalized_wide_stack``), the stack made contiguous for the kernels.
    """
    schedule = coefficient_schedule(coefficients, steps)
    x, restore = normalized_wide_stack(matrix, coefficients=coefficients, eps=eps, dtype=dtype)
    x = x.contiguous()
    k, m, _ = x.shape
    gram = x.new_empty(k, m, m)
    poly = x.new_empty(k, m, m)
    spare = torch.empty_like(x)
    for a, b, c in schedule:
        symmetric_product(x, gram)
        symmetric_product(gram, poly, alpha=c, beta=b, add=gram)  # A A = A Aᵀ: A symmetric
        x, spare = matmul_add(poly, x, spare, alpha=a), x
    return restore(x)


def gram_newton_schulz_triton(
    matrix: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: str = "moonlight",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    chain_dtype: torch.dtype | None = None,
    restarts: Sequence[int] = RESTARTS,
) -> torch.Tensor:
    """``muon_ds.math.gram_newton_schulz`` (same arguments, same result up to rounding) on
    the same fused kernels: ``X Xᵀ`` and ``b A + c A A`` as symmetric products, every other
    ``m x m`` product (``a Q + Z Q``, ``a A + Z A``) and ``Q X`` as ``matmul_add``. Each
    product accumulates in fp32 and is rounded once, into ``chain_dtype`` for the chain.
    """
    chain_dtype = chain_dtype or dtype
    schedule = coefficient_schedule(coefficients, steps)
    x, restore = normalized_wide_stack(matrix, coefficients=coefficients, eps=eps, dtype=dtype)
    x = x.contiguous()
    k, m, _ = x.shape
    gram = symmetric_product(x, x.new_empty(k, m, m, dtype=chain_dtype))
    poly, spare = torch.empty_like(gram), torch.empty_like(gram)
    product = None  # Q: the polynomials applied since the last restart, newest on the left
    for step, (a, b, c) in enumerate(schedule):
        if step in restarts and product is not None:
            x = matmul_add(product.to(dtype), x, torch.empty_like(x), alpha=0.0)
            gram = symmetric_product(x, gram)
            product = None
        symmetric_product(gram, poly, alpha=c, beta=b, add=gram)  # Z = b A + c A A
        if product is None:
            product = poly.clone()
            product.diagonal(dim1=-2, dim2=-1).add_(a)  # Q = a I + Z
        else:
            product, spare = matmul_add(poly, product, spare, alpha=a), product  # a Q + Z Q
        if step + 1 < len(schedule) and step + 1 not in restarts:
            scaled = matmul_add(poly, gram, torch.empty_like(gram), alpha=a)  # P A
            gram = matmul_add(poly, scaled, gram, alpha=a)  # P P A
    if product is not None:
        x = matmul_add(product.to(dtype), x, torch.empty_like(x), alpha=0.0)
    return restore(x)
