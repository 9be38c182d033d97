"""Qwen-Image's original module names: diffusers' own (`archs.fused.Layout` renaming each to itself).

Qwen's checkpoints, diffusers, ComfyUI, DiffSynth-Studio, ai-toolkit and musubi-tuner all name the transformer's
modules alike (`transformer_blocks.N.attn.to_q`, `img_mod.1`, `img_mlp.net.0.proj`, `txt_mlp.net.2`, `img_in`,
`proj_out` …) and none fuses projections, so every layout is a prefix: `transformer.` (diffusers / PEFT),
`diffusion_model.` (ComfyUI, DiffSynth, ai-toolkit), none (Lightning LoRAs), `lora_unet_` with dots as `_`
(musubi-tuner). `img_in` and `txt_in` are also Flux's original names: a file is Qwen-Image's when most of its
names are. No text encoder: diffusers' Qwen-Image loader takes transformer LoRAs only, and Qwen2.5-VL LoRAs are rare.
"""
from __future__ import annotations

from .family import QWEN
from .fused import Layout

_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
          "attn.to_out.0", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
          "txt_mlp.net.0.proj", "txt_mlp.net.2")
_GLOBAL = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
           "time_text_embed.timestep_embedder.linear_2")

LAYOUT = Layout(QWEN, [("transformer_blocks", "transformer_blocks", {k: (k,) for k in _BLOCK})],
                {k: k for k in _GLOBAL}, manifest="qwen-image", markers=("transformer_blocks.0.img_mod.1.weight",),
                kohya_module="networks.lora_qwen_image")
