"""SD3 / SD3.5's original (Stability MMDiT) module names: the name table that `archs.fused` converts with.

Stability's checkpoints, kohya sd-scripts (`lora_unet_joint_blocks_0_x_block_attn_qkv`, networks/lora_sd3.py)
and ComfyUI (`diffusion_model.joint_blocks.0.x_block.attn.qkv`) fuse q, k, v (`x_block.attn.qkv`, SD3.5's
`x_block.attn2.qkv`, `context_block.attn.qkv`); diffusers splits them. The last joint block's context
stream is pre-only (no proj, no MLP, an adaLN of 2 chunks, not 6) and, like the final layer's adaLN, stores
[shift; scale] where diffusers' `AdaLayerNormContinuous` stores [scale; shift]. The table is checked tensor
for tensor against diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` in the tests.
"""
from __future__ import annotations

from .family import SD3
from .fused import Layout

_QKV = ("to_q", "to_k", "to_v")
_JOINT = {"x_block.attn.qkv": tuple(f"attn.{p}" for p in _QKV), "x_block.attn.proj": ("attn.to_out.0",),
          "x_block.attn2.qkv": tuple(f"attn2.{p}" for p in _QKV), "x_block.attn2.proj": ("attn2.to_out.0",),
          "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
          "x_block.adaLN_modulation.1": ("norm1.linear",),
          "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "context_block.attn.proj": ("attn.to_add_out",),
          "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",),
          "context_block.adaLN_modulation.1": ("norm1_context.linear",)}
_GLOBAL = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
           "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
# Stability's single files (sd3_medium_incl_clips_t5xxlfp16 …) and ComfyUI LoRAs: text encoder prefixes
TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder",
                 "text_encoders.clip_g.transformer.": "text_encoder_2",
                 "text_encoders.t5xxl.transformer.": "text_encoder_3"}

LAYOUT = Layout(SD3, [("joint_blocks", "transformer_blocks", _JOINT)], _GLOBAL,
                swaps=("context_block.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
                text_encoders=TEXT_ENCODERS,
                kohya_te={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"},
                manifest="sd3", markers=("joint_blocks.0.x_block.attn.qkv.weight",), kohya_module="networks.lora_sd3")
