"""Fused projections at a chosen rank: `convert --fused-rank K` to kohya / ComfyUI (Flux.1, SD3), and resize /
blend of such adapters written back to original names, whose fused modules get the rank asked for.

Oracles: the dense ΔW of each fused module and its dense SVD (torch.linalg.svd: the Eckart–Young error of the
best rank-K approximation), and diffusers' kohya-Flux converter (what `FluxPipeline.lora_state_dict` runs, its
full-size constants substituted) reading the written file."""
from __future__ import annotations

import json

import pytest
import torch

from _tiny import run_cli as run
from loratools import LoraAdapter, LoraModule, safetensors_io
from loratools.archs import flux
from loratools.conversion import convert
from loratools.errors import IncompatibleError, UsageError
from tests import _flux, _sd3

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
UNET = "lora_unet_"


def _file(tmp_path, name, family="flux", **kw):
    mod = _flux if family == "flux" else _sd3
    sd = mod.kohya_lora(mod.transformer(), **kw)
    path = tmp_path / name
    safetensors_io.save(str(path), sd, {"ss_base_model_version": "flux1" if family == "flux" else "sd3"})
    return str(path), sd


def _dense(sd, key):
    """alpha/r · up @ down of one module (kohya or ComfyUI key without the suffix), in fp64."""
    down, up = sd[key + ".lora_down.weight"].double(), sd[key + ".lora_up.weight"].double()
    alpha = float(sd[key + ".alpha"]) if key + ".alpha" in sd else down.shape[0]
    return alpha / down.shape[0] * up.flatten(1) @ down.flatten(1)


def _eckart_young(dense, k):
    s = torch.linalg.svd(dense, full_matrices=False).S
    return float(torch.linalg.vector_norm(s[k:]) / torch.linalg.vector_norm(s))


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _modules(sd):
    return [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]


def _convert_fused(capsys, path, sd, k, out):
    """`convert --to kohya --fused-rank k` of the kohya file `path` (state dict `sd`) into `out`: it succeeds and
    writes the same keys. Returns the JSON report's "fused" part and the written state dict."""
    code, stdout, err = run(capsys, "convert", path, "--to", "kohya", "--fused-rank", k, "-o", out, "--format", "json")
    assert code == 0, err
    fused = json.loads(stdout)["fused"]
    got, _ = safetensors_io.load(str(out))
    assert set(got) == set(sd)
    return fused, got


def _blend_svd(capsys, a, b, out):
    """`blend a:0.7 b:-0.4 -m svd --rank 3` into `out`: it succeeds; returns the written state dict."""
    code, _, err = run(capsys, "blend", f"{a}:0.7", f"{b}:-0.4", "-m", "svd", "--rank", 3, "-o", out, "-q")
    assert code == 0, err
    got, _ = safetensors_io.load(str(out))
    return got


def _assert_diffusers_reads(got):
    """diffusers' reading of a written kohya Flux state dict: each part's ΔW is its row slice of the fused one."""
    ref = _flux.diffusers_kohya(dict(got))
    checked = 0
    for ln in _modules(got):
        entry = flux.LAYOUT.lookup(flux.LAYOUT.unflatten(ln[len(UNET):]))
        if len(entry.parts) == 1:
            continue
        have, row = _dense(got, ln), 0
        for part, size in zip(entry.parts, entry.sizes(*have.shape)):
            a, b = ref[f"transformer.{part}.lora_A.weight"], ref[f"transformer.{part}.lora_B.weight"]
            torch.testing.assert_close(b.double() @ a.double(), have[row:row + size], rtol=1e-5, atol=1e-6)
            row += size
        checked += 1
    assert checked == 6


def test_flux_fused_rank_is_the_best_rank_k_and_diffusers_reads_it(tmp_path, capsys):
    path, sd = _file(tmp_path, "split.safetensors", split_qkv=True, rank=4)  # fused qkv rank 12, linear1 16
    fused, got = _convert_fused(capsys, path, sd, 6, tmp_path / "k6.safetensors")
    refactored = []
    for ln in _modules(sd):
        rank_in = sd[ln + ".lora_down.weight"].shape[0]
        if rank_in <= 6:  # not fused, or fused at rank 6 or less: as written without the option
            assert all(torch.equal(got[ln + s], sd[ln + s]) for s in (".lora_down.weight", ".lora_up.weight")), ln
            continue
        original = flux.LAYOUT.unflatten(ln[len(UNET):])
        refactored.append("transformer." + original)
        scale = float(sd[ln + ".alpha"]) / rank_in  # kept: alpha' = scale · K
        assert got[ln + ".lora_down.weight"].shape[0] == 6 and float(got[ln + ".alpha"]) == pytest.approx(6 * scale)
        want, have = _dense(sd, ln), _dense(got, ln)
        err_ = _rel(have, want)
        assert err_ == pytest.approx(_eckart_young(want, 6), rel=1e-5), ln
        assert fused["per_module"]["transformer." + original] == pytest.approx(err_, rel=1e-5), ln
    _assert_diffusers_reads(got)
    # two qkv per double block, one linear1 per single block
    assert len(refactored) == 2 * 2 + 2 and sorted(fused["per_module"]) == sorted(refactored)
    errors = list(fused["per_module"].values())
    assert fused["worst"] == max(errors) and fused["mean"] == pytest.approx(sum(errors) / len(errors))
    assert fused["modules"] == 6 and fused["rank"] == 6


