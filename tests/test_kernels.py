"""The compiled loratools::merge_ operator against the plain-torch oracle `merge_reference_`.

Tolerance: both sides accumulate in fp32 (in different orders) and round once, so an element may
differ from the reference by one step of the output dtype at `ref` plus the fp32 summation error
bound; beyond that, for bf16/fp16 almost every element must be bit-identical (catches truncation
or rounding between adapters, which stay within one ulp elementwise but shift many elements).
"""
from __future__ import annotations

import pytest
import torch

from loratools import ops

needs_ext = pytest.mark.skipif(not ops.HAVE_EXTENSION,
                               reason="loratools._C is not built (python setup.py build_ext --inplace)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_MIN_ULP = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |x| (x given in any float dtype), as float64."""
    _, e = torch.frexp(x.double().abs())  # |x| in [2^(e-1), 2^e)
    spacing = torch.pow(2.0, (e - 1 - _MANTISSA[dtype]).double())
    return spacing.clamp_min(_MIN_ULP[dtype])


def make_factors(rows, cols, ranks, fdtype, device="cpu", gen=None):
    ups = [torch.randn(rows, r, generator=gen).to(device, fdtype) for r in ranks]
    downs = [(torch.randn(r, cols, generator=gen) / r**0.5).to(device, fdtype) for r in ranks]
    coeffs = [0.5, -1.25, 2.0, -0.3, 0.75][: len(ranks)]
    return ups, downs, coeffs


def assert_matches_reference(out, w0, ups, downs, coeffs):
    """out: weight after merge_; w0: its value before. The oracle runs on CPU copies."""
    ref = ops.merge_reference_(w0.detach().cpu().clone(), [u.cpu() for u in ups],
                               [d.cpu() for d in downs], coeffs)
    out = out.detach().cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # fp32 accumulation-order bound: |W| + sum |c| |B| |A|, times a generous gamma_(R+2).
    mag = w0.detach().cpu().double().abs()
    for u, d, c in zip(ups, downs, coeffs):
        mag += abs(c) * (u.cpu().double().abs() @ d.cpu().double().abs())
    rank = sum(u.shape[1] for u in ups)
    tol = ulp(ref, ref.dtype) + 2 * (rank + 2) * 2.0**-24 * mag
    diff = (out.double() - ref.double()).abs()
    bad = ~((diff <= tol) | (out.double() == ref.double()) | (out.isnan() & ref.isnan()))  # inf == inf
    assert not bad.any(), (f"{int(bad.sum())} elements off by more than one step; worst "
                           f"{diff[bad].max().item()} at tol {tol[bad].min().item()}")
    if ref.dtype != torch.float32:
        # Only values whose fp32 sums straddle a rounding boundary may differ: a fraction of a
        # percent. Truncating, or rounding per adapter, moves a large share of elements.
        differ = int(((out != ref) & ~(out.isnan() & ref.isnan())).sum())
        assert differ <= 0.01 * ref.numel() + 3, f"{differ} of {ref.numel()} elements differ from the reference"


def run_op(w, ups, downs, coeffs):
    torch.ops.loratools.merge_(w, list(ups), list(downs), [float(c) for c in coeffs])
    return w


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (129, 257), (6, 16), (33, 48), (5, 1000)])
@pytest.mark.parametrize("ranks", [(), (1,), (1, 3, 8, 17)], ids=["0ad", "1ad", "4ad"])
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("fdtype", DTYPES)
def test_matches_reference(device, shape, ranks, wdtype, fdtype):
    gen = torch.Generator().manual_seed(hash((shape, ranks)) % 2**31)
    w0 = torch.randn(*shape, generator=gen).to(device, wdtype)
    ups, downs, coeffs = make_factors(*shape, ranks, fdtype, device, gen)
    out = run_op(w0.clone(), ups, downs, coeffs)
    if not ranks:
        assert torch.equal(out, w0)
    assert_matches_reference(out, w0, ups, downs, coeffs)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_large_bf16(device):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4096, 4096, generator=gen).to(device, torch.bfloat16)
    ups, downs, coeffs = make_factors(4096, 4096, (16,), torch.bfloat16, device, gen)
    assert_matches_reference(run_op(w0.clone(), ups, downs, coeffs), w0, ups, downs, coeffs)


