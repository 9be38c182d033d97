"""Flux.1: reading kohya / original-names / diffusers LoRAs, exact fused <-> split conversion, and
merging into pipeline folders and single-file (incl. fp8) checkpoints.

Oracles: diffusers' kohya-Flux converter (its full-size constants substituted, tests/_flux.py),
`load_lora_weights` + `fuse_lora` on a tiny FluxPipeline, diffusers' single-file converter, and the
dense ΔW. diffusers ignores the final layer's alpha and skips the global modules of kohya files it
converts itself (DESIGN.md): those modules are checked against the dense math.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from loratools import LoraModule, merge, safetensors_io
from loratools.archs import flux, load_manifest
from loratools.archs.family import FLUX, adapter_family
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter
from tests import _flux
from tests._dit import save_pipeline_folder
from tests._tiny import ulp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
FINAL = ("transformer.norm_out.linear", "transformer.proj_out")


def _dense(m):
    return m.scale * (m.up.double() @ m.down.double())


def _kohya_file(tmp_path, name="k.safetensors", **kw):
    sd = _flux.kohya_lora(_flux.transformer(), **kw)
    path = os.path.join(tmp_path, name)
    safetensors_io.save(path, sd, {"ss_base_model_version": "flux1"})
    return path, sd


@pytest.mark.parametrize("split_qkv", [False, True])
def test_kohya_flux_reads_like_diffusers(tmp_path, split_qkv):
    path, sd = _kohya_file(tmp_path, split_qkv=split_qkv)
    assert detect(path) == "kohya"
    adapter = read_adapter(path)
    assert adapter_family(adapter)[0] == FLUX
    ref = _flux.diffusers_kohya(sd)
    mods = {m.name: m for m in adapter}
    seen = set()
    for key, down in ref.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")]
        name = mod if mod.startswith("transformer.") else "transformer." + mod
        want = ref[mod + ".lora_B.weight"].double() @ down.double()
        m = mods[name]
        if name in FINAL:  # diffusers drops the final layer's alpha: scale 1 there
            want = want * m.scale
        torch.testing.assert_close(_dense(m), want, rtol=1e-6, atol=1e-6)
        if split_qkv and name.endswith(("to_q", "add_k_proj", "proj_mlp")):
            assert m.rank == 4  # block-diagonal fused LoRAs split into their own blocks
        seen.add(name)
    assert seen == set(mods) and len(mods) == 50


@pytest.mark.parametrize("split_qkv", [False, True])
def test_round_trips_are_bit_exact(tmp_path, split_qkv):
    path, sd = _kohya_file(tmp_path, split_qkv=split_qkv, dtype=torch.bfloat16)
    adapter = read_adapter(path)
    for fmt in ("kohya", "diffusers", "comfyui"):
        out = write_adapter(adapter, tmp_path / f"a.{fmt}.safetensors", format=fmt)
        assert detect(out) == fmt
        again = read_adapter(out)
        back = write_adapter(again, tmp_path / f"b.{fmt}.safetensors", format="kohya")
        got, _ = safetensors_io.load(back)
        assert set(got) == set(sd)
        for k, v in sd.items():
            if fmt == "diffusers" and k.endswith(".alpha"):  # diffusers keeps alphas in its fp32 metadata
                assert float(got[k]) == float(v)
            else:
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), (fmt, k)


def test_comfyui_keys_and_diffusers_reads_them(tmp_path):
    path, _ = _kohya_file(tmp_path)
    adapter = read_adapter(path)
    out = write_adapter(adapter, tmp_path / "c.safetensors", format="comfyui")
    keys = set(safetensors_io.load(out)[0])
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in keys
    assert "diffusion_model.single_blocks.1.linear1.alpha" in keys
    # diffusers reads the original-names form through its kohya path (dots to `_`)
    ref = _flux.diffusers_kohya(safetensors_io.load(out)[0])
    mods = {m.name: m for m in adapter}
    for key, down in ref.items():
        if key.endswith(".lora_A.weight") and key.startswith("transformer."):
            mod = key[: -len(".lora_A.weight")]
            torch.testing.assert_close(_dense(mods[mod]), ref[mod + ".lora_B.weight"].double() @ down.double())


def _lora(name, rows, cols, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(name, torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g), alpha)


def test_fuse_split_exact_against_dense():
    fused = flux.lookup("single_blocks.0.linear1")
    names = [f"transformer.{p}" for p in fused.parts]
    sizes = [16, 16, 16, 64]
    parts = [_lora(n, s, 16, r, a, i) for i, (n, s, r, a) in enumerate(zip(names, sizes, (2, 3, 2, 4), (1.0, 6.0, 2.0, 4.0)))]
    parts[1] = None  # to_k not adapted: its rows stay zero
    one = flux.fuse(parts, fused, sizes, "transformer.single_blocks.0.linear1")
    assert one.rank == 8
    dense, row = _dense(one), 0
    for p, s in zip(parts, sizes):
        want = _dense(p) if p is not None else torch.zeros(s, 16, dtype=torch.float64)
        torch.testing.assert_close(dense[row:row + s], want)
        row += s
    # the final adaLN: B's row halves swap between BFL and diffusers
    norm = _lora("transformer.norm_out.linear", 32, 16, 4, 8.0, 9)
    fin = flux.lookup("final_layer.adaLN_modulation.1")
    bfl = flux.fuse([norm], fin, [32], "x")
    torch.testing.assert_close(_dense(bfl), torch.cat([_dense(norm)[16:], _dense(norm)[:16]]))
    (back,) = flux.split(bfl, fin)
    assert torch.equal(back.up, norm.up) and torch.equal(back.down, norm.down)


def test_every_flux_module_has_an_original_name():
    m = load_manifest("flux")
    covered = {p for parts in m["original"]["transformer"].values() for p in parts}
    assert covered == set(m["components"]["transformer"])
    assert len(m["original"]["transformer"]) == 10 + 19 * 10 + 38 * 3


# ---- merging -------------------------------------------------------------------------------------

def _text_encoders():
    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        vocab_size=100, max_position_embeddings=16, projection_dim=12)).eval()
    t5 = T5EncoderModel(T5Config(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, vocab_size=100)).eval()
    return clip, t5


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxpipe")
    clip, t5 = _text_encoders()
    comps = {"transformer": _flux.transformer(), "text_encoder": clip, "text_encoder_2": t5}
    save_pipeline_folder(root, "FluxPipeline", comps)
    return root, comps


def _fused_by_diffusers(comps, lora_dir):
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, tokenizer=None, tokenizer_2=None,
                        **{c: copy.deepcopy(m) for c, m in comps.items()})
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in comps}


def test_merge_pipeline_matches_fuse_lora(pipeline_folder, tmp_path):
    root, comps = pipeline_folder
    path, _ = _kohya_file(tmp_path)
    adapter = read_adapter(path)
    lora_dir = tmp_path / "dl"
    os.makedirs(lora_dir)
    write_adapter(adapter, lora_dir / "pytorch_lora_weights.safetensors", format="diffusers")
    want = _fused_by_diffusers(comps, lora_dir)
    out = tmp_path / "merged"
    merge(str(root), [path], str(out))
    got = Checkpoint(str(out / "transformer"))
    for k, v in want["transformer"].items():
        torch.testing.assert_close(got.read(k), v, rtol=1e-5, atol=1e-5, msg=k)
    changed = [k for k, v in want["transformer"].items() if not torch.equal(v, comps["transformer"].state_dict()[k])]
    assert len(changed) == 50


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_merge_single_file(pipeline_folder, tmp_path, dtype):
    _, comps = pipeline_folder
    base_sd = {k: v.detach().clone() for k, v in comps["transformer"].state_dict().items()}
    bfl = _flux.bfl_state_dict(base_sd)
    back = _flux.diffusers_from_bfl(bfl)  # our layout table agrees with diffusers' converter
    assert set(back) == set(base_sd) and all(torch.equal(back[k], base_sd[k]) for k in base_sd)
    bfl = {"model.diffusion_model." + k: v.to(dtype) for k, v in bfl.items()}
    base = tmp_path / "flux.safetensors"
    safetensors_io.save(str(base), bfl, {})
    path, _ = _kohya_file(tmp_path)
    adapter = read_adapter(path)
    out = tmp_path / "merged.safetensors"
    merge(str(base), [adapter], str(out))
    got, _ = safetensors_io.load(str(out))
    fused, _ = flux.to_original(list(adapter))
    for original, m in fused.items():
        key = f"model.diffusion_model.{original}.weight"
        exact = bfl[key].double() + _dense(m)
        # fp32 accumulation (error ~1e-7 of the summands), then one rounding: within one unit of the exact sum
        bound = ulp(exact.float(), dtype).double() + 1e-6 * (bfl[key].double().abs() + _dense(m).abs())
        assert got[key].dtype == dtype
        assert ((got[key].double() - exact).abs() <= bound).all(), key
    untouched = [k for k in bfl if k.endswith(".bias")]
    assert all(torch.equal(got[k].float(), bfl[k].float()) for k in untouched)


def test_scaled_fp8_is_refused(tmp_path):
    base = tmp_path / "scaled.safetensors"
    safetensors_io.save(str(base), {"double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16).to(torch.float8_e4m3fn),
                                    "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1),
                                    "scaled_fp8": torch.zeros(2).to(torch.float8_e4m3fn)}, {})
    path, _ = _kohya_file(tmp_path)
    with pytest.raises(IncompatibleError, match="scaled-fp8"):
        merge(str(base), [path], str(tmp_path / "o.safetensors"))
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_kohya_flux_text_encoders_round_trip(tmp_path):
    g = torch.Generator().manual_seed(4)
    sd = {}
    for ln, shape in (("lora_unet_double_blocks_0_img_attn_qkv", (48, 16)),
                      ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
                      ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", (4096, 4096))):
        sd[ln + ".lora_down.weight"] = torch.randn(2, shape[1], generator=g)
        sd[ln + ".lora_up.weight"] = torch.randn(shape[0], 2, generator=g)
        sd[ln + ".alpha"] = torch.tensor(1.0)
    path = tmp_path / "te.safetensors"
    safetensors_io.save(str(path), sd, {})
    adapter = read_adapter(str(path))
    assert {m.name for m in adapter} == {
        "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
        "transformer.transformer_blocks.0.attn.to_v", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"}
    for fmt in ("kohya", "comfyui"):
        out = write_adapter(adapter, tmp_path / f"o.{fmt}.safetensors", format=fmt)
        again = write_adapter(read_adapter(out), tmp_path / f"k.{fmt}.safetensors", format="kohya")
        got, _ = safetensors_io.load(again)
        assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    keys = set(safetensors_io.load(str(tmp_path / "o.comfyui.safetensors"))[0])
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight" in keys


def test_inspect_shows_flux_and_the_resolved_modules(tmp_path, capsys):
    from tests._tiny import run_cli
    path, _ = _kohya_file(tmp_path)
    code, out, err = run_cli(capsys, "inspect", path, "--format", "json")
    rep = json.loads(out)
    assert code == 0 and err == "" and rep["unresolved"] == []
    assert rep["family"] == {"name": FLUX, "evidence": "metadata ss_base_model_version=flux1"}
    names = json.dumps(rep)
    assert "transformer.single_transformer_blocks.1.proj_mlp" in names and "lora_unet_" not in names
