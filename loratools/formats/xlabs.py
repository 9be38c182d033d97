"""XLabs-AI (x-flux) Flux.1 LoRA files, read only:

    double_blocks.0.processor.qkv_lora1.down.weight / .up.weight    image stream q, k, v (fused, BFL's img_attn.qkv)
    double_blocks.0.processor.proj_lora1 …  image attention output;  qkv_lora2 / proj_lora2: the text stream
    single_blocks.0.processor.qkv_lora …    the q, k, v rows of linear1 (not its MLP rows); proj_lora: linear2

optionally under `diffusion_model.`. x-flux's processors add `lora_weight · up(down(x))` with no alpha in the
file (alpha = rank); fused q, k, v are split exactly onto diffusers' modules (`archs.fused` with Flux's
`Layout`), as diffusers'
`_convert_xlabs_flux_lora_to_diffusers` does. Not written: x-flux's processors cover attention only, and every
loader that reads XLabs files (diffusers, XLabs' own ComfyUI nodes) reads the diffusers or ComfyUI form too.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict

import torch

from ..adapter import LoraAdapter, LoraModule
from ..archs import flux
from ..archs.family import FLUX
from ..archs.fused import Fused, split
from ..errors import FormatError
from . import _single
from .record import Format

KEY = re.compile(r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\."
                 r"(qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight")
# (block kind, processor LoRA) -> BFL module leaf
LEAVES = {("double_blocks", "qkv_lora1"): "img_attn.qkv", ("double_blocks", "proj_lora1"): "img_attn.proj",
          ("double_blocks", "qkv_lora2"): "txt_attn.qkv", ("double_blocks", "proj_lora2"): "txt_attn.proj",
          ("single_blocks", "qkv_lora"): "linear1", ("single_blocks", "proj_lora"): "linear2"}


def parse_key(key: str):
    """(BFL module name, role) of an XLabs key, or None."""
    m = KEY.fullmatch(key)
    if not m or (m[1], m[3]) not in LEAVES:
        return None
    return f"{m[1]}.{m[2]}.{LEAVES[(m[1], m[3])]}", m[4]


def detect(path: str) -> bool:
    keys = _single.peek_keys(path)
    return bool(keys) and all(parse_key(k) for k in keys)


def read(path: str) -> LoraAdapter:
    tensors, metadata = _single.load(path)
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise FormatError(f"{path}: {key} is no XLabs Flux LoRA tensor")
        groups.setdefault(parsed[0], {})[parsed[1]] = t
    adapter = LoraAdapter(format="xlabs", metadata=metadata)
    for original, parts in sorted(groups.items()):
        if set(parts) != {"down", "up"}:
            raise FormatError(f"{path}: {original} has no {'down' if 'up' in parts else 'up'} tensor")
        for m in split(LoraModule(f"transformer.{original}", parts["down"], parts["up"]), _fused(original)):
            adapter.add(m)
    if not len(adapter):
        raise FormatError(f"{path}: no LoRA modules")
    # no other family has this layout (tiny or unknown widths match no manifest): say so for inspect
    adapter.config = {"family": [FLUX, f"XLabs layout ({next(iter(tensors))})"]}
    return adapter


def _fused(original: str) -> Fused:
    fused = flux.LAYOUT.lookup(original)
    if original.endswith("linear1"):  # x-flux's single-block qkv LoRA leaves linear1's MLP rows alone
        fused = dataclasses.replace(fused, parts=fused.parts[:3])
    return fused


FORMAT = Format("xlabs", detect, read, None, folder=False)
