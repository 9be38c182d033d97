"""resize: optimal rank-k truncation (oracle: dense torch.linalg.svd), dynamic rules, formats
(oracle: PEFT loading and merging the written adapter), CLI reports and errors."""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import pytest
import torch
from torch import nn

from loratools import read_adapter, safetensors_io
from loratools.adapter import LoraAdapter, LoraModule
from loratools.cli.main import main
from loratools.errors import NonFiniteError, UsageError
from loratools.linalg import select_rank
from loratools.resizing import resize, resize_module

warnings.filterwarnings("ignore", message=".*loratools._C is not built.*")


def make_module(kind: str, rank: int = 8, seed: int = 0, **kw) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "conv":
        return LoraModule("m", r(rank, 5, 3, 3), r(7, rank, 1, 1), alpha=4.0, kind="conv", **kw)
    if kind == "tucker":
        return LoraModule("m", r(rank, 5, 1, 1), r(7, rank, 1, 1), alpha=4.0, kind="conv", mid=r(rank, rank, 3, 3))
    if kind == "embedding":
        return LoraModule("m", r(rank, 30), r(12, rank), alpha=16.0, kind="embedding", **kw)
    return LoraModule("m", r(rank, 24), r(40, rank), alpha=16.0, **kw)


def delta_2d(m: LoraModule) -> torch.Tensor:
    """The dense update as the matrix whose SVD truncation is optimal (fp64)."""
    d = m.dense_delta().double()
    return d.t() if m.kind == "embedding" else d.reshape(d.shape[0], -1)


KINDS = [("linear", {}), ("linear", {"use_rslora": True}), ("linear", {"fan_in_fan_out": True}),
         ("conv", {}), ("tucker", {}), ("embedding", {})]


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_fixed_rank_is_the_optimal_truncation(kind, kw, k):
    m = make_module(kind, **kw)
    new, rep = resize_module(m, rank=k)
    assert new.rank == rep.new_rank == k and rep.old_rank == 8
    assert new.kind == m.kind and new.weight_shape == m.dense_delta().shape
    d = delta_2d(m)
    s = torch.linalg.svdvals(d)
    optimal = float(torch.linalg.vector_norm(s[k:]))
    err = float(torch.linalg.norm(delta_2d(new) - d))
    assert abs(err - optimal) <= 1e-4 * optimal
    assert rep.fro_retained == pytest.approx(float(s[:k].norm() / s.norm()), rel=1e-5)
    assert rep.sum_retained == pytest.approx(float(s[:k].sum() / s.sum()), rel=1e-5)
    assert rep.sv_ratio == pytest.approx(float(s[0] / s[k - 1]), rel=1e-4)
    assert new.scale == pytest.approx(m.scale, rel=1e-12)  # alpha follows the rank


@pytest.mark.parametrize("kind,kw", KINDS)
def test_same_rank_reproduces_the_update(kind, kw):
    m = make_module(kind, **kw)
    new, rep = resize_module(m, rank=8)
    d = delta_2d(m)
    assert new.rank == min(8, *d.shape) and rep.fro_retained == pytest.approx(1.0)  # conv: out = 7 < 8
    assert float(torch.linalg.norm(delta_2d(new) - d)) <= 1e-5 * float(torch.linalg.norm(d))


def test_rank_above_old_rank_and_rank_one_modules():
    m = make_module("linear", rank=4)
    new, rep = resize_module(m, rank=64)
    assert new.rank == 4 and rep.new_rank == 4
    one = make_module("linear", rank=1)
    for kw in ({"rank": 8}, {"dynamic": "sv_fro", "param": 1.0}, {"dynamic": "sv_ratio", "param": 1000.0}):
        assert resize_module(one, **kw)[0].rank == 1
    # stored rank 6 but a rank-1 product: every dynamic rule finds rank 1
    u, v = torch.randn(40, 1), torch.randn(1, 24)
    hidden = LoraModule("h", torch.cat([v * (i + 1) for i in range(6)]), torch.cat([u] * 6, 1) / 21)
    for rule, p in (("sv_fro", 0.999), ("sv_cumulative", 0.999), ("sv_ratio", 100.0)):
        new, _ = resize_module(hidden, rank=6, dynamic=rule, param=p)
        assert new.rank == 1
        assert torch.allclose(new.dense_delta(), hidden.dense_delta(), atol=1e-5)


