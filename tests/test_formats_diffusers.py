"""diffusers and PEFT-for-diffusion formats; oracles: diffusers' load_lora_weights / save_lora_weights /
state-dict converters, PEFT's PeftModel.from_pretrained and get_delta_weight."""
import json
import os

import pytest
import safetensors.torch
import torch

import _formats_models as M
from loratools import safetensors_io
from loratools.cli.main import main
from loratools.errors import IncompatibleError
from loratools.formats import detect, read_adapter, write_adapter


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers")
    models = M.peft_pipeline_lora(str(d / "peft"))  # per-module alphas on attention too
    return d, models, read_adapter(str(d / "peft"))


def _tensors(path):
    return safetensors_io.load(path)[0]


def test_diffusers_file_loads_with_the_same_outputs(lora):
    d, models, adapter = lora
    path = write_adapter(adapter, str(d / "pytorch_lora_weights.safetensors"), format="diffusers")
    assert detect(path) == "diffusers"
    meta = json.loads(safetensors_io.load(path)[1]["lora_adapter_metadata"])
    assert meta["unet.alpha_pattern"] and meta["text_encoder.r"] == 3
    pipe = M.pipeline()
    pipe.load_lora_weights(path)
    torch.testing.assert_close(M.unet_out(pipe.unet), M.unet_out(models["unet"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.te_out(pipe.text_encoder), M.te_out(models["text_encoder"]), rtol=1e-5, atol=1e-5)
    back = read_adapter(path)
    deltas = M.peft_deltas(models)
    for name, m in back.modules.items():
        torch.testing.assert_close(m.dense_delta(), deltas[name].reshape(m.weight_shape), rtol=1e-5, atol=1e-6)


def test_round_trips_through_every_format_are_bit_exact(lora):
    d, models, adapter = lora
    src = adapter
    for i, fmt in enumerate(["diffusers", "kohya", "peft_diffusion", "diffusers"]):
        out = write_adapter(src, str(d / f"rt{i}_{fmt}{'.safetensors' if fmt == 'kohya' else ''}"), format=fmt)
        src = read_adapter(out)
        assert src.format == fmt and set(src.modules) == set(adapter.modules)
        for name, m in src.modules.items():
            o = adapter.modules[name]
            assert torch.equal(m.down, o.down) and torch.equal(m.up, o.up) and m.scale == o.scale, (fmt, name)


def test_files_diffusers_writes_read_back_exactly(lora, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    d, models, adapter = lora
    layers = {c: {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(models[c]).items()}
              for c in ("unet", "text_encoder")}
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=models["unet"].peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=models["text_encoder"].peft_config["default"].to_dict())
    theirs = read_adapter(str(tmp_path))  # the folder form
    for name, m in theirs.modules.items():
        assert torch.equal(m.down, adapter.modules[name].down) and m.scale == adapter.modules[name].scale
    ours = write_adapter(theirs, str(tmp_path / "ours.safetensors"))
    t1, t2 = _tensors(str(tmp_path / "pytorch_lora_weights.safetensors")), _tensors(ours)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_alpha_keys_and_old_attention_processor_form(lora, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft
    d, models, adapter = lora
    sd = {}
    for m in adapter:
        comp, local = m.name.split(".", 1)
        if comp == "unet" and local.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            attn, proj = (local[: -len(".to_out.0")], "to_out") if local.endswith(".to_out.0") else local.rsplit(".", 1)
            stem = f"{comp}.{attn}.processor.{proj}_lora"
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = m.down, m.up
        elif comp == "text_encoder" and local.endswith("mlp.fc1"):
            sd[f"{comp}.{local}.lora_linear_layer.down.weight"] = m.down
            sd[f"{comp}.{local}.lora_linear_layer.up.weight"] = m.up
        else:
            sd[f"{comp}.{local}.lora_A.weight"], sd[f"{comp}.{local}.lora_B.weight"] = m.down, m.up
            sd[f"{comp}.{local}.alpha"] = torch.tensor(m.alpha_value)
    path = str(tmp_path / "old.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    back = read_adapter(path)
    assert back.format == "diffusers" and set(back.modules) == set(adapter.modules)
    for name, m in back.modules.items():
        assert torch.equal(m.down, adapter.modules[name].down)
        if "to_" not in name and "fc1" not in name:
            assert m.alpha == adapter.modules[name].alpha_value  # from the .alpha keys
    # diffusers' own mapping of the old text-encoder form agrees with ours
    te_old = {k: v for k, v in sd.items() if "lora_linear_layer" in k}
    peft_keys = convert_state_dict_to_peft(te_old)
    assert {k.rsplit(".lora_A", 1)[0] for k in peft_keys if ".lora_A" in k} == {
        n for n in back.modules if n.endswith("mlp.fc1")}


def test_peft_diffusion_folder_loads_in_peft(lora, tmp_path):
    from peft import PeftModel
    d, models, adapter = lora
    out = write_adapter(adapter, str(tmp_path / "pd"), format="peft_diffusion")
    assert detect(out) == "peft_diffusion" and sorted(os.listdir(out)) == ["text_encoder", "unet"]
    pm = PeftModel.from_pretrained(M.unet(), os.path.join(out, "unet"))
    torch.testing.assert_close(M.unet_out(pm), M.unet_out(models["unet"]), rtol=1e-5, atol=1e-5)


def test_dora_survives_diffusers_and_kohya(tmp_path):
    models = M.peft_pipeline_lora(str(tmp_path / "peft"), use_dora=True)
    adapter = read_adapter(str(tmp_path / "peft"))
    path = write_adapter(adapter, str(tmp_path / "dora.safetensors"), format="diffusers")
    pipe = M.pipeline()
    pipe.load_lora_weights(path)
    torch.testing.assert_close(M.unet_out(pipe.unet), M.unet_out(models["unet"]), rtol=1e-4, atol=1e-4)
    k = read_adapter(write_adapter(adapter, str(tmp_path / "dora_kohya.safetensors"), format="kohya"))
    for name, m in k.modules.items():
        assert torch.equal(m.magnitude, adapter.modules[name].magnitude.reshape(-1))


def test_conv_dora_from_kohya_loads_in_diffusers_and_peft(tmp_path):
    """kohya keeps conv magnitudes as [out, 1, 1, 1] (read as [out]); PEFT and diffusers want [1, out, 1, 1]."""
    from peft import PeftModel
    models = M.peft_pipeline_lora(str(tmp_path / "peft"), use_dora=True)
    kohya = write_adapter(read_adapter(str(tmp_path / "peft")), str(tmp_path / "k.safetensors"), format="kohya")
    adapter = read_adapter(kohya)
    conv = adapter.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.kind == "conv" and conv.magnitude.dim() == 1  # the shape kohya's dora_scale gives
    path = write_adapter(adapter, str(tmp_path / "dora.safetensors"), format="diffusers")
    assert _tensors(path)["unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"].shape == (1, 32, 1, 1)
    pipe = M.pipeline()
    pipe.load_lora_weights(path)
    torch.testing.assert_close(M.unet_out(pipe.unet), M.unet_out(models["unet"]), rtol=1e-4, atol=1e-4)
    folder = write_adapter(adapter, str(tmp_path / "pd"), format="peft_diffusion")
    pm = PeftModel.from_pretrained(M.unet(), os.path.join(folder, "unet"))
    torch.testing.assert_close(M.unet_out(pm), M.unet_out(models["unet"]), rtol=1e-4, atol=1e-4)
    assert read_adapter(path).modules[conv.name].magnitude.shape == (1, 32, 1, 1)  # and read back as written


def test_bare_names_need_a_component(tmp_path):
    from peft import get_peft_model
    pm = get_peft_model(M.unet(), M.lora_config(["to_q"]))
    pm.save_pretrained(str(tmp_path / "unet_only"))
    with pytest.raises(IncompatibleError, match="--component"):
        write_adapter(read_adapter(str(tmp_path / "unet_only")), str(tmp_path / "x.safetensors"), format="diffusers")
    out = str(tmp_path / "k.safetensors")
    assert main(["convert", str(tmp_path / "unet_only"), "--component", "unet", "--to", "kohya", "-o", out]) == 0
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block_") for k in _tensors(out))
