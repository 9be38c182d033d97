"""The element-wise blend methods against PEFT's `peft.utils.merge_utils` on the dense deltas."""
from __future__ import annotations

import pytest
import torch

from loratools.blend_dense import Task, combine, dare_seed, topk_thresholds

merge_utils = pytest.importorskip("peft.utils.merge_utils")


def tasks(rows=23, cols=17, ranks=(3, 5, 2), weights=(0.7, -0.4, 1.3), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, w in zip(ranks, weights):
        out.append(Task(torch.randn(rows, r, generator=g), torch.randn(r, cols, generator=g),
                        scale=float(torch.rand(1, generator=g)) + 0.5, weight=w))
    return out


def dense(ts):
    return [(t.up @ t.down) * t.scale for t in ts]


@pytest.mark.parametrize("tile_rows", [None, 4])
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.75])
def test_ties_matches_peft(tile_rows, sign, density):
    ts = tasks()
    ours = combine(ts, 23, 17, "ties", density, sign, tile_rows=tile_rows)
    ref = merge_utils.ties(dense(ts), torch.tensor([t.weight for t in ts]), density, sign)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tile_rows", [None, 3])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_matches_peft(tile_rows, density):
    ts = tasks(seed=1)
    ours = combine(ts, 23, 17, "magnitude_prune", density, tile_rows=tile_rows)
    ref = merge_utils.magnitude_prune(dense(ts), torch.tensor([t.weight for t in ts]), density)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def our_masks(ts, rows, cols, density, seeds):
    """The keep-masks `combine` draws: uniform numbers in row-major order from a seeded generator."""
    return [(torch.rand(rows, cols, generator=torch.Generator().manual_seed(s)) < density).float() for s in seeds]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("tile_rows", [None, 5])
def test_dare_matches_peft_given_the_same_masks(method, tile_rows, monkeypatch):
    """PEFT draws its masks with torch.bernoulli from the global RNG; hand it ours so that the rest of
    the method (rescale by 1/density, sign election, disjoint merge) is compared exactly."""
    ts = tasks(seed=2)
    density = 0.6
    seeds = [dare_seed(7, "layer.q", i) for i in range(len(ts))]
    ours = combine(ts, 23, 17, method, density, "total", seeds=seeds, tile_rows=tile_rows)
    masks = iter(our_masks(ts, 23, 17, density, seeds))
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(masks))
    weights = torch.tensor([t.weight for t in ts])
    if method == "dare_linear":
        ref = merge_utils.dare_linear(dense(ts), weights, density)
    else:
        ref = merge_utils.dare_ties(dense(ts), weights, density, "total")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_dare_mask_statistics_and_reproducibility():
    ts = tasks(rows=200, cols=150, ranks=(4,), weights=(1.0,), seed=3)
    full = dense(ts)[0]
    a = combine(ts, 200, 150, "dare_linear", 0.3, seeds=[11])
    b = combine(ts, 200, 150, "dare_linear", 0.3, seeds=[11], tile_rows=7)
    c = combine(ts, 200, 150, "dare_linear", 0.3, seeds=[12])
    assert torch.equal(a != 0, b != 0)  # the tile size does not change the mask
    torch.testing.assert_close(a, b)  # (only the matmul rounding of a tile may differ)
    assert not torch.equal(a, c)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(a[kept], full[kept] / 0.3)


def test_dare_seed_is_per_module_and_adapter():
    assert len({dare_seed(0, "a", 0), dare_seed(0, "a", 1), dare_seed(0, "b", 0), dare_seed(1, "a", 0)}) == 4


def test_topk_keeps_exactly_k_with_ties_at_the_threshold():
    # many equal magnitudes (and both signs) straddle the k-th value
    up = torch.tensor([[1.0], [-1.0], [2.0], [1.0], [-3.0], [1.0]])
    down = torch.tensor([[1.0, -1.0, 0.5]])
    t = Task(up, down, 1.0, 1.0)
    values = (up @ down).abs()
    for density in (0.1, 0.3, 0.5, 0.6, 0.9):
        for tile_rows in (None, 1, 4):
            (sel,) = topk_thresholds([t], 6, 3, density, tile_rows)
            keep = torch.cat([sel.mask(t.rows(r, min(6, r + (tile_rows or 6))).abs())
                              for r in range(0, 6, tile_rows or 6)])
            k = int(density * 18)
            assert int(keep.sum()) == k
            if k:  # every kept value is >= every dropped one
                assert values[keep].min() >= values[~keep].max()


def test_topk_large_values_and_zero_density():
    g = torch.Generator().manual_seed(4)
    t = Task(torch.randn(40, 3, generator=g) * 1e30, torch.randn(3, 30, generator=g), 1.0, 1.0)
    (sel,) = topk_thresholds([t], 40, 30, 0.25)
    vals = t.rows(0, 40).abs()
    keep = sel.mask(t.rows(0, 40).abs())
    assert int(keep.sum()) == 300
    assert torch.equal(vals[keep].sort().values, vals.flatten().topk(300).values.sort().values)
    (none,) = topk_thresholds([t], 40, 30, 0.01)  # int(0.01·1200) = 12
    assert int(none.mask(t.rows(0, 40).abs()).sum()) == 12
