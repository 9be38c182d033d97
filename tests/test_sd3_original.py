"""SD3 / SD3.5 in the original (Stability MMDiT) names: the name table and row splits against diffusers' own
single-file converter, kohya (`lora_unet_joint_blocks_0_x_block_attn_qkv`, `lora_te1/2/3_`) and ComfyUI
(`diffusion_model.joint_blocks…`, `text_encoders.clip_g.transformer.…`) LoRAs read exactly (diffusers'
`load_lora_weights` + `fuse_lora` of what we write against the dense update in the original layout, converted
by diffusers), round trips bit-exact, and merges into single-file checkpoints (fp32, bf16, fp8) against
`fuse_lora` on the tiny pipeline."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from loratools import merge, safetensors_io
from loratools.archs import load_manifest, sd3
from loratools.archs.family import SD3, adapter_family
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter
from tests import _sd3
from tests._dit import assert_round_trip
from tests._tiny import ulp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")
META = {"ss_base_model_version": "sd3"}


def test_name_table_agrees_with_diffusers_single_file_converter():
    model = _sd3.transformer()
    g = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    orig = _sd3.original_state_dict(sd)
    conv = _sd3.diffusers_from_original(orig)
    assert set(conv) == set(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)
    names = _sd3.original_modules(model)
    assert len(names) == 37 and "joint_blocks.2.context_block.attn.proj" not in names  # pre-only last block
    for name, parts in names.items():  # our row split of each original weight is diffusers' own
        fused, w = sd3.LAYOUT.lookup(name), orig[name + ".weight"]
        if fused.swaps(w.shape[0], w.shape[1]):
            w = torch.cat([w[w.shape[0] // 2:], w[: w.shape[0] // 2]])
        for p, piece in zip(parts, w.split(fused.sizes(w.shape[0], w.shape[1]))):
            assert torch.equal(piece, conv[p + ".weight"]), (name, p)
    assert sd3.LAYOUT.lookup("joint_blocks.2.context_block.adaLN_modulation.1").swaps(32, 16)
    assert not sd3.LAYOUT.lookup("joint_blocks.0.context_block.adaLN_modulation.1").swaps(96, 16)


@pytest.mark.parametrize("arch,count", [("sd3", 271), ("sd3.5-large", 385)])
def test_every_manifest_module_has_an_original_name(arch, count):
    table = load_manifest(arch)["components"]["transformer"]
    names = sd3.LAYOUT.original_names(table)
    assert {p for parts in names.values() for p in parts} == set(table) and len(names) == count
    layers = max(int(n.split(".")[1]) for n in names if n.startswith("joint_blocks.")) + 1
    assert f"joint_blocks.{layers - 1}.context_block.adaLN_modulation.1" in names  # pre-only: adaLN and qkv only
    assert f"joint_blocks.{layers - 1}.context_block.mlp.fc1" not in names
    assert all(sd3.LAYOUT.lookup(n) and sd3.LAYOUT.unflatten(n.replace(".", "_")) == n for n in names)


def _kohya_file(tmp_path, model, name="k.safetensors", **kw):
    sd = _sd3.kohya_lora(model, **kw)
    path = os.path.join(tmp_path, name)
    safetensors_io.save(path, sd, META)
    return path, sd


def _pipeline(comps):
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, tokenizer=None,
                                    tokenizer_2=None, tokenizer_3=None,
                                    **{c: copy.deepcopy(m) for c, m in comps.items()})


def _fused_by_diffusers(comps, adapter, tmp_path):
    """What diffusers makes of our diffusers-layout file: load_lora_weights + fuse_lora on the tiny pipeline."""
    lora_dir = tmp_path / "dl"
    os.makedirs(lora_dir, exist_ok=True)
    write_adapter(adapter, lora_dir / "pytorch_lora_weights.safetensors", format="diffusers")
    pipe = _pipeline(comps)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in comps}


@pytest.mark.parametrize("split_qkv", [False, True])
def test_kohya_sd3_reads_as_diffusers_converts_the_dense_update(tmp_path, split_qkv):
    comps = _sd3.components()
    model = comps["transformer"]
    path, sd = _kohya_file(tmp_path, model, split_qkv=split_qkv)
    assert detect(path) == "kohya"
    adapter = read_adapter(path)
    assert adapter_family(adapter)[0] == SD3 and len(adapter) == 51
    if split_qkv:  # block-diagonal fused LoRAs split into their own blocks
        assert adapter.modules["transformer.transformer_blocks.0.attn2.to_k"].rank == 4
    # the reference: the dense update added in the original layout, converted by diffusers
    orig = {k: v.double() for k, v in _sd3.original_state_dict(model.state_dict()).items()}
    for name in _sd3.original_modules(model):
        key = name + ".weight"
        orig[key] = orig[key] + _sd3.delta(sd, "lora_unet_" + name.replace(".", "_"), orig[key].shape)
    want = _sd3.diffusers_from_original(orig)
    got = _fused_by_diffusers(comps, adapter, tmp_path)["transformer"]
    changed = 0
    for k, v in got.items():
        torch.testing.assert_close(v.double(), want[k], rtol=1e-5, atol=1e-5, msg=k)
        changed += not torch.equal(v, model.state_dict()[k])
    assert changed == 51


@pytest.mark.parametrize("split_qkv", [False, True])
def test_round_trips_are_bit_exact(tmp_path, split_qkv):
    path, sd = _kohya_file(tmp_path, _sd3.transformer(), split_qkv=split_qkv, dtype=torch.bfloat16)
    adapter = read_adapter(path)
    for fmt in ("kohya", "diffusers", "comfyui"):
        out = assert_round_trip(adapter, sd, fmt, tmp_path)
        assert detect(out) == fmt and adapter_family(read_adapter(out))[0] == SD3
    meta = safetensors_io.load(str(tmp_path / "b.diffusers.safetensors"))[1]  # kohya written from diffusers names
    assert meta["ss_network_module"] == "networks.lora_sd3"
    keys = set(safetensors_io.load(str(tmp_path / "a.comfyui.safetensors"))[0])
    assert {"diffusion_model.joint_blocks.0.x_block.attn2.qkv.lora_down.weight",
            "diffusion_model.x_embedder.proj.alpha"} <= keys


def _te_lora(g, shapes):
    sd = {}
    for ln, (rows, cols) in shapes.items():
        sd[ln + ".lora_down.weight"] = torch.randn(2, cols, generator=g)
        sd[ln + ".lora_up.weight"] = torch.randn(rows, 2, generator=g)
        sd[ln + ".alpha"] = torch.tensor(1.5)
    return sd


TE_NAMES = {"lora_te1_": "text_model.encoder.layers.0.self_attn.q_proj",
            "lora_te2_": "text_model.encoder.layers.0.self_attn.v_proj",
            "lora_te3_": "encoder.block.0.layer.0.SelfAttention.q"}
TE = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (16, 16),
      "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (16, 16),
      "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (12, 12)}


def test_kohya_sd3_text_encoders_are_clip_l_clip_g_t5(tmp_path):
    sd = _te_lora(torch.Generator().manual_seed(4), TE)
    sd.update(_sd3.kohya_lora(_sd3.transformer(), names={"joint_blocks.0.x_block.attn.qkv"}))
    path = tmp_path / "te.safetensors"
    safetensors_io.save(str(path), sd, {})  # no metadata: the CLIP-G (lora_te2_) LoRA says SD3
    adapter = read_adapter(str(path))
    assert {m.name for m in adapter} == {
        "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
        "transformer.transformer_blocks.0.attn.to_v", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj",
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"}
    assert_round_trip(adapter, sd, "kohya", tmp_path)
    keys = set(safetensors_io.load(assert_round_trip(adapter, sd, "comfyui", tmp_path))[0])
    assert "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj.lora_up.weight" in keys
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.alpha" in keys


# ---- merging into single-file checkpoints --------------------------------------------------------

def _full_lora(tmp_path, comps):
    sd = _sd3.kohya_lora(comps["transformer"])
    sd.update(_te_lora(torch.Generator().manual_seed(6), TE))
    path = tmp_path / "full.safetensors"
    safetensors_io.save(str(path), sd, META)
    return str(path), sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_merge_single_file(tmp_path, dtype):
    comps = _sd3.components()
    base_sd = _sd3.single_file(comps, dtype)
    base = tmp_path / "sd3.safetensors"
    safetensors_io.save(str(base), base_sd, {})
    path, sd = _full_lora(tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    merge(str(base), [path], str(out))
    got, _ = safetensors_io.load(str(out))
    assert set(got) == set(base_sd) and all(got[k].dtype == dtype for k in got)
    assert torch.equal(got["first_stage_model.decoder.conv_in.weight"].float(),
                       base_sd["first_stage_model.decoder.conv_in.weight"].float())
    prefixes = {"lora_unet_": "model.diffusion_model.", "lora_te1_": "text_encoders.clip_l.transformer.",
                "lora_te2_": "text_encoders.clip_g.transformer.", "lora_te3_": "text_encoders.t5xxl.transformer."}
    touched = set()
    for ln in {k.split(".")[0] for k in sd}:
        prefix = next(p for p in prefixes if ln.startswith(p))
        name = sd3.LAYOUT.unflatten(ln[len(prefix):]) if prefix == "lora_unet_" else None
        if name is None:  # text encoders: resolved through the real module names
            name = TE_NAMES[prefix]
        key = prefixes[prefix] + name + ".weight"
        exact = base_sd[key].double() + _sd3.delta(sd, ln, base_sd[key].shape)
        # fp32 accumulation, then one rounding: within one unit of the exact sum
        size = base_sd[key].double().abs() + _sd3.delta(sd, ln, base_sd[key].shape, absolute=True).abs()
        bound = ulp(exact.float(), dtype).double() + 1e-6 * size
        assert ((got[key].double() - exact).abs() <= bound).all(), key
        touched.add(key)
    assert all(torch.equal(got[k].float(), v.float()) for k, v in base_sd.items() if k not in touched)
    if dtype == torch.float32:  # what diffusers loads from the merged file == fuse_lora on the tiny pipeline
        adapter = read_adapter(path)  # diffusers' SD3 loader takes no T5 LoRA: that one is checked above
        adapter.modules = {n: m for n, m in adapter.modules.items() if not n.startswith("text_encoder_3.")}
        want = _fused_by_diffusers(comps, adapter, tmp_path)
        loaded = _sd3.diffusers_from_original({k[len("model.diffusion_model."):]: v for k, v in got.items()
                                               if k.startswith("model.diffusion_model.")})
        for k, v in want["transformer"].items():
            torch.testing.assert_close(loaded[k], v, rtol=1e-5, atol=1e-5, msg=k)
        for comp, prefix in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            for k, v in want[comp].items():
                torch.testing.assert_close(got[f"text_encoders.{prefix}.transformer.{k}"], v, rtol=1e-5, atol=1e-5)


def test_flux_lora_into_sd3_file_is_named(tmp_path):
    comps = _sd3.components()
    base = tmp_path / "sd3.safetensors"
    safetensors_io.save(str(base), _sd3.single_file(comps), {})
    from tests import _flux
    flux_lora = tmp_path / "f.safetensors"
    safetensors_io.save(str(flux_lora), _flux.kohya_lora(_flux.transformer()), {"ss_base_model_version": "flux1"})
    with pytest.raises(IncompatibleError, match="Flux LoRA, SD3 checkpoint"):
        merge(str(base), [str(flux_lora)], str(tmp_path / "o.safetensors"))
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_inspect_and_loaders_of_a_kohya_sd3_file(tmp_path, capsys):
    from loratools.loaders import compatibility
    from tests._tiny import run_cli
    path, _ = _kohya_file(tmp_path, _sd3.transformer())
    code, out, err = run_cli(capsys, "inspect", path, "--format", "json")
    rep = json.loads(out)
    assert code == 0 and err == "" and rep["unresolved"] == []
    assert rep["family"] == {"name": SD3, "evidence": "metadata ss_base_model_version=sd3"}
    assert "transformer.transformer_blocks.0.attn2.to_v" in out and "lora_unet_" not in out
    loads = compatibility(read_adapter(path))
    assert loads["ComfyUI"]["ok"] and not loads["diffusers"]["ok"] and "SD3 loader" in loads["diffusers"]["why"]
    diffusers_file = write_adapter(read_adapter(path), tmp_path / "d.safetensors", format="diffusers")
    assert compatibility(read_adapter(diffusers_file))["diffusers"]["ok"]
