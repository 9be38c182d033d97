"""Flux.1's original (BFL) module names: the name table that `archs.fused` converts with.

BFL checkpoints, kohya (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI
(`diffusion_model.double_blocks.0.img_attn.qkv`) name the transformer's modules as BFL does, with
q, k, v fused into one projection (`single_blocks.N.linear1` also holds the MLP's input rows);
diffusers splits them. BFL's final adaLN stores [shift; scale] where diffusers' `norm_out.linear`
stores [scale; shift].
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .family import FLUX, adapter_family
from .fused import COMPONENT, SCALED_FP8_MARKS, Fused, Layout, fuse, split  # noqa: F401  (the Flux API)

_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
           "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
           "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
           "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation.lin": ("norm.linear",)}
_GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
# rows / input width of the modules whose widths tell Flux.1 from FLUX.2 (same names, other MLP)
RATIOS = {"img_mlp.0": 4, "txt_mlp.0": 4, "img_mlp.2": 1 / 4, "txt_mlp.2": 1 / 4, "linear1": 7, "linear2": 1 / 5}
MLP_RATIO = 4  # Flux.1's single-block MLP width / hidden width (sizes a missing proj_mlp part)
# single-file Flux checkpoints and ComfyUI LoRAs: the text encoders' key prefixes -> pipeline component
TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder",
                 "text_encoders.t5xxl.transformer.": "text_encoder_2"}
# diffusers' names flattened: OneTrainer (`lora_transformer_`, T5 as te2), older ai-toolkit (`lora_unet_`)
ONETRAINER = {"lora_transformer_": "transformer", "lora_te2_": "text_encoder_2", "lora_unet_": "transformer"}

LAYOUT = Layout(FLUX, [("double_blocks", "transformer_blocks", _DOUBLE),
                       ("single_blocks", "single_transformer_blocks", _SINGLE)], _GLOBAL,
                swaps=("final_layer.adaLN_modulation.1",), rest_last=("linear1",), mlp_ratio=MLP_RATIO,
                text_encoders=TEXT_ENCODERS, kohya_te={"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"},
                manifest="flux", markers=("double_blocks.0.img_attn.qkv.weight",), kohya_module="networks.lora_flux",
                kohya_read=ONETRAINER, ratios=RATIOS)
lookup, unflatten, original_of = LAYOUT.lookup, LAYOUT.unflatten, LAYOUT.original_of
to_original, from_original, is_flux_module = LAYOUT.to_original, LAYOUT.from_original, LAYOUT.is_module
checkpoint_prefix = LAYOUT.checkpoint_prefix


def original_names(num_layers: int, num_single_layers: int, guidance: bool) -> Dict[str, List[str]]:
    """Every original module name of a Flux transformer -> its diffusers parts (for the manifest)."""
    names = [g for g in _GLOBAL if guidance or not g.startswith("guidance_in")]
    names += [f"double_blocks.{i}.{k}" for i in range(num_layers) for k in _DOUBLE]
    names += [f"single_blocks.{i}.{k}" for i in range(num_single_layers) for k in _SINGLE]
    return {name: list(lookup(name).parts) for name in names}


def other_family(adapter) -> Optional[str]:
    """Why the adapter's transformer is no Flux.1 one ("SD3 LoRA (evidence)"), or None. SD3 shares diffusers'
    `transformer_blocks.N.attn.to_q` names, so those alone must not be renamed into Flux's original ones; Wan's
    `transformer.blocks.N` names tell themselves."""
    fam = adapter_family(adapter)
    if fam is None or fam[0] == FLUX or not any(m.name.startswith(COMPONENT + ".") for m in adapter):
        return None
    return f"{fam[0]} LoRA ({fam[1]})"
