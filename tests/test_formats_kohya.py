"""kohya format: oracles are diffusers (load_lora_weights, lora_state_dict, convert_state_dict_to_kohya),
PEFT's get_delta_weight and torch convolutions."""
import hashlib
import json
import os
import struct

import pytest
import safetensors.torch
import torch

import _formats_models as M
from loratools import safetensors_io
from loratools.adapter import LoraAdapter, LoraModule
from loratools.archs import flat_clip
from loratools.cli.main import main
from loratools.errors import FormatError, IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter

# diffusers' kohya loader drops per-module alphas of attention projections (its alpha key names keep
# `to_v_lora.down.weight`) and of text-encoder modules under transformers 5 (`text_model.` stays in
# the pattern); our files hold them (checked with lora_state_dict below), so give those uniform alphas
UNIFORM_ATTN = {"conv1": 5.5, "ff.net.2": 6}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    d = tmp_path_factory.mktemp("kohya")
    models = M.peft_pipeline_lora(str(d / "peft"), unet_alphas=UNIFORM_ATTN, te_alphas={})
    adapter = read_adapter(str(d / "peft"))
    path = write_adapter(adapter, str(d / "lora.safetensors"), format="kohya")
    return d, models, adapter, path


def test_kohya_file_loads_in_diffusers_with_the_same_outputs(lora):
    d, models, adapter, path = lora
    assert detect(path) == "kohya"
    pipe = M.pipeline()
    pipe.load_lora_weights(path)
    base = M.unet_out(M.unet())
    ref, got = M.unet_out(models["unet"]), M.unet_out(pipe.unet)
    assert (ref - base).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.te_out(pipe.text_encoder), M.te_out(models["text_encoder"]), rtol=1e-5, atol=1e-5)


def test_kohya_read_back_matches_peft_deltas_and_is_bit_exact(lora):
    d, models, adapter, path = lora
    back = read_adapter(path)
    assert back.format == "kohya" and set(back.modules) == set(adapter.modules)
    deltas = M.peft_deltas(models)
    for name, m in back.modules.items():
        assert torch.equal(m.down, adapter.modules[name].down) and torch.equal(m.up, adapter.modules[name].up)
        torch.testing.assert_close(m.dense_delta(), deltas[name].reshape(m.weight_shape), rtol=1e-5, atol=1e-6)
    again = write_adapter(back, str(d / "again.safetensors"))
    t1, meta1 = safetensors_io.load(path)
    t2, meta2 = safetensors_io.load(again)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)
    assert meta1 == meta2


