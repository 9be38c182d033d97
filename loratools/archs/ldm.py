"""Original (LDM / SGM) names of diffusers modules.

kohya trains SDXL on the SGM UNet, so its SDXL LoRAs name modules `input_blocks.4.1…` where
diffusers says `down_blocks.1.attentions.0…` (`ldm_unet_names`, `to_ldm`). Single-file SD
checkpoints store every tensor under these names (`LdmLayout`, used by merge):

    unet            model.diffusion_model.<input_blocks / middle_block / output_blocks …>
    text_encoder    cond_stage_model.transformer.<HF CLIP name>            (SD 1.x)
                    cond_stage_model.model.<OpenCLIP name>                 (SD 2.x)
                    conditioner.embedders.0.transformer.<HF CLIP name>     (SDXL)
    text_encoder_2  conditioner.embedders.1.model.<OpenCLIP name>          (SDXL; .0. in the refiner)

OpenCLIP fuses q, k, v into `attn.in_proj_weight` (rows [q; k; v]) and stores `text_projection`
transposed. These rules are the inverse of diffusers' single-file converters (checked against
them in tests), written by hand so diffusers is not needed at run time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from ..errors import FormatError


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


UNET_PREFIX = "model.diffusion_model."
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclass(frozen=True)
class Slot:
    """A diffusers tensor inside a checkpoint tensor: `key`, rows `part`/3 of it if `part` is set
    (OpenCLIP's fused in_proj), stored transposed if `transpose`."""

    key: str
    part: Optional[int] = None
    transpose: bool = False


def _split_param(name: str) -> Tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def openclip_slot(name: str) -> Optional[Tuple[str, Optional[int], bool]]:
    """(OpenCLIP key, q/k/v part, transposed) of a diffusers CLIP text-model parameter, or None."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    if name in fixed:
        return fixed[name], None, False
    if name == "text_projection.weight":
        return "text_projection", None, True
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    layer, module, param = m.groups()
    base = f"transformer.resblocks.{layer}."
    qkv = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)", module)
    if qkv:
        return f"{base}attn.in_proj_{param}", _QKV[qkv.group(1)], False
    if module in _OPENCLIP_LAYER:
        return f"{base}{_OPENCLIP_LAYER[module]}.{param}", None, False
    return None


class LdmLayout:
    """How one single-file checkpoint is laid out: its architecture, the UNet's block layout (the
    diffusers config keys `ldm_unet_names` reads) and, per text-encoder component, its naming
    (`hf` or `openclip`) and key prefix."""

    def __init__(self, arch: str, unet_config: dict, text_encoders: Dict[str, Tuple[str, str]]):
        self.arch = arch
        self.unet_table = ldm_unet_names(unet_config)
        self.unet_table.update({"class_embedding.linear_1": "label_emb.0.0",
                                "class_embedding.linear_2": "label_emb.0.2"})
        self.text_encoders = text_encoders

    @classmethod
    def from_keys(cls, keys: Iterable[str], where: str = "checkpoint") -> "LdmLayout":
        keys = {k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else "\0" + k for k in keys}  # \0: not UNet
        ops = [int(m.group(1)) for k in keys for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", k)] if m]
        if not ops:
            raise FormatError(f"{where}: no UNet downsampler (model.diffusion_model.input_blocks.N.0.op) found; "
                              "not an SD 1.x/2.x/SDXL single-file checkpoint")
        lpb, n_blocks = min(ops) - 1, len(ops) + 1
        heads = {".".join(k.split(".")[:3]) for k in keys if not k.endswith((".conv.weight", ".conv.bias"))}
        down = [f"input_blocks.{(lpb + 1) * i + 1}.1" in heads for i in range(n_blocks)]
        up = [f"output_blocks.{(lpb + 1) * i}.1" in heads for i in range(n_blocks)]
        config = {"block_out_channels": [0] * n_blocks, "layers_per_block": lpb,
                  "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down],
                  "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up]}
        keys = [k[1:] for k in keys if k.startswith("\0")]
        tes: Dict[str, Tuple[str, str]] = {}
        for prefix, kind in (("cond_stage_model.transformer.", "hf"), ("cond_stage_model.model.", "openclip")):
            if any(k.startswith(prefix) for k in keys):
                tes["text_encoder"] = (kind, prefix)
        embedder = re.compile(r"conditioner\.embedders\.(\d+)\.")
        for i in sorted({int(m.group(1)) for k in keys for m in [embedder.match(k)] if m}):
            if any(k.startswith(f"conditioner.embedders.{i}.transformer.") for k in keys):
                tes["text_encoder"] = ("hf", f"conditioner.embedders.{i}.transformer.")
            elif any(k.startswith(f"conditioner.embedders.{i}.model.") for k in keys):
                tes["text_encoder_2"] = ("openclip", f"conditioner.embedders.{i}.model.")
        if "text_encoder_2" in tes:
            arch = "sdxl" if "text_encoder" in tes else "sdxl-refiner"
        else:
            arch = "sd2" if tes.get("text_encoder", ("",))[0] == "openclip" else "sd1"
        return cls(arch, config, tes)

    def slot(self, name: str) -> Optional[Slot]:
        """Where the component-prefixed diffusers parameter `name` lives, or None."""
        comp, _, rest = name.partition(".")
        if comp == "unet":
            try:
                return Slot(UNET_PREFIX + to_ldm(rest, self.unet_table))
            except KeyError:
                return None
        if comp not in self.text_encoders:
            return None
        kind, prefix = self.text_encoders[comp]
        if not rest.startswith(("text_model.", "text_projection.")):
            rest = "text_model." + rest  # transformers 5 saves CLIPTextModel without `text_model.`
        if kind == "hf":
            return Slot(prefix + rest)
        found = openclip_slot(rest)
        if found is None:
            return None
        key, part, transpose = found
        return Slot(prefix + key, part, transpose)


def is_ldm_checkpoint(keys: Iterable[str]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in keys)