@pytest.mark.parametrize("kw", [{"rank": 2}, {"dynamic": "sv_fro", "param": 0.9}])
def test_zero_module(kw):
    zero = LoraModule("z", torch.randn(4, 10), torch.zeros(12, 4), alpha=8.0)  # PEFT's init: B = 0
    new, rep = resize_module(zero, **kw)
    assert new.rank == (2 if "rank" in kw else 1)
    assert torch.equal(new.dense_delta(), torch.zeros(12, 10))
    assert rep.fro_retained == 1.0 and rep.sv_ratio is None
    assert torch.isfinite(new.up).all() and torch.isfinite(new.down).all()


@pytest.mark.parametrize("s,rule,p,k", [
    ([4, 2, 1, 1], "sv_ratio", 2.0, 1),        # σ = σ_max/p exactly is not kept (strict >)
    ([4, 2, 1, 1], "sv_ratio", 4.0, 2),
    ([4, 2, 1, 1], "sv_ratio", 4.0001, 4),
    ([4, 3], "sv_fro", 0.8, 1),                # ||σ_:1|| = 4 = 0.8·5 exactly: met
    ([4, 3], "sv_fro", 0.8000001, 2),
    ([2, 1, 1], "sv_cumulative", 0.5, 1),      # Σσ_:1 = 2 = 0.5·4 exactly: met
    ([2, 1, 1], "sv_cumulative", 0.75, 2),
    ([2, 1, 1], "sv_cumulative", 0.7500001, 3),
    ([2, 1, 1], "sv_cumulative", 1.0, 3),
    ([2, 1, 0], "sv_cumulative", 1.0, 2),      # a zero σ adds nothing: not kept
    ([2, 1, 1], "sv_fro", 0.0, 1),             # never below 1
    ([0, 0, 0], "sv_fro", 0.9, 1),
    ([0, 0, 0], "sv_ratio", 2.0, 1),
])
def test_dynamic_rules_on_the_boundary(s, rule, p, k):
    assert select_rank(torch.tensor(s, dtype=torch.float64), rule=rule, param=p) == k


def brute_force_rank(s: torch.Tensor, rule: str, p: float) -> int:
    """The smallest k meeting the rule, by checking every k (the definition, written plainly)."""
    s = s.double()
    for k in range(1, len(s) + 1):
        if rule == "sv_ratio" and (k == len(s) or s[k] <= s[0] / p):
            return k
        if rule == "sv_fro" and s[:k].norm() >= p * s.norm():
            return k
        if rule == "sv_cumulative" and s[:k].sum() >= p * s.sum():
            return k
    return len(s)


@pytest.mark.parametrize("rule,params", [("sv_ratio", [1.5, 3, 10]), ("sv_fro", [0.5, 0.8, 0.95]),
                                         ("sv_cumulative", [0.3, 0.7, 0.9])])
def test_dynamic_rank_matches_the_dense_spectrum(rule, params):
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        decay = torch.exp(-torch.arange(16.0) / 3)  # a decaying spectrum, like trained LoRAs
        m = LoraModule("m", torch.randn(16, 50, generator=g), torch.randn(60, 16, generator=g) * decay, alpha=8.0)
        s = torch.linalg.svdvals(delta_2d(m))[:16]
        for p in params:
            new, rep = resize_module(m, dynamic=rule, param=p)
            assert new.rank == brute_force_rank(s, rule, p)
            capped, _ = resize_module(m, rank=2, dynamic=rule, param=p)  # --rank caps a dynamic choice
            assert capped.rank == min(2, new.rank)


