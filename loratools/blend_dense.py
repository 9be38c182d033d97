"""The element-wise blend methods (TIES, DARE, magnitude prune) on dense ΔW_i, tile by tile.

The math is PEFT's `peft.utils.merge_utils` (the oracle in the tests): each task tensor is the
scaled update ΔW_i = s_i·B_i A_i; pruning and sign election act on it before the user's weight is
applied. Memory: the combined result (which `blend` then factors back to rank k), one row-tile of
every ΔW_i, and for magnitude pruning one full |ΔW_i| at a time while its threshold is found;
never the stack of all N dense deltas and their masks that a whole-tensor implementation holds.

Two places differ from a whole-tensor implementation, by design:
- magnitude pruning keeps exactly the top k = int(density·numel) elements; the threshold comes from
  an in-place selection over one |ΔW_i| at a time; ties at the threshold keep the earliest elements
  in row-major order (torch.topk leaves that choice unspecified).
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

    def __post_init__(self) -> None:
        self.up, self.down = self.up.float(), self.down.float()

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        # (U@D)·s in this order, as PEFT's get_delta_weight: the same values decide the pruning
        return torch.mm(self.up[r0:r1], self.down).mul_(self.scale)


def dare_seed(seed: int, module: str, index: int) -> int:
    """A stable per-(module, adapter) seed: the same mask whatever else is blended."""
    return (int(seed) * 1_000_003 + zlib.crc32(module.encode()) * 8191 + index) % (1 << 62)


def _tiles(rows: int, cols: int, n: int, tile_rows: Optional[int]):
    step = tile_rows or max(1, TILE_ELEMENTS // max(1, cols * n))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


@dataclass
class _TopK:
    """Keep |x| > value, and the first `equal` elements with |x| == value (row-major order)."""

    value: float
    equal: int
    all_equal: bool = False  # every element == value is kept: one comparison suffices
    seen: int = 0  # elements == value met so far, advanced tile by tile

    def mask(self, mags: torch.Tensor) -> torch.Tensor:
        if self.all_equal:
            return mags >= self.value
        keep = mags > self.value
        eq = mags == self.value
        n_eq = int(eq.sum())
        if n_eq:
            order = torch.cumsum(eq.reshape(-1).to(torch.int64), 0).reshape(eq.shape) + self.seen
            keep |= eq & (order <= self.equal)
            self.seen += n_eq
        return keep


def topk_thresholds(tasks: Sequence[Task], rows: int, cols: int, density: float,
                    tile_rows: Optional[int] = None) -> List[Optional[_TopK]]:
    """Per task, the exact top-k selection by |value| (k = int(density·numel)); None keeps all.

    One |ΔW_i| at a time is built from the same tiles `combine` uses (so its values are bitwise
    the ones the mask is applied to) and partitioned in place (numpy introselect, O(n), no copy).
    """
    if density >= 1:
        return [None] * len(tasks)
    k = int(density * rows * cols)
    result: List[Optional[_TopK]] = []
    for t in tasks:
        if k == 0:
            result.append(_TopK(value=float("inf"), equal=0))
            continue
        mags = torch.empty(rows, cols, dtype=torch.float32)  # on the host: numpy partitions it
        for r0, r1 in _tiles(rows, cols, len(tasks), tile_rows):
            mags[r0:r1].copy_(torch.abs(t.rows(r0, r1)))
        flat = mags.view(-1).numpy()
        flat.partition(flat.size - k)  # the k largest now fill the tail, unordered
        value = float(flat[flat.size - k])
        tail = mags.view(-1)[flat.size - k:]
        above = int((tail > value).sum())
        n_equal = int((tail == value).sum()) + int((mags.view(-1)[:flat.size - k] == value).sum())
        result.append(_TopK(value=value, equal=k - above, all_equal=n_equal == k - above))
        del mags, flat
    return result


def combine(tasks: Sequence[Task], rows: int, cols: int, method: str, density: float,
            majority_sign: str = "total", seeds: Optional[Sequence[int]] = None,
            tile_rows: Optional[int] = None) -> torch.Tensor:
    """The combined dense update [rows, cols] (fp32) of `method` over `tasks`."""
    if method not in DENSE_METHODS:
        raise ValueError(f"not an element-wise method: {method}")
    n = len(tasks)
    device = tasks[0].up.device  # the tiles are built where the factors are
    weights = torch.tensor([t.weight for t in tasks], dtype=torch.float32, device=device).reshape(n, 1, 1)
    magnitude = method in ("ties", "magnitude_prune")
    tops = topk_thresholds(tasks, rows, cols, density, tile_rows) if magnitude else None
    gens = None
    if not magnitude and density < 1:
        gens = [torch.Generator().manual_seed(s) for s in (seeds or range(n))]
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    for r0, r1 in _tiles(rows, cols, n, tile_rows):
        pruned = torch.stack([t.rows(r0, r1) for t in tasks])  # [n, tile, cols]
        for i in range(n):
            if tops is not None and tops[i] is not None:
                pruned[i] *= tops[i].mask(pruned[i].abs())
            elif gens is not None:
                # drawn on the host: the same masks on every device
                keep = (torch.rand(pruned[i].shape, generator=gens[i]) < density).to(device)
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