@pytest.mark.parametrize("split_qkv,k", [(True, 16), (False, 4)])
def test_fused_rank_at_or_above_the_block_rank_is_exact(tmp_path, capsys, split_qkv, k):
    path, _ = _file(tmp_path, "in.safetensors", split_qkv=split_qkv, rank=4)
    plain, ranked = tmp_path / "plain.safetensors", tmp_path / "ranked.safetensors"
    assert run(capsys, "convert", path, "--to", "kohya", "-o", plain, "-q")[0] == 0
    code, _, err = run(capsys, "convert", path, "--to", "kohya", "--fused-rank", k, "-o", ranked)
    assert code == 0 and "0 module(s)" in err and "exact" in err, err
    a, b = safetensors_io.load(str(plain))[0], safetensors_io.load(str(ranked))[0]
    assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_sd3_comfyui_fused_rank(tmp_path, capsys):
    path, sd = _file(tmp_path, "sd3.safetensors", family="sd3", split_qkv=True, rank=2)  # fused qkv rank 6
    out = tmp_path / "c.safetensors"
    rep = convert(path, out, to="comfyui", fused_rank=3)
    code, _, err = run(capsys, "convert", path, "--to", "comfyui", "--fused-rank", 3,
                       "-o", tmp_path / "cli.safetensors")
    assert code == 0 and "transformer.joint_blocks.0.x_block.attn.qkv" in err and "rel. error" in err, err
    assert f"worst {rep.fused['worst']:.3e}" in err
    got, _ = safetensors_io.load(str(out))
    checked = 0
    for key in _modules(got):
        ln = UNET + key[len("diffusion_model."):].replace(".", "_")
        want, have = _dense(sd, ln), _dense(got, key)
        if sd[ln + ".lora_down.weight"].shape[0] > 3:
            assert got[key + ".lora_down.weight"].shape[0] == 3
            assert _rel(have, want) == pytest.approx(_eckart_young(want, 3), rel=1e-5), key
            assert rep.fused["per_module"]["transformer." + key[len("diffusion_model."):]] == pytest.approx(
                _rel(have, want), rel=1e-5)
            checked += 1
        else:
            torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-7)
    assert checked == rep.fused["modules"] > 0


def test_resize_of_a_kohya_flux_lora_resizes_the_fused_modules(tmp_path, capsys):
    path, sd = _file(tmp_path, "split.safetensors", split_qkv=True, rank=4)
    out = tmp_path / "r4.safetensors"
    code, stdout, err = run(capsys, "resize", path, "--rank", 4, "-o", out, "--format", "json")
    assert code == 0, err
    reported = {m["name"]: m for m in json.loads(stdout)["modules"]}
    got, _ = safetensors_io.load(str(out))
    assert set(got) == set(sd)
    for ln in _modules(sd):
        want, have = _dense(sd, ln), _dense(got, ln)
        assert got[ln + ".lora_down.weight"].shape[0] == 4, ln  # the parts resized one by one fuse at rank 12
        assert _rel(have, want) == pytest.approx(_eckart_young(want, 4), rel=1e-5, abs=1e-6), ln
        original = flux.LAYOUT.unflatten(ln[len(UNET):])
        if len(flux.LAYOUT.lookup(original).parts) > 1:
            assert reported["transformer." + original]["rel_error"] == pytest.approx(_rel(have, want), rel=1e-5)
    _assert_diffusers_reads(got)


def test_blend_svd_to_kohya_honours_the_rank_on_fused_modules(tmp_path, capsys):
    a, sa = _file(tmp_path, "a.safetensors", split_qkv=True, rank=2, seed=1)
    b, sb = _file(tmp_path, "b.safetensors", rank=3, seed=2)
    got = _blend_svd(capsys, a, b, tmp_path / "blend.safetensors")
    for ln in _modules(sa):
        want = 0.7 * _dense(sa, ln) - 0.4 * _dense(sb, ln)
        have = _dense(got, ln)
        assert got[ln + ".lora_down.weight"].shape[0] == 3, ln
        assert _rel(have, want) == pytest.approx(_eckart_young(want, 3), rel=1e-5, abs=1e-6), ln


@pytest.mark.parametrize("args,needle", [(("--fused-rank", "0"), "at least 1"),
                                         (("--fused-rank", "2", "--to", "diffusers"), "applies to --to kohya")])
def test_fused_rank_usage_errors(tmp_path, capsys, args, needle):
    path, _ = _file(tmp_path, "in.safetensors", rank=2)
    to = () if "--to" in args else ("--to", "kohya")
    out = tmp_path / "o.safetensors"
    code, _, err = run(capsys, "convert", path, *to, *args, "-o", out)
    assert code == 2 and needle in err and err.strip().count("\n") == 0, err
    assert not out.exists()