def test_kohya_metadata_and_hashes(lora):
    d, models, adapter, path = lora
    tensors, meta = safetensors_io.load(path)
    assert meta["ss_network_dim"] == "Dynamic"  # attn2.to_k has rank 2, the rest 4 / 3
    assert meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()  # what addnet computes from the file
    # kohya precalculates over safetensors' own serialisation with only the ss_* metadata
    blob = safetensors.torch.save(safetensors.torch.load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    # a uniform adapter gets plain numbers
    uni = LoraAdapter(modules={"unet.conv_in": LoraModule("unet.conv_in", torch.ones(4, 8), torch.ones(8, 4), alpha=2.0)})
    p = write_adapter(uni, str(d / "uni.safetensors"), format="kohya")
    _, m = safetensors_io.load(p)
    assert (m["ss_network_dim"], m["ss_network_alpha"]) == ("4", "2.0")


def test_diffusers_convert_state_dict_to_kohya_reads_back_with_its_scale(tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    models = M.peft_pipeline_lora(str(tmp_path / "peft"), unet_alphas={})
    sd = {}
    for comp in ("unet", "text_encoder"):
        sd.update({f"{comp}.{k.removeprefix('base_model.model.')}": v
                   for k, v in get_peft_model_state_dict(models[comp]).items()})
    ksd = convert_state_dict_to_kohya(sd)
    path = str(tmp_path / "diffusers_kohya.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in ksd.items()}, path)
    adapter = read_adapter(path)
    assert adapter.format == "kohya" and len(adapter) * 2 == len(sd)
    for name, m in adapter.modules.items():
        comp, local = flat_clip(name).split(".", 1)  # PEFT saw the transformers >= 5 spelling
        a, b = sd[f"{comp}.{local}.lora_A.weight"], sd[f"{comp}.{local}.lora_B.weight"]
        assert m.scale == 1.0  # diffusers writes alpha = rank
        torch.testing.assert_close(m.dense_delta(), (b.flatten(1) @ a.flatten(1)).reshape(m.weight_shape))


def test_kohya_names_with_nontrivial_alpha_match_diffusers_lora_state_dict(lora):
    from diffusers import StableDiffusionPipeline
    d, models, adapter, path = lora
    m = next(iter(adapter))
    ours = read_adapter(path)
    _, alphas = StableDiffusionPipeline.lora_state_dict(path)
    conv1 = [k for k in ours.modules if k.endswith(".conv1")]
    assert conv1 and all(ours.modules[k].alpha == 5.5 for k in conv1)
    assert sorted(v for k, v in alphas.items() if "conv1" in k) == [5.5] * len(conv1)
    assert m.name in ours.modules


def test_sdxl_sgm_names_resolve_and_load_in_diffusers(tmp_path):
    models = M.peft_pipeline_lora(str(tmp_path / "peft"), xl=True, unet_alphas={})
    adapter = read_adapter(str(tmp_path / "peft"))
    base = M.save_pipeline(str(tmp_path / "base"), xl=True)
    from loratools.archs import NameMap
    nm = NameMap.from_base(base)
    to_sgm = {}
    for flat_key in list(nm._flat):
        comp, flat = flat_key.split(":")
        hits = nm.resolve(comp, flat)
        if comp == "unet" and flat.startswith(("input_blocks", "middle_block", "output_blocks")):
            to_sgm[hits[0]] = "lora_unet_" + flat
    adapter.config = {"keys": {n: to_sgm[n] for n in adapter.modules if n in to_sgm}}
    adapter.format = "kohya"
    path = write_adapter(adapter, str(tmp_path / "sgm.safetensors"))
    keys = list(safetensors_io.load(path)[0])
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any("lora_te2_" in k for k in keys)
    back = read_adapter(path, base=base)
    assert set(back.modules) == set(adapter.modules)
    pipe = M.pipeline(xl=True)
    pipe.load_lora_weights(path)  # diffusers maps SGM blocks with the UNet's config
    torch.testing.assert_close(M.unet_out(pipe.unet, xl=True), M.unet_out(models["unet"], xl=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.te_out(pipe.text_encoder_2).float(), M.te_out(models["text_encoder_2"]), rtol=1e-5, atol=1e-5)


def test_tucker_lora_mid_matches_chained_convolutions(tmp_path):
    torch.manual_seed(3)
    down, mid, up = torch.randn(3, 8, 1, 1), torch.randn(3, 3, 3, 3), torch.randn(16, 3, 1, 1)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = str(tmp_path / "tucker.safetensors")
    safetensors.torch.save_file({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                                 f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.5)}, path)
    m = read_adapter(path).modules["unet.down_blocks.0.resnets.0.conv1"]
    x = torch.randn(2, 8, 6, 6)
    chained = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, m.dense_delta(), padding=1), chained * 0.5, rtol=1e-4, atol=1e-4)
    again = write_adapter(read_adapter(path), str(tmp_path / "again.safetensors"))
    assert torch.equal(safetensors_io.load(again)[0][f"{name}.lora_mid.weight"], mid)


def test_unknown_names_are_listed_unless_allowed(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    safetensors.torch.save_file({"lora_unet_no_such_block_to_q.lora_down.weight": torch.ones(2, 4),
                                 "lora_unet_no_such_block_to_q.lora_up.weight": torch.ones(4, 2),
                                 "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
                                 "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1)}, path)
    with pytest.raises(FormatError, match="lora_unet_no_such_block_to_q"):
        read_adapter(path)
    out = str(tmp_path / "out.safetensors")
    assert main(["convert", path, "--to", "diffusers", "-o", out]) == 1 and not os.path.exists(out)
    assert main(["convert", path, "--to", "diffusers", "-o", out, "--allow-unmatched"]) == 0
    assert list(read_adapter(out).modules) == ["unet.conv_in"]


def test_kohya_refuses_what_it_cannot_hold(tmp_path):
    emb = LoraAdapter(modules={"text_encoder.x": LoraModule("text_encoder.x", torch.ones(2, 10), torch.ones(4, 2), kind="embedding")})
    with pytest.raises(IncompatibleError, match="embedding"):
        write_adapter(emb, str(tmp_path / "e.safetensors"), format="kohya")
    bare = LoraAdapter(modules={"model.layers.0.q": LoraModule("model.layers.0.q", torch.ones(2, 4), torch.ones(4, 2))})
    with pytest.raises(IncompatibleError, match="--component"):
        write_adapter(bare, str(tmp_path / "b.safetensors"), format="kohya")
    assert not os.listdir(tmp_path)


def test_text_encoder_names_are_written_in_sd_scripts_form(lora, tmp_path):
    """LyCORIS under transformers 5 writes `lora_te_encoder_layers_…` (no `text_model`), which ComfyUI
    drops; kohya output always uses sd-scripts' `lora_te_text_model_encoder_layers_…`. Oracle: diffusers'
    kohya loader gives the PEFT text encoder's outputs from what we write."""
    _, models, _, canonical = lora
    tensors, meta = safetensors_io.load(canonical)
    flat = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    assert any(k.startswith("lora_te_encoder_layers_") for k in flat)
    safetensors_io.save(str(tmp_path / "flat.safetensors"), flat, meta)
    out = str(tmp_path / "again.safetensors")
    assert main(["convert", str(tmp_path / "flat.safetensors"), "--to", "kohya", "-o", out]) == 0
    again = safetensors_io.load(out)[0]
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    pipe = M.pipeline()
    pipe.load_lora_weights(out)
    torch.testing.assert_close(M.te_out(pipe.text_encoder), M.te_out(models["text_encoder"]), rtol=1e-5, atol=1e-5)