def test_dtype_and_dora_magnitude_are_kept():
    m = make_module("linear")
    m = LoraModule("m", m.down.bfloat16(), m.up.bfloat16(), alpha=16.0, magnitude=torch.rand(40) + 1)
    new, _ = resize_module(m, rank=4)
    assert new.down.dtype == new.up.dtype == torch.bfloat16
    assert new.magnitude is m.magnitude


def test_non_finite_module_is_refused(tmp_path):
    m = make_module("linear")
    m.up[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        resize(LoraAdapter({"m": m}), tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()


# ---- PEFT in and out, checked by PEFT itself ----

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.lin1 = nn.Linear(16, 24)
        self.lin2 = nn.Linear(24, 10)

    def forward(self, ids, img):
        x = self.emb(ids).mean(1) + self.conv(img).mean((2, 3))
        return self.lin2(torch.relu(self.lin1(x)))


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Tiny().eval()
    folder = str(tmp_path_factory.mktemp("peft") / "adapter")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["emb", "conv", "lin1", "lin2"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # a decaying spectrum in every module, so dynamic ranks differ
        bs = [p for name, p in model.named_parameters() if "lora_B" in name or "lora_embedding_B" in name]
        for i, p in enumerate(bs):
            p.mul_(torch.exp(-torch.arange(8.0) / (0.5 + i)).reshape((1, 8) + (1,) * (p.dim() - 2)))
    model.save_pretrained(folder)
    # a custom safetensors metadata entry that must survive
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors, meta = safetensors_io.load(path)
    safetensors_io.save(path, tensors, dict(meta, note="kept"))
    return base, folder


def peft_merged(base: nn.Module, folder: str) -> dict:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload().state_dict()


@pytest.mark.parametrize("args", [["--rank", "4", "--conv-rank", "2"], ["--dynamic", "sv_fro", "--param", "0.9"]])
def test_peft_in_and_out_checked_by_peft(peft_adapter, tmp_path, args):
    base, folder = peft_adapter
    out = str(tmp_path / "resized")
    assert main(["resize", folder, "-o", out, "-q", "--format", "json"] + args) == 0
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    ranks = {n: m.rank for n, m in read_adapter(out).modules.items()}
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]  # ranks differ: PEFT needs patterns
    assert config["base_model_name_or_path"] == json.load(open(os.path.join(folder, "adapter_config.json")))[
        "base_model_name_or_path"]
    assert safetensors_io.SafetensorsFile(os.path.join(out, "adapter_model.safetensors")).metadata["note"] == "kept"
    # the oracle: PEFT's own merge of the original and of the resized adapter
    w0, orig, new = base.state_dict(), peft_merged(base, folder), peft_merged(base, out)
    for name, k in ranks.items():
        key = name + ".weight"
        d_orig, d_new = (orig[key] - w0[key]).double(), (new[key] - w0[key]).double()
        if name == "emb":
            d_orig, d_new = d_orig.t(), d_new.t()
        d_orig, d_new = d_orig.reshape(d_orig.shape[0], -1), d_new.reshape(d_new.shape[0], -1)
        s = torch.linalg.svdvals(d_orig)
        optimal = float(s[k:].norm())
        assert abs(float((d_new - d_orig).norm()) - optimal) <= 1e-4 * float(s.norm())
        if "--dynamic" in args:
            assert k == brute_force_rank(s[:8], "sv_fro", 0.9)
    if "--rank" in args:
        assert ranks == {"emb": 4, "conv": 2, "lin1": 4, "lin2": 4}


def test_resize_to_same_rank_round_trips_peft(peft_adapter, tmp_path):
    base, folder = peft_adapter
    out = resize(folder, tmp_path / "same", rank=8).output
    orig, new = peft_merged(base, folder), peft_merged(base, out)
    for key in orig:
        assert torch.allclose(orig[key], new[key], atol=1e-5, rtol=1e-5), key


# ---- CLI: reports, plot, errors ----

def test_cli_json_report(peft_adapter, tmp_path, capsys):
    _, folder = peft_adapter
    assert main(["resize", folder, "-o", str(tmp_path / "o"), "--rank", "3", "--format", "json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in report["modules"]} == {"emb", "conv", "lin1", "lin2"}
    for m in report["modules"]:
        assert m["old_rank"] == 8 and m["new_rank"] == 3 and 0 < m["fro_retained"] < 1 and m["sv_ratio"] >= 1
    avg = sum(m["fro_retained"] for m in report["modules"]) / 4
    assert report["average_fro_retained"] == pytest.approx(avg)


def test_cli_table_and_plot(peft_adapter, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, folder = peft_adapter
    png = tmp_path / "spectra.png"
    assert main(["resize", folder, "-o", str(tmp_path / "o"), "--dynamic", "sv_ratio", "--param", "4",
                 "--plot", str(png)]) == 0
    err = capsys.readouterr().err
    assert "fro retained" in err and "lin1" in err and "average Frobenius norm retained" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line(peft_adapter, tmp_path, capsys, monkeypatch):
    _, folder = peft_adapter
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert main(["resize", folder, "-o", str(tmp_path / "o"), "--rank", "2", "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("loratools: error: --plot needs matplotlib") and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,code,msg", [
    ([], 2, "give --rank"),
    (["--rank", "0"], 2, "at least 1"),
    (["--param", "0.5", "--rank", "2"], 2, "--param needs --dynamic"),
    (["--dynamic", "sv_fro"], 2, "needs --param"),
    (["--dynamic", "sv_fro", "--param", "1.5"], 2, "between 0 and 1"),
])
def test_cli_usage_errors(peft_adapter, tmp_path, capsys, args, code, msg):
    _, folder = peft_adapter
    assert main(["resize", folder, "-o", str(tmp_path / "o")] + args) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("loratools: error:") and msg in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_input_errors_leave_everything_alone(peft_adapter, tmp_path, capsys):
    _, folder = peft_adapter
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    assert main(["resize", folder, "-o", str(existing), "--rank", "2"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(existing) == ["keep.txt"]
    assert main(["resize", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--rank", "2"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_empty_adapter_is_a_usage_error():
    with pytest.raises(UsageError):
        resize(LoraAdapter(), rank=2)


# ---- kohya in and out ----

def test_kohya_in_and_out_keeps_metadata_and_updates_dims(tmp_path):
    import hashlib
    import struct

    import _formats_models as M
    from loratools import write_adapter
    from loratools.formats import detect

    models = M.peft_pipeline_lora(str(tmp_path / "peft"))
    src = write_adapter(read_adapter(str(tmp_path / "peft")), str(tmp_path / "in.safetensors"), format="kohya",
                        metadata={"ss_output_name": "mine", "ss_training_comment": "hello"})
    deltas = M.peft_deltas(models)  # PEFT's own ΔW of every module: the oracle
    for args, dim in ((["--rank", "2"], "2"), (["--dynamic", "sv_fro", "--param", "0.8"], None)):
        out = str(tmp_path / f"out{len(args)}.safetensors")
        assert main(["resize", src, "-o", out, "-q"] + args) == 0
        assert detect(out) == "kohya"
        tensors, meta = safetensors_io.load(out)
        back = read_adapter(out)
        main_ranks = {m.rank for m in back if not (m.kind == "conv" and m.weight_shape[2:] != (1, 1))}
        assert meta["ss_network_dim"] == (dim or ("Dynamic" if len(main_ranks) > 1 else str(main_ranks.pop())))
        assert meta["ss_output_name"] == "mine" and meta["ss_training_comment"] == "hello"
        raw = open(out, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()  # of the new bytes
        for name, m in back.modules.items():
            d = deltas[name].double().reshape(deltas[name].shape[0], -1)
            s = torch.linalg.svdvals(d)
            err = float((m.dense_delta().double().reshape(d.shape) - d).norm())
            assert abs(err - float(s[m.rank:].norm())) <= 1e-4 * float(s.norm()), name
            if dim is None:
                assert m.rank == min(brute_force_rank(s, "sv_fro", 0.8), read_adapter(src).modules[name].rank)
