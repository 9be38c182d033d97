"""Low-rank linear algebra shared by blend, resize and extract. Always fp32.

The QR trick: for ΔW = B @ A with B [out, R] and A [R, in], the SVD of ΔW follows from the
SVD of the small R×R matrix R_b @ R_a.T, so no dense out×in matrix is ever built.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .errors import NonFiniteError, UsageError

RANK_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")


def _svd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; a matrix that overflowed to Inf/NaN (e.g. from huge weights) is a NonFiniteError."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        raise NonFiniteError("an update overflowed float32 (NaN or Inf) before its SVD: are the weights or scales "
                             "that large? nothing was written") from None


def lowrank_svd(up: torch.Tensor, down: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of `up @ down` from its factors: returns U [out, R], S [R], Vh [R, in] (R = inner dim)."""
    up, down = up.float(), down.float()
    qb, rb = torch.linalg.qr(up)          # up = qb rb, qb [out, R]
    qa, ra = torch.linalg.qr(down.t())    # down.T = qa ra, qa [in, R]
    # thin SVD: with full_matrices the small factors get extra columns with no singular value
    u, s, vh = _svd(rb @ ra.t())
    return qb @ u, s, vh @ qa.t()


def randomized_svd(matrix: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 2,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp randomized SVD with power iterations (fp32, re-orthonormalised
    each iteration). Returns the leading `rank + oversample` triplets, capped by the matrix size."""
    m = matrix.float()
    rows, cols = m.shape
    k = min(rank + oversample, rows, cols)
    gen = torch.Generator().manual_seed(seed)  # drawn on the host: the same test matrix on every device
    omega = torch.randn(cols, k, generator=gen, dtype=torch.float32).to(m.device)
    q, _ = torch.linalg.qr(m @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(m.t() @ q)
        q, _ = torch.linalg.qr(m @ z)
    u_small, s, vh = _svd(q.t() @ m)
    return q @ u_small, s, vh


# randomized SVD of a dense difference: extra columns drawn, and the cut-over to the exact SVD. At
# 4·(k + OVERSAMPLE) ≥ min(rows, cols) the sketch's (2·POWER_ITERS + 2) passes over the matrix cost about
# what a dense SVD does, and its error is no longer small, so the exact SVD runs there.
OVERSAMPLE, POWER_ITERS = 10, 4


def uses_exact_svd(n: int, cap: int, dynamic: Optional[str] = None, svd: str = "auto") -> bool:
    """Whether a difference with min(rows, cols) = n is factored by the exact SVD (else randomized)."""
    return svd == "exact" or (svd == "auto" and (dynamic == "sv_cumulative" or 4 * (cap + OVERSAMPLE) >= n))


def exact_svd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _svd(matrix.float())


def select_rank(s: torch.Tensor, rank: Optional[int] = None, rule: Optional[str] = None,
                param: Optional[float] = None, max_rank: Optional[int] = None) -> int:
    """How many singular values (sorted descending) to keep.

    Fixed: `rank`. Dynamic (kohya's rules): sv_ratio keeps σ_i > σ_max / p; sv_fro the smallest
    k with ||σ_:k|| ≥ p·||σ||; sv_cumulative the smallest k with Σσ_:k ≥ p·Σσ. `rank` then caps
    a dynamic choice. Never above `max_rank` (the old rank) nor len(σ), never below 1.
    """
    n = int(s.numel())
    cap = n if max_rank is None else min(n, max_rank)
    if rule is None:
        if rank is None:
            raise UsageError("give a rank or a dynamic rule")
        return max(1, min(rank, cap))
    if rule not in RANK_RULES:
        raise UsageError(f"unknown rank rule {rule!r}: use one of {', '.join(RANK_RULES)}")
    if param is None:
        raise UsageError(f"rank rule {rule} needs --param")
    s = s.double()
    if n == 0 or float(s[0]) == 0.0:
        k = 1
    elif rule == "sv_ratio":
        if param <= 0:
            raise UsageError("sv_ratio needs --param > 0")
        k = int((s > s[0] / param).sum())
    else:
        if not 0.0 <= param <= 1.0:
            raise UsageError(f"{rule} needs --param between 0 and 1")
        vals = s ** 2 if rule == "sv_fro" else s
        cum = torch.cumsum(vals, 0)
        target = param ** 2 * cum[-1] if rule == "sv_fro" else param * cum[-1]
        # tolerate round-off so a threshold met exactly is met
        k = int((cum < target * (1 - 1e-12)).sum()) + 1
    if rank is not None:
        k = min(k, rank)
    return max(1, min(k, cap))


def gram_dot(u1: torch.Tensor, d1: torch.Tensor, u2: torch.Tensor, d2: torch.Tensor) -> float:
    """<U1 D1, U2 D2>_F from r×r Gram matrices, without the dense products (use fp64 factors)."""
    return float(((u1.t() @ u2) * (d1 @ d2.t())).sum())


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U_k S_k^½, S_k^½ Vh_k): the singular values split on both sides for fp16 safety."""
    root = s[:k].clamp_min(0).sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def retained(s: torch.Tensor, k: int) -> Tuple[float, float]:
    """(Frobenius fraction, sum-of-σ fraction) kept by the first k singular values."""
    s = s.double()
    total_f = float(torch.linalg.vector_norm(s))
    total_s = float(s.sum())
    fro = float(torch.linalg.vector_norm(s[:k])) / total_f if total_f > 0 else 1.0
    sm = float(s[:k].sum()) / total_s if total_s > 0 else 1.0
    return fro, sm


def effective_alpha(scale: float, rank: int, use_rslora: bool = False) -> float:
    """The alpha that gives `scale` at `rank` (kohya's alpha' = s·r')."""
    return scale * (math.sqrt(rank) if use_rslora else rank)
