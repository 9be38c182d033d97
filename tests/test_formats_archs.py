"""Manifests, their generator, and name resolution without `_`-splitting."""
import pytest
import torch

from loratools.archs import NameMap, canonical, resolve_kohya
from loratools.archs import generate
from loratools.archs.ldm import ldm_unet_names, to_ldm
from loratools.errors import FormatError


def test_generator_output_matches_the_shipped_manifests():
    assert generate.main(["--check"]) == 0


@pytest.mark.parametrize("config", [generate.UNET_SD1, generate.UNET_SDXL], ids=["sd1", "sdxl"])
def test_ldm_names_agree_with_diffusers_single_file_converter(config):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    unet = generate.build_meta("UNet2DConditionModel", config)
    names = [n for n, _ in unet.named_parameters()]
    table = ldm_unet_names(config)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + to_ldm(n, table): n for n in names}, config)
    assert converted == {n: n for n in names}  # every LDM name maps back to the diffusers name it came from


def test_manifests_resolve_real_world_kohya_names():
    names = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0":
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
            "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_up_blocks_1_attentions_2_proj_in": "unet.up_blocks.1.attentions.2.proj_in",
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj": "text_encoder.text_model.encoder.layers.11.self_attn.q_proj",
    }
    mapping, unmatched, nm = resolve_kohya(names)
    assert mapping == names and not unmatched and nm.source == "the sd1 manifest"
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
            "lora_unet_output_blocks_0_0_in_layers_2": "unet.up_blocks.0.resnets.0.conv1",
            "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
            "lora_te2_text_model_encoder_layers_31_mlp_fc2": "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1",
            "lora_te2_encoder_layers_0_mlp_fc1": "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"}
    mapping, unmatched, nm = resolve_kohya(sdxl)
    assert mapping == sdxl and nm.source == "the sdxl manifest"


def test_diffusers_heuristic_agrees_on_sgm_names():
    """diffusers maps kohya SDXL names by string surgery; where it can, it must agree with our forward map."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, \
        _maybe_map_sgm_blocks_to_diffusers
    from loratools.formats.diffusers import parse_key
    nm = NameMap.from_manifest("sdxl")
    keys = sorted(k.split(":")[1] for k in nm._flat if k.startswith("unet:input_blocks_4_1_transformer_blocks_0")
                  or k.startswith("unet:output_blocks_3_1_transformer_blocks_1_attn"))
    sd = {}
    for k in keys:
        sd[f"lora_unet_{k}.lora_down.weight"] = torch.zeros(1, 1)
        sd[f"lora_unet_{k}.lora_up.weight"] = torch.zeros(1, 1)
    sd = _maybe_map_sgm_blocks_to_diffusers(sd, generate.build_meta("UNet2DConditionModel", generate.UNET_SDXL).config)
    theirs, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    theirs = {parse_key(k)[0] for k in theirs}
    mapping, unmatched, _ = resolve_kohya([f"lora_unet_{k}" for k in keys])
    assert not unmatched and len(keys) > 10 and theirs == set(mapping.values())


def test_ambiguous_flattened_names_are_an_error():
    nm = NameMap("test", {"unet.a.b_c": (2, 2), "unet.a_b.c": (2, 2)})
    assert sorted(nm.resolve("unet", "a_b_c")) == ["unet.a.b_c", "unet.a_b.c"]
    import loratools.archs as archs
    orig = archs.NameMap.from_manifest
    archs.NameMap.from_manifest = classmethod(lambda cls, arch: nm)
    try:
        with pytest.raises(FormatError, match="ambiguous"):
            resolve_kohya(["lora_unet_a_b_c"])
    finally:
        archs.NameMap.from_manifest = orig


def test_canonical_clip_names():
    assert canonical("text_encoder.encoder.layers.0.mlp.fc1") == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    assert canonical("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") == \
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"  # T5 keeps its names
    assert canonical("unet.encoder.layers.0") == "unet.encoder.layers.0"