def test_fused_rank_needs_a_dit_transformer():
    name = "unet.down_blocks.0.attentions.0.proj_in"
    adapter = LoraAdapter(modules={name: LoraModule(name=name, down=torch.ones(2, 4), up=torch.ones(4, 2))},
                          format="kohya")
    with pytest.raises(UsageError, match="no transformer LoRA"):
        convert(adapter, None, to="kohya", fused_rank=1)


def test_fused_rank_refuses_to_svd_a_dora(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = {}
    for part in ("to_q", "to_k", "to_v"):
        name = f"transformer.transformer_blocks.0.attn.{part}"
        mods[name] = LoraModule(name=name, down=torch.randn(2, _flux.DIM, generator=g),
                                up=torch.randn(_flux.DIM, 2, generator=g), alpha=2.0,
                                magnitude=torch.rand(_flux.DIM, generator=g) + 0.5)
    adapter = LoraAdapter(modules=mods, format="diffusers", metadata={"ss_base_model_version": "flux1"})
    out = tmp_path / "d.safetensors"
    with pytest.raises(IncompatibleError, match="DoRA"):
        convert(adapter, out, to="kohya", fused_rank=5)
    assert not out.exists()
    rep = convert(adapter, out, to="kohya", fused_rank=6)  # the exact fusion: rank 6, no SVD
    assert rep.fused["modules"] == 0 and out.exists()


def _qkv_only(specs):
    """A diffusers Flux LoRA on one block's to_q/to_k/to_v only: (rank, alpha, rsLoRA, dtype) per part or None."""
    g = torch.Generator().manual_seed(3)
    mods = {}
    for part, spec in zip(("to_q", "to_k", "to_v"), specs):
        if spec is not None:
            name = f"transformer.transformer_blocks.0.attn.{part}"
            r, alpha, rs, dtype = spec
            mods[name] = LoraModule(name=name, down=torch.randn(r, _flux.DIM, generator=g).to(dtype),
                                    up=torch.randn(_flux.DIM, r, generator=g).to(dtype), alpha=alpha, use_rslora=rs)
    exact = torch.cat([mods[n].scale * mods[n].up.double() @ mods[n].down.double() if n in mods
                       else torch.zeros(_flux.DIM, _flux.DIM, dtype=torch.float64)
                       for n in (f"transformer.transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v"))])
    return LoraAdapter(modules=mods, format="diffusers", metadata={"ss_base_model_version": "flux1"}), exact


F32, B16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("specs,k", [
    ([(2, 2.0, False, F32), (4, 4.0, False, F32), (3, 1.0, False, F32)], 5),  # mixed ranks and scales
    ([(4, 4.0, True, F32), (4, 4.0, False, F32), (4, 8.0, True, F32)], 5),  # rsLoRA beside plain
    ([(4, 4.0, False, F32), None, (4, 2.0, False, F32)], 3),  # to_k not adapted: its rows are 0
    ([(3, 3.0, False, B16), (3, 2.0, False, F32), (3, 3.0, False, F32)], 4),  # bf16 beside fp32
    ([(3, 3.0, False, B16), (3, 2.0, False, F32), (3, 3.0, False, F32)], 9)])  # ... written exactly
def test_an_adapter_of_fused_parts_only_is_written_at_the_best_rank_k(tmp_path, specs, k):
    """Refactored modules are on original names; an adapter with nothing else is still written as a Flux file
    (it was refused as 'kohya needs a pipeline component prefix'), and a bf16 part first no longer rounds an
    fp32 part's A to bf16 in the exact fusion."""
    adapter, exact = _qkv_only(specs)
    out = tmp_path / "o.safetensors"
    convert(adapter, out, to="kohya", fused_rank=k)
    got, _ = safetensors_io.load(str(out))
    ln = UNET + "double_blocks_0_img_attn_qkv"
    assert set(_modules(got)) == {ln}
    assert _rel(_dense(got, ln), exact) == pytest.approx(_eckart_young(exact, k), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("command", ["resize", "blend"])
def test_resize_and_blend_of_a_kohya_flux_lora_on_qkv_only(tmp_path, capsys, command):
    """A kohya Flux LoRA trained on the fused qkv projections only: fused first, nothing is left under a diffusers
    name, and the writer still names the file's transformer (it refused with 'needs a pipeline component prefix')."""
    qkv = [n for n in _flux.bfl_shapes(_flux.transformer()) if n.endswith("attn.qkv")]
    path, sd = _file(tmp_path, "qkv.safetensors", split_qkv=True, rank=4, names=qkv)
    out = tmp_path / "o.safetensors"
    args = ("--rank", 5) if command == "resize" else ("-m", "svd", "--rank", 5)
    code, _, err = run(capsys, command, path, *args, "-o", out, "-q")
    assert code == 0, err
    got, _ = safetensors_io.load(str(out))
    assert set(_modules(got)) == set(_modules(sd)) and len(_modules(sd)) == 4
    for ln in _modules(sd):
        want = _dense(sd, ln)
        assert _rel(_dense(got, ln), want) == pytest.approx(_eckart_young(want, 5), rel=1e-4, abs=1e-6), ln
