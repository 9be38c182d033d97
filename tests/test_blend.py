"""`loratools.blend` against dense torch references: cat is exact, svd is the optimal rank-k
approximation of the exact weighted sum, the report is right, errors are one line."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from _tiny import assert_close_rel
from loratools import LoraAdapter, LoraModule, read_adapter, write_adapter
from loratools.blending import blend, quantile
from loratools.cli.main import main
from loratools.errors import IncompatibleError, NonFiniteError, ShapeMismatchError, UsageError

# name -> (kind, weight shape, fan_in_fan_out)
LAYOUT = {"lin.a": ("linear", (12, 10), False), "lin.b": ("linear", (9, 14), False),
          "conv": ("conv", (6, 4, 3, 3), False), "emb": ("embedding", (20, 8), False),
          "c1d": ("linear", (10, 7), True)}


def module(name, rank, g, alpha=None, rslora=False, dtype=torch.float32):
    kind, shape, fifo = LAYOUT[name]
    if kind == "conv":
        down, up = torch.randn(rank, *shape[1:], generator=g), torch.randn(shape[0], rank, 1, 1, generator=g)
    elif kind == "embedding":
        down, up = torch.randn(rank, shape[0], generator=g), torch.randn(shape[1], rank, generator=g)
    elif fifo:
        down, up = torch.randn(rank, shape[0], generator=g), torch.randn(shape[1], rank, generator=g)
    else:
        down, up = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
    return LoraModule(name, down=down.to(dtype), up=up.to(dtype), alpha=alpha, kind=kind, use_rslora=rslora,
                      fan_in_fan_out=fifo)


def adapter(names, rank, seed, alpha=None, rslora=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(modules={n: module(n, rank, g, alpha, rslora, dtype) for n in names}, format="peft")


def make_three(extra=("c1d",)):
    """Different ranks, alphas, rsLoRA flags and module sets; weights of both signs."""
    a = adapter(["lin.a", "lin.b", "conv", "emb", *extra], 2, 1, alpha=4)
    b = adapter(["lin.a", "conv", "emb", *extra], 3, 2, alpha=1.5, rslora=True)
    c = adapter(["lin.a", "lin.b", "emb", *extra], 5, 3)
    return [a, b, c], [0.5, -0.8, 1.2]


@pytest.fixture
def three():
    return make_three()


@pytest.fixture
def three_peft():
    """PEFT cannot hold a fan_in_fan_out module beside plain linears."""
    return make_three(extra=())


def exact_sum(adapters, weights, name):
    return sum(w * a.modules[name].dense_delta() for a, w in zip(adapters, weights) if name in a.modules)


def test_cat_equals_dense_weighted_sum(three):
    adapters, weights = three
    out, report = blend(adapters, weights, method="cat")
    assert set(out.modules) == set(LAYOUT)
    for name, m in out.modules.items():
        assert m.kind == LAYOUT[name][0] and m.dense_delta().shape == LAYOUT[name][1]
        assert m.rank == sum(a.modules[name].rank for a in adapters if name in a.modules)
        assert_close_rel(m.dense_delta(), exact_sum(adapters, weights, name), 1e-6, name)
    for r in report.modules:
        assert r.rel_error < 1e-6 and abs(r.retained - 1) < 1e-6
        assert r.ranks_in == [a.modules[r.name].rank if r.name in a.modules else 0 for a in adapters]


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_reaches_the_optimal_rank_k_error(three, rank):
    adapters, weights = three
    out, report = blend(adapters, weights, method="svd", rank=rank)
    for r in report.modules:
        target = exact_sum(adapters, weights, r.name)
        t2 = target.reshape(target.shape[0], -1)
        u, s, vh = torch.linalg.svd(t2.double(), full_matrices=False)
        k = min(rank, sum(x for x in r.ranks_in))
        best = (u[:, :k] * s[:k]) @ vh[:k]
        ours = out.modules[r.name].dense_delta().reshape(t2.shape).double()
        opt_err = float(s[k:].norm())
        our_err = float((ours - t2).norm())
        assert our_err <= opt_err * (1 + 1e-4) + 1e-5 * float(s.norm()), r.name
        # random spectra have gaps, so the optimal reconstruction is unique: compare it, never U/V
        assert_close_rel(ours, best, 1e-4, r.name)
        assert abs(r.error - our_err) <= 1e-4 * float(s.norm())
        assert abs(r.retained - float(s[:k].norm() / s.norm())) < 1e-5
        assert out.modules[r.name].rank == k


def test_linear_is_peft_factor_averaging():
    a = adapter(["lin.a", "emb"], 3, 4, alpha=6)
    b = adapter(["lin.a", "emb"], 3, 5, alpha=2)
    w = [0.6, -0.9]
    out, report = blend([a, b], w, method="linear")
    for name in ("lin.a", "emb"):
        ca, cb = w[0] * a.modules[name].scale, w[1] * b.modules[name].scale
        down = (abs(ca) ** 0.5 * a.modules[name].down - abs(cb) ** 0.5 * b.modules[name].down)
        up = abs(ca) ** 0.5 * a.modules[name].up + abs(cb) ** 0.5 * b.modules[name].up
        torch.testing.assert_close(out.modules[name].down, down)
        torch.testing.assert_close(out.modules[name].up, up)
    assert all(r.rel_error > 0.1 for r in report.modules)  # the cross terms: approximate, and reported
    with pytest.raises(UsageError, match="equal ranks"):
        blend([a, adapter(["lin.a"], 2, 6)], method="linear")


def test_clamp_matches_kohya_on_a_dense_reference():
    a = adapter(["lin.a"], 4, 7)
    b = adapter(["lin.a"], 3, 8)
    out, _ = blend([a, b], [1.0, 0.5], method="svd", rank=3, clamp=0.9)
    target = exact_sum([a, b], [1.0, 0.5], "lin.a")
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    u, vh = u[:, :3], vh[:3]
    sign = torch.sign(u[u.abs().argmax(0), torch.arange(3)])  # the sign convention loratools documents
    us, vh = u * sign * s[:3], vh * sign[:, None]
    hi = torch.quantile(torch.cat([us.flatten(), vh.flatten()]), 0.9)
    ref = us.clamp(-hi, hi) @ vh.clamp(-hi, hi)
    torch.testing.assert_close(out.modules["lin.a"].dense_delta(), ref, rtol=1e-4, atol=1e-5)


def test_quantile_matches_torch_and_has_no_size_limit():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.37, 0.5, 0.99, 1.0):
        assert quantile(x, q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-6, abs=1e-7)
    big = torch.rand(17_000_000, generator=torch.Generator().manual_seed(1))  # torch.quantile refuses > 16M
    assert quantile(big, 0.99) == pytest.approx(float(np.quantile(big.numpy(), 0.99)), rel=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_dense_methods_factor_back_with_the_reported_error(three, method, svd):
    adapters, weights = three
    out, report = blend(adapters, weights, method=method, density=0.5, rank=4, svd=svd, seed=3)
    full, _ = blend(adapters, weights, method=method, density=0.5, rank=64, svd="exact", seed=3)
    for r in report.modules:
        dense = full.modules[r.name].dense_delta()  # rank ≥ min(rows, cols): the element-wise result itself
        d2 = dense.reshape(dense.shape[0], -1).double()
        s = torch.linalg.svd(d2).S
        ours = out.modules[r.name].dense_delta().reshape(d2.shape).double()
        err = float((ours - d2).norm())
        assert abs(r.error - err) <= 1e-4 * float(d2.norm())
        assert abs(r.norm_target - float(d2.norm())) <= 1e-5 * float(d2.norm())
        assert err <= float(s[4:].norm()) * (1.02 if svd == "randomized" else 1 + 1e-4) + 1e-6


def test_per_module_rank_and_alpha_survive_a_peft_round_trip(three_peft, tmp_path):
    adapters, weights = three_peft
    out, _ = blend(adapters, weights, method="svd", rank=6, output=tmp_path / "o")
    cfg = json.load(open(tmp_path / "o" / "adapter_config.json"))
    # conv is in two adapters only: its sum has rank 2 + 3 < 6, and keeps it (with alpha = rank)
    assert cfg["r"] == 6 and cfg["rank_pattern"] == {"conv": 5} and cfg["alpha_pattern"] == {"conv": 5}
    back = read_adapter(tmp_path / "o")
    for name, m in out.modules.items():
        assert back.modules[name].rank == m.rank
        torch.testing.assert_close(back.modules[name].dense_delta(), m.dense_delta())


def test_dora_is_refused(three):
    adapters, _ = three
    m = adapters[0].modules["lin.a"]
    m.magnitude = torch.ones(12)
    with pytest.raises(IncompatibleError, match="DoRA"):
        blend(adapters, method="svd")


def test_bad_inputs_are_refused_before_writing(three, tmp_path):
    adapters, weights = three
    other = adapter(["lin.a"], 2, 9)
    other.modules["lin.a"] = LoraModule("lin.a", torch.randn(2, 11), torch.randn(12, 2))
    with pytest.raises(ShapeMismatchError, match="lin.a"):
        blend([adapters[0], other], output=tmp_path / "x")
    for kw, msg in [(dict(method="ties"), "needs --density"), (dict(method="svd", density=0.5), "applies only"),
                    (dict(method="ties", density=1.5), r"\(0, 1\]"), (dict(method="cat", rank=3), "does not apply"),
                    (dict(method="svd", svd="exact"), "applies only"), (dict(method="nope"), "unknown method"),
                    (dict(method="linear", clamp=0.9), "clamp")]:
        with pytest.raises(UsageError, match=msg):
            blend(adapters, weights, output=tmp_path / "x", **kw)
    nan = adapter(["lin.a"], 2, 10)
    nan.modules["lin.a"].up[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        blend([nan], output=tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_extras_are_carried_only_when_identical(three):
    adapters, _ = three
    for a in adapters:
        a.extra["lm_head.weight"] = torch.ones(3, 3)
    out, _ = blend(adapters, method="cat")
    assert torch.equal(out.extra["lm_head.weight"], torch.ones(3, 3))
    adapters[1].extra["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(IncompatibleError, match="modules_to_save"):
        blend(adapters, method="cat")


def test_cli_weights_report_and_errors(three_peft, tmp_path, capsys):
    adapters, _ = three_peft
    paths = []
    for i, a in enumerate(adapters):
        paths.append(str(tmp_path / f"in{i}"))
        write_adapter(a, paths[-1])
    args = ["blend", f"{paths[0]}:0.5", f"{paths[1]}:-0.8", f"{paths[2]}:1.2", "-o", str(tmp_path / "o"), "-q"]
    assert main(args + ["--method", "svd", "--rank", "3", "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["weights"] == [0.5, -0.8, 1.2] and len(rep["modules"]) == len(LAYOUT) - 1
    assert 0 < rep["totals"]["retained"] <= 1 and rep["totals"]["rank_out"] == sum(m["rank_out"] for m in rep["modules"])
    lib, _ = blend(adapters, [0.5, -0.8, 1.2], method="svd", rank=3)
    for name, m in read_adapter(tmp_path / "o").modules.items():
        torch.testing.assert_close(m.dense_delta(), lib.modules[name].dense_delta())
    before = open(tmp_path / "o" / "adapter_model.safetensors", "rb").read()
    assert main(args + ["--method", "cat"]) == 1  # exists, no --overwrite
    err = capsys.readouterr().err
    assert err.startswith("loratools: error:") and len(err.strip().splitlines()) == 1
    assert open(tmp_path / "o" / "adapter_model.safetensors", "rb").read() == before
    assert main(args[:-1] + ["--method", "cat", "--overwrite"]) == 0  # without -q: the report table
    assert "TOTAL" in capsys.readouterr().err
    assert main(["blend", f"{paths[0]}:x", "-o", str(tmp_path / "p")]) == 2
    assert main(["blend", paths[0], "--method", "ties", "-o", str(tmp_path / "p")]) == 2
    assert main(["blend", str(tmp_path / "missing"), "-o", str(tmp_path / "p")]) == 1
    assert not os.path.exists(tmp_path / "p")
