"""Original (LDM / SGM) names of diffusers UNet modules: kohya trains SDXL on the SGM UNet, so
its SDXL LoRAs name modules `input_blocks.4.1…` where diffusers says `down_blocks.1.attentions.0…`."""
from __future__ import annotations

from typing import Dict


def ldm_unet_names(config: dict) -> Dict[str, str]:
    """diffusers UNet name prefix -> original LDM/SGM prefix, from the block layout.

    The same table as diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py; the test
    suite checks it against diffusers' own `convert_ldm_unet_checkpoint`.
    """
    n_blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    table = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1"}
    for j in range(2):
        table[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    for i in range(n_blocks):
        for j in range(layers):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(layers + 1) * i + j + 1}.0"
            if down_attn[i]:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(layers + 1) * i + j + 1}.1"
        if i < n_blocks - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op"
        for j in range(layers + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(layers + 1) * i + j}.0"
            if up_attn[i]:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(layers + 1) * i + j}.1"
        if i < n_blocks - 1:
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attn[i] else 1}"
    return table


RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_ldm(name: str, table: Dict[str, str]) -> str:
    """The LDM/SGM name of a diffusers UNet parameter or module name."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # longest matching prefix
        head = ".".join(parts[:cut])
        if head in table:
            rest = parts[cut:]
            if ".resnets." in head and rest and rest[0] in RESNET_PARTS:
                rest = RESNET_PARTS[rest[0]].split(".") + rest[1:]
            return ".".join([table[head]] + rest)
    raise KeyError(f"no LDM name for UNet module {name}")