# Views of a larger base tensor; the part of the base outside the view must not change.
VIEWS = {
    "transposed": lambda b: b.t(),
    "row_slice": lambda b: b[3:40],
    "col_slice": lambda b: b[:, 5:38],  # row stride != cols
    "strided_cols": lambda b: b[:, ::2],  # no unit stride at all
    "transposed_slice": lambda b: b.t()[2:9, 1:30],
    "single_row_strided": lambda b: b[4, ::3].unsqueeze(0),
}


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("wdtype", DTYPES)
def test_noncontiguous_weight(device, view, wdtype):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(45, 70, generator=gen).to(device, wdtype)
    base0 = base.clone()
    w = VIEWS[view](base)
    w0 = w.clone()
    ups, downs, coeffs = make_factors(*w.shape, (3, 5), torch.float32, device, gen)
    run_op(w, ups, downs, coeffs)
    assert_matches_reference(w, w0, ups, downs, coeffs)
    outside = torch.ones_like(base, dtype=torch.bool)
    VIEWS[view](outside).fill_(False)
    assert torch.equal(base[outside], base0[outside])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fdtype", DTYPES)
def test_noncontiguous_factors(device, fdtype):
    gen = torch.Generator().manual_seed(3)
    rows, cols = 37, 53
    w0 = torch.randn(rows, cols, generator=gen).to(device, torch.bfloat16)
    ups = [torch.randn(4, rows, generator=gen).to(device, fdtype).t(),  # PEFT fan_in_fan_out style
           torch.randn(rows, 12, generator=gen).to(device, fdtype)[:, ::3]]
    downs = [torch.randn(cols, 4, generator=gen).to(device, fdtype).t(),
             torch.randn(8, 2 * cols, generator=gen).to(device, fdtype)[1:5, ::2]]
    assert not any(t.is_contiguous() for t in ups + downs)
    out = run_op(w0.clone(), ups, downs, [1.5, -0.7])
    assert_matches_reference(out, w0, ups, downs, [1.5, -0.7])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_rounds_once_to_nearest_even(device, wdtype):
    step = 2.0 ** -_MANTISSA[wdtype]  # spacing just above 1.0
    one = torch.ones(3, 17, dtype=wdtype, device=device)
    col = torch.ones(3, 1, device=device)
    # An exact tie between 1+step (odd) and 1+2*step (even) must go to the even one.
    tie = run_op(one.clone(), [col], [torch.full((1, 17), 1.5 * step, device=device)], [1.0])
    assert torch.all(tie.float() == 1 + 2 * step)
    # Four updates of 0.3 step each: 1.2 steps in total; rounding after every adapter would lose all.
    ups = [col] * 4
    downs = [torch.full((1, 17), 0.3 * step, device=device)] * 4
    once = run_op(one.clone(), ups, downs, [1.0] * 4)
    assert torch.all(once.float() == 1 + step)
    assert_matches_reference(once, one, ups, downs, [1.0] * 4)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", DTYPES)
def test_nan_and_inf_propagate(device, wdtype):
    w0 = torch.zeros(6, 20, dtype=wdtype, device=device)
    w0[0, 0], w0[1, 3], w0[2, 17] = float("nan"), float("inf"), -float("inf")
    ups, downs, coeffs = make_factors(6, 20, (2,), torch.float32, device)
    out = run_op(w0.clone(), ups, downs, coeffs)
    assert out[0, 0].isnan() and out[1, 3] == float("inf") and out[2, 17] == -float("inf")
    assert_matches_reference(out, w0, ups, downs, coeffs)


@needs_ext
@pytest.mark.parametrize("wdtype", DTYPES)
def test_factors_aliasing_weight(wdtype):
    # B is a view of W itself: the op must read all factors before it writes W, like the oracle.
    w0 = torch.randn(24, 40).to(wdtype)
    w = w0.clone()
    ups, downs = [w[:, :3]], [torch.randn(3, 40)]
    run_op(w, ups, downs, [0.5])
    assert_matches_reference(w, w0, [w0[:, :3]], downs, [0.5])


