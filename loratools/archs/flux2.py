"""FLUX.2's original (BFL) module names: the name table that `archs.fused` converts with.

FLUX.2 [dev] and [klein] checkpoints, kohya-style files (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI /
ai-toolkit (`diffusion_model.double_blocks.0.img_attn.qkv`) name the transformer as BFL does. Only the double
blocks' q, k, v are fused there and split in diffusers (`transformer_blocks.N.attn.to_q` …); a single block's
`linear1` is fused in diffusers too (`attn.to_qkv_mlp_proj`), so it is a rename. FLUX.2 has no per-block
modulation: three shared ones (`double_stream_modulation_img.lin` …) feed every block. Its names reuse Flux.1's
block names (`double_blocks`, `single_blocks`, `img_mlp.0`), but its widths differ: the MLP is a SwiGLU of
3·hidden (`img_mlp.0` has 6·hidden rows where Flux.1's has 4, `linear1` 9·hidden where Flux.1's has 7).
"""
from __future__ import annotations

import re

from .family import FLUX2
from .fused import Layout

_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
           "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
           "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
_GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
           "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
           "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
           "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
           "single_stream_modulation.lin": "single_stream_modulation.linear",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
# rows / input width of the modules whose widths tell FLUX.2 from Flux.1 (same names, other MLP)
RATIOS = {"img_mlp.0": 6, "txt_mlp.0": 6, "img_mlp.2": 1 / 3, "txt_mlp.2": 1 / 3, "linear1": 9, "linear2": 1 / 4}

LAYOUT = Layout(FLUX2, [("double_blocks", "transformer_blocks", _DOUBLE),
                        ("single_blocks", "single_transformer_blocks", _SINGLE)], _GLOBAL,
                swaps=("final_layer.adaLN_modulation.1",), manifest="flux2",
                markers=("single_stream_modulation.lin.weight",), kohya_module="networks.lora_flux_2",
                ratios=RATIOS, implicit_alpha=True)
# the diffusers modules whose kohya names diffusers' FLUX.2 converter maps (0.42: it drops the modulations, the
# guidance embedder and the final adaLN with a warning)
KOHYA_DIFFUSERS = re.compile(r"transformer\.(transformer_blocks\.\d+\.(attn|ff|ff_context)\.\w+(\.0)?"
                             r"|single_transformer_blocks\.\d+\.attn\.\w+|x_embedder|context_embedder|proj_out"
                             r"|time_guidance_embed\.timestep_embedder\.linear_[12])")
