"""Where a diffusers parameter lives in an original single-file SD 1.x / 2.x / SDXL checkpoint.

Adapter modules are named `<component>.<diffusers module>` (`unet.down_blocks.0.attentions.0.…`,
`text_encoder.text_model.…`, `text_encoder_2.…`). A single-file checkpoint stores the same
tensors under the LDM/SGM names diffusers' `single_file_utils` converts from:

    unet            model.diffusion_model.<input_blocks / middle_block / output_blocks …>
    text_encoder    cond_stage_model.transformer.<HF CLIP name>            (SD 1.x)
                    cond_stage_model.model.<OpenCLIP name>                 (SD 2.x)
                    conditioner.embedders.0.transformer.<HF CLIP name>     (SDXL)
    text_encoder_2  conditioner.embedders.1.model.<OpenCLIP name>          (SDXL; .0. in the refiner)

OpenCLIP fuses q, k, v into `attn.in_proj_weight` (rows [q; k; v]) and stores `text_projection`
transposed. These rules are the inverse of diffusers' converters (checked against them in tests),
written by hand so diffusers is not needed at run time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

from ..errors import FormatError

UNET_PREFIX = "model.diffusion_model."
# diffusers resnet name -> LDM ResBlock name
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
             "class_embedding": "label_emb"}
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


def unet_key(name: str, layers_per_block: int, up_has_attention: Callable[[int], bool]) -> Optional[str]:
    """The LDM key (without `model.diffusion_model.`) of diffusers UNet parameter `name`, or None."""
    n = layers_per_block + 1  # LDM counts a block's resnets plus its down/upsampler
    module, param = _split_param(name)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?", module)
    if m:
        side, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind in ("downsamplers", "upsamplers"):
            if i != 0 or rest != "conv":
                return None
            if side == "down":
                return f"input_blocks.{(b + 1) * n}.0.op.{param}"
            # LDM puts the upsampler after the block's last resnet (and its attention, if any)
            return f"output_blocks.{b * n + layers_per_block}.{2 if up_has_attention(b) else 1}.conv.{param}"
        idx = 1 + b * n + i if side == "down" else b * n + i
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return _join(f"{blocks}.{idx}", kind, rest, param)
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?", module)
    if m:
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        idx = 2 * i if kind == "resnets" else 2 * i + 1
        return _join(f"middle_block.{idx}", kind, rest, param)
    return None


def _join(block: str, kind: str, rest: Optional[str], param: str) -> Optional[str]:
    if kind == "resnets":
        if rest not in _RESNET:
            return None
        return f"{block}.0.{_RESNET[rest]}.{param}" if not block.startswith("middle") else f"{block}.{_RESNET[rest]}.{param}"
    inner = f"{rest}.{param}" if rest else param
    return f"{block}.1.{inner}" if not block.startswith("middle") else f"{block}.{inner}"


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
    """How one single-file checkpoint is laid out: its architecture, the UNet's layers per block,
    and for each text-encoder component its naming (`hf` or `openclip`) and key prefix."""

    def __init__(self, arch: str, layers_per_block: int, up_has_attention: Callable[[int], bool],
                 text_encoders: Dict[str, Tuple[str, str]]):
        self.arch = arch
        self.layers_per_block = layers_per_block
        self.up_has_attention = up_has_attention
        self.text_encoders = text_encoders

    @classmethod
    def from_keys(cls, keys: Iterable[str], where: str = "checkpoint") -> "LdmLayout":
        keys = set(keys)
        ops = [int(m.group(1)) for k in keys for m in [re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\.", k)] if m]
        if not ops:
            raise FormatError(f"{where}: no UNet downsampler (model.diffusion_model.input_blocks.N.0.op) found; "
                              "not an SD 1.x/2.x/SDXL single-file checkpoint")
        lpb = min(ops) - 1
        up_attn = {int(m.group(1)) for k in keys
                   for m in [re.match(re.escape(UNET_PREFIX) + r"output_blocks\.(\d+)\.1\.(?!conv\.)", k)] if m}
        tes: Dict[str, Tuple[str, str]] = {}
        for prefix, comp, kind in (("cond_stage_model.transformer.", "text_encoder", "hf"),
                                   ("cond_stage_model.model.", "text_encoder", "openclip")):
            if any(k.startswith(prefix) for k in keys):
                tes[comp] = (kind, prefix)
        for i in sorted({int(m.group(1)) for k in keys for m in [re.match(r"conditioner\.embedders\.(\d+)\.", k)] if m}):
            if any(k.startswith(f"conditioner.embedders.{i}.transformer.") for k in keys):
                tes["text_encoder"] = ("hf", f"conditioner.embedders.{i}.transformer.")
            elif any(k.startswith(f"conditioner.embedders.{i}.model.") for k in keys):
                tes["text_encoder_2"] = ("openclip", f"conditioner.embedders.{i}.model.")
        if "text_encoder_2" in tes:
            arch = "sdxl" if "text_encoder" in tes else "sdxl-refiner"
        else:
            arch = "sd2" if tes.get("text_encoder", ("",))[0] == "openclip" else "sd1"
        return cls(arch, lpb, lambda b: b * (lpb + 1) + lpb in up_attn, tes)

    def slot(self, name: str) -> Optional[Slot]:
        """Where the component-prefixed diffusers parameter `name` lives, or None."""
        comp, _, rest = name.partition(".")
        if comp == "unet":
            key = unet_key(rest, self.layers_per_block, self.up_has_attention)
            return Slot(UNET_PREFIX + key) if key else None
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