@needs_ext
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (129, 257)])
def test_portable_cpu_path(monkeypatch, wdtype, shape):
    # The plain C++ tiles run on CPUs without AVX2/FMA/F16C; force them here.
    monkeypatch.setenv("LORATOOLS_CPU_KERNEL", "portable")
    w0 = torch.randn(*shape).to(wdtype)
    ups, downs, coeffs = make_factors(*shape, (1, 3, 8, 17), torch.bfloat16)
    assert_matches_reference(run_op(w0.clone(), ups, downs, coeffs), w0, ups, downs, coeffs)


@needs_ext
def test_public_merge_uses_operator(monkeypatch):
    monkeypatch.setattr(ops, "merge_reference_", lambda *a: pytest.fail("fell back to reference"))
    w0 = torch.randn(9, 11).bfloat16()
    ups, downs, coeffs = make_factors(9, 11, (2,), torch.float32)
    w = w0.clone()
    assert ops.merge_(w, ups, downs, coeffs) is w
    assert not torch.equal(w, w0)


@needs_ext
@pytest.mark.parametrize("bad", ["rank", "rows", "dtype", "count", "dims"])
def test_operator_rejects_bad_arguments(bad):
    w = torch.zeros(4, 5)
    ups, downs, coeffs = [torch.zeros(4, 2)], [torch.zeros(2, 5)], [1.0]
    if bad == "rank":
        downs = [torch.zeros(3, 5)]
    elif bad == "rows":
        ups = [torch.zeros(5, 2)]
    elif bad == "dtype":
        w = torch.zeros(4, 5, dtype=torch.float64)
    elif bad == "count":
        coeffs = [1.0, 2.0]
    else:
        w = torch.zeros(4, 5, 1)
    with pytest.raises(RuntimeError, match="merge_"):
        run_op(w, ups, downs, coeffs)


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(4)
    out = []
    for wdtype, fdtype, shape, ranks in [(torch.float32, torch.float32, (8, 12), (2,)),
                                         (torch.bfloat16, torch.float16, (17, 33), (1, 4)),
                                         (torch.float16, torch.bfloat16, (5, 7), (3, 3, 1))]:
        w = torch.randn(*shape, generator=gen).to(device, wdtype)
        ups, downs, coeffs = make_factors(*shape, ranks, fdtype, device, gen)
        out.append((w, ups, downs, coeffs))
    base = torch.randn(20, 9, generator=gen).to(device)
    ups, downs, coeffs = make_factors(9, 20, (2,), torch.float32, device, gen)
    out.append((base.t(), ups, downs, coeffs))  # non-contiguous weight
    return out


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # All of opcheck's checks apply (schema, autograd registration, fake tensor, AOT dispatch):
    # the op mutates `weight`, which functionalization handles, and returns nothing.
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.loratools.merge_, args)


def test_fallback_warns_and_uses_reference(monkeypatch):
    calls = []
    real = ops.merge_reference_

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "HAVE_EXTENSION", False)
    monkeypatch.setattr(ops, "_warned", False)
    monkeypatch.setattr(ops, "merge_reference_", spy)
    w = torch.zeros(3, 4, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="not built"):
        ops.merge_(w, [torch.ones(3, 1)], [torch.ones(1, 4)], [2.0])
    assert calls and torch.all(w == 2.0)


@needs_ext
@pytest.mark.parametrize("wdtype", DTYPES)
def test_all_finite_matches_isfinite(wdtype):
    """The compiled check against torch.isfinite: Inf/NaN anywhere (block edges, the tail), any
    layout; the largest finite values and subnormals are finite."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4096 + 77, generator=gen).to(wdtype)
    info = torch.finfo(wdtype)
    x[0, :4] = torch.tensor([info.max, -info.max, info.tiny / 4, -0.0])
    assert torch.ops.loratools.all_finite(x) and ops.all_finite(x) and ops.all_finite(x.t())
    for pos in (0, 4095, 4096, x.numel() - 1, 5000):
        for bad in (float("inf"), -float("inf"), float("nan")):
            y = x.clone()
            y.view(-1)[pos] = bad
            assert bool(torch.isfinite(y).all()) is False
            assert not torch.ops.loratools.all_finite(y) and not ops.all_finite(y) and not ops.all_finite(y.t())
    assert ops.all_finite(torch.empty(0, 5, dtype=wdtype))
