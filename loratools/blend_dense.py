"""The element-wise blend methods (TIES, DARE, magnitude prune) on dense ΔW_i, tile by tile.

The math is PEFT's `peft.utils.merge_utils` (the oracle in the tests): each task tensor is the
scaled update ΔW_i = s_i·B_i A_i; pruning and sign election act on it before the user's weight is
applied. Nothing here holds more than one row-tile of every ΔW_i at a time; the only full-size
tensor is the combined result, which `blend` then factors back to rank k.

Two places differ from a whole-tensor implementation, by design:
- magnitude pruning keeps exactly the top k = int(density·numel) elements, found by a radix select
  over the fp32 bit patterns (two histogram passes); ties at the threshold keep the earliest
  elements in row-major order (torch.topk leaves that choice unspecified).
- DARE draws its keep-mask from a generator seeded by (seed, module, adapter), in row-major order,
  so the mask does not depend on the tile size or on which other modules are blended.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
TILE_ELEMENTS = 1 << 22  # elements per tile across all inputs (16 MiB of fp32)


@dataclass
class Task:
    """One input: ΔW = coeff_scale · up @ down in the base weight's 2-D layout."""

    up: torch.Tensor    # [rows, r]
    down: torch.Tensor  # [r, cols]
    scale: float        # the adapter's own scale s_i
    weight: float       # the user's weight w_i

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        return (self.up[r0:r1].float() @ self.down.float()) * self.scale


def dare_seed(seed: int, module: str, index: int) -> int:
    """A stable per-(module, adapter) seed: the same mask whatever else is blended."""
    return (int(seed) * 1_000_003 + zlib.crc32(module.encode()) * 8191 + index) % (1 << 62)


def _tiles(rows: int, cols: int, n: int, tile_rows: Optional[int]):
    step = tile_rows or max(1, TILE_ELEMENTS // max(1, cols * n))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns: for non-negative floats the order of the bits is the order of the values."""
    return x.abs().view(torch.int32)


@dataclass
class _TopK:
    """Keep elements with bits > value, and the first `equal` of those with bits == value."""

    value: int
    equal: int
    seen: int = 0  # elements == value met so far (row-major), advanced tile by tile

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        keep = bits > self.value
        eq = bits == self.value
        n_eq = int(eq.sum())
        if n_eq:
            order = torch.cumsum(eq.reshape(-1).to(torch.int64), 0).reshape(eq.shape) + self.seen
            keep |= eq & (order <= self.equal)
            self.seen += n_eq
        return keep


def topk_thresholds(tasks: Sequence[Task], rows: int, cols: int, density: float,
                    tile_rows: Optional[int] = None) -> List[Optional[_TopK]]:
    """Per task, the exact top-k selection by |value| (k = int(density·numel)) in two passes of
    16-bit histograms over the sign-less fp32 bits. None means keep everything (density ≥ 1)."""
    if density >= 1:
        return [None] * len(tasks)
    k = int(density * rows * cols)
    n = len(tasks)
    hi_hist = torch.zeros(n, 1 << 15, dtype=torch.int64)
    for r0, r1 in _tiles(rows, cols, n, tile_rows):
        for i, t in enumerate(tasks):
            hi_hist[i] += torch.bincount((_bits(t.rows(r0, r1)) >> 16).reshape(-1), minlength=1 << 15)
    chosen = []  # (high 16 bits, how many of k lie strictly above that bucket)
    for i in range(n):
        if k == 0:
            chosen.append((1 << 15, 0))  # above every finite value: keep nothing
            continue
        above = torch.flip(torch.cumsum(torch.flip(hi_hist[i], [0]), 0), [0])  # count with hi >= b
        b = int((above >= k).nonzero().max())
        chosen.append((b, int(above[b] - hi_hist[i, b])))
    lo_hist = torch.zeros(n, 1 << 16, dtype=torch.int64)
    for r0, r1 in _tiles(rows, cols, n, tile_rows):
        for i, t in enumerate(tasks):
            if k == 0:
                continue
            bits = _bits(t.rows(r0, r1)).reshape(-1)
            low = bits[(bits >> 16) == chosen[i][0]] & 0xFFFF
            lo_hist[i] += torch.bincount(low, minlength=1 << 16)
    result: List[Optional[_TopK]] = []
    for i, (b, above_bucket) in enumerate(chosen):
        if k == 0:
            result.append(_TopK(value=0x7FFFFFFF, equal=0))
            continue
        need = k - above_bucket  # still to take inside bucket b, from the top
        above = torch.flip(torch.cumsum(torch.flip(lo_hist[i], [0]), 0), [0])
        lo = int((above >= need).nonzero().max())
        strictly_above = int(above[lo] - lo_hist[i, lo])
        result.append(_TopK(value=(b << 16) | lo, equal=need - strictly_above))
    return result


def combine(tasks: Sequence[Task], rows: int, cols: int, method: str, density: float,
            majority_sign: str = "total", seeds: Optional[Sequence[int]] = None,
            tile_rows: Optional[int] = None) -> torch.Tensor:
    """The combined dense update [rows, cols] (fp32) of `method` over `tasks`."""
    if method not in DENSE_METHODS:
        raise ValueError(f"not an element-wise method: {method}")
    n = len(tasks)
    weights = torch.tensor([t.weight for t in tasks], dtype=torch.float32).reshape(n, 1, 1)
    magnitude = method in ("ties", "magnitude_prune")
    tops = topk_thresholds(tasks, rows, cols, density, tile_rows) if magnitude else None
    gens = None
    if not magnitude and density < 1:
        gens = [torch.Generator().manual_seed(s) for s in (seeds or range(n))]
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r0, r1 in _tiles(rows, cols, n, tile_rows):
        pruned = torch.stack([t.rows(r0, r1) for t in tasks])  # [n, tile, cols]
        for i in range(n):
            if tops is not None and tops[i] is not None:
                pruned[i] *= tops[i].mask(_bits(pruned[i]))
            elif gens is not None:
                keep = torch.rand(pruned[i].shape, generator=gens[i]) < density
                pruned[i] *= keep
                pruned[i] /= density
        if method in ("ties", "dare_ties"):
            out[r0:r1] = _disjoint_merge(pruned, weights, majority_sign)
        else:
            out[r0:r1] = (pruned * weights).sum(0)
    return out


def _disjoint_merge(pruned: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES: elect a sign per element from the unweighted pruned tensors, average the weighted
    values that agree with it (PEFT's calculate_majority_sign_mask + disjoint_merge)."""
    sign = pruned.sign()
    votes = pruned.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    summed = (pruned * weights * agree).sum(0)
    return summed / agree.sum(0).clamp_min(1)


def residual_norm(target: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  tile_rows: Optional[int] = None) -> float:
    """||target - up @ down||_F, tile by tile, in fp64 accumulation."""
    rows, cols = target.shape
    total = 0.0
    for r0, r1 in _tiles(rows, cols, 1, tile_rows):
        diff = target[r0:r1] - up[r0:r1].float() @ down.float()
        total += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
    return total ** 0.5

