"""Newton-Schulz over a team of ranks, each holding a block of the matrix's long side.

Write the wide (``m x n``, ``m <= n``) iterate as column blocks ``X = [X_1 ... X_k]``, one
per member. A step ``X <- a X + B X`` with ``B = b A + c A^2`` needs the whole matrix only
through ``A = X X^T = sum_i X_i X_i^T``, an ``m x m`` sum over the team (symmetric: only
its upper triangle travels); each member then updates its own block,
``X_i <- a X_i + B X_i``. The Frobenius norm is a team sum too. So per step a member does
``4 m^2 n_i`` FLOPs on its block and the team one sum of ``m (m + 1) / 2`` elements.

``B`` is small but costs ``2 m^3``. ``"replicated"``: every member computes all of it (no
more traffic). ``"split"``: member ``i`` computes its rows of ``B`` and the team gathers
them (``2 m^3 / k`` FLOPs each, one more ``m x m`` collective). The planner
(``muon_ds.teams``) picks the cheaper and counts the same FLOPs (``team_member_flops``).

The sums run in the iteration's dtype, as single-process Newton-Schulz rounds ``A`` to it:
in fp32 the result equals ``newton_schulz`` up to summation order; in bf16 the team sum
rounds each member's part before adding, which stays inside bf16's own error band.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from muon_ds.math.newton_schulz import coefficient_schedule, frobenius_margin

TEAM_MODES = ("replicated", "split")


@dataclass(frozen=True)
class TeamOps:
    """The team's collectives, as this member calls them."""

    sum_: Callable[[torch.Tensor], None]
    """Sums a tensor over the team, in place."""

    gather_rows: Callable[[torch.Tensor, torch.Tensor], None]
    """``(part, out)``: every member's ``part`` (``[c, m]``) into ``out`` (``[k c, m]``),
    in team order."""

    index: int
    """This member's place in the gather order (0 .. size - 1)."""

    size: int


def split_rows(m: int, size: int, index: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``B`` that member ``index`` of ``size`` computes in split mode:
    equal chunks of ``ceil(m / size)`` rows (the last ones short or empty), so the gathered
    chunks are equal in size and their concatenation's first ``m`` rows are ``B``."""
    chunk = -(-m // size)
    return min(m, index * chunk), min(m, (index + 1) * chunk)


def team_newton_schulz(
    block: torch.Tensor,
    team: TeamOps,
    *,
    mode: str,
    steps: int = 5,
    coefficients: str = "moonlight",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """This member's block ``[m, n_i]`` of the orthogonal factor of the wide matrix whose
    column block ``block`` is, normalised and iterated as ``muon_ds.math.newton_schulz``."""
    if mode not in TEAM_MODES:
        raise ValueError(f"team mode {mode!r} is not allowed: expected one of {TEAM_MODES}")
    x = block.to(dtype)
    squares = x.float().square().sum().reshape(1)
    team.sum_(squares)
    # The reference's norm is rounded to the iteration's dtype before it divides.
    norm = squares.sqrt().to(dtype)
    x = x / (norm * frobenius_margin(coefficients) + eps)
    upper = _upper_triangle(x.size(0), x.device)
    for a, b, c in coefficient_schedule(coefficients, steps):
        gram = _symmetric_sum(x @ x.mT, upper, team)
        poly = _polynomial(gram, b, c, team, mode)
        x = torch.addmm(x, poly, x, beta=a)
    return x


@functools.lru_cache(maxsize=8)
def _upper_triangle(m: int, device: torch.device) -> torch.Tensor:
    """Indices of an ``m x m`` matrix's upper triangle, built once per size and device:
    for m = 4096 they are 134 MB of int64, not to be rebuilt every optimizer step."""
    return torch.triu_indices(m, m, device=device)


def _symmetric_sum(gram: torch.Tensor, upper: torch.Tensor, team: TeamOps) -> torch.Tensor:
    """The team's sum of the symmetric ``gram``, sending only its upper triangle (``upper``:
    its indices): ``m (m + 1) / 2`` elements instead of ``m^2``."""
    packed = gram[upper[0], upper[1]]
    team.sum_(packed)
    total = torch.empty_like(gram)
    total[upper[0], upper[1]] = packed
    total[upper[1], upper[0]] = packed
    return total


def _polynomial(gram: torch.Tensor, b: float, c: float, team: TeamOps, mode: str) -> torch.Tensor:
    """``b A + c A A``, whole on every member: computed by each, or by rows and gathered."""
    if mode == "replicated":
        return torch.addmm(gram, gram, gram, beta=b, alpha=c)
    m = gram.size(0)
    chunk = -(-m // team.size)
    lo, hi = split_rows(m, team.size, team.index)
    part = gram.new_zeros(chunk, m)
    torch.addmm(gram[lo:hi], gram[lo:hi], gram, beta=b, alpha=c, out=part[: hi - lo])
    gathered = gram.new_empty(chunk * team.size, m)
    team.gather_rows(part, gathered)
    return gathered[:m]


def team_member_flops(m: int, width: int, rows: int, steps: int, mode: str) -> int:
    """Multiply-add FLOPs (2 per MAC) one member spends: ``X_i X_i^T`` and ``B X_i`` on its
    ``m x width`` block (``2 m^2 width`` each) and, per step, ``B``: all of it (``2 m^3``)
    when replicated, its ``rows`` when split (``2 rows m^2``)."""
    square = 2 * m**3 if mode == "replicated" else 2 * rows * m * m
    return steps * (4 * m * m * width + square)
