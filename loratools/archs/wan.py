"""Wan 2.x original module names <-> diffusers names.

Wan-AI's checkpoints, ComfyUI (`diffusion_model.blocks.0.self_attn.q`) and musubi-tuner
(`lora_unet_blocks_0_self_attn_q`) name the transformer's modules as Wan's own code does; diffusers
renames them one to one (no fused projections): `self_attn` is `attn1`, `cross_attn` `attn2` (its I2V
image keys/values `k_img`/`v_img` are `add_k_proj`/`add_v_proj`), `ffn.0`/`ffn.2` `ffn.net.0.proj`/
`ffn.net.2`, and the embedders live under `condition_embedder`. The table follows diffusers'
`_convert_non_diffusers_wan_lora_to_diffusers` (lora_conversion_utils.py, 0.42).
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

from ..adapter import LoraModule
from ..errors import IncompatibleError
from .family import WAN, adapter_family

COMPONENT = "transformer"
_BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
          "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
          "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
          "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
_GLOBAL = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
           "text_embedding.2": "condition_embedder.text_embedder.linear_2",
           "time_embedding.0": "condition_embedder.time_embedder.linear_1",
           "time_embedding.2": "condition_embedder.time_embedder.linear_2",
           "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
           "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
           "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"}
_INVERSE_BLOCK = {v: k for k, v in _BLOCK.items()}
_INVERSE_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_FLAT_BLOCK = {k.replace(".", "_"): k for k in _BLOCK}
_FLAT_GLOBAL = {k.replace(".", "_"): k for k in _GLOBAL}


def to_diffusers(original: str) -> Optional[str]:
    """`blocks.3.cross_attn.k_img` -> `blocks.3.attn2.add_k_proj` (no component prefix), or None."""
    if original in _GLOBAL:
        return _GLOBAL[original]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", original)
    return f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}" if m and m.group(2) in _BLOCK else None


def to_original(name: str) -> Optional[str]:
    """The original name of a diffusers Wan transformer module (no component prefix), or None."""
    if name in _INVERSE_GLOBAL:
        return _INVERSE_GLOBAL[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return f"blocks.{m.group(1)}.{_INVERSE_BLOCK[m.group(2)]}" if m and m.group(2) in _INVERSE_BLOCK else None


def unflatten(flat: str) -> Optional[str]:
    """The original name whose dots became `_` in a musubi-tuner name (`blocks_0_cross_attn_k_img`), or None."""
    if flat in _FLAT_GLOBAL:
        return _FLAT_GLOBAL[flat]
    m = re.fullmatch(r"blocks_(\d+)_(.+)", flat)
    return f"blocks.{m.group(1)}.{_FLAT_BLOCK[m.group(2)]}" if m and m.group(2) in _FLAT_BLOCK else None


def is_block_module(original: str) -> bool:
    """diffusers 0.42 folds an `.alpha` into blocks' modules only; beside the others it raises."""
    return original.startswith("blocks.")


def is_wan(adapter) -> bool:
    """A Wan transformer LoRA: its names or metadata say Wan, and it has transformer modules."""
    fam = adapter_family(adapter)
    return fam is not None and fam[0] == WAN and any(m.name.startswith(COMPONENT + ".") for m in adapter)


def original_name(name: str) -> Optional[str]:
    """`transformer.blocks.0.attn1.to_q` -> `blocks.0.self_attn.q`, or None."""
    comp, _, local = name.partition(".")
    return to_original(local) if comp == COMPONENT else None


def originals(adapter) -> List[Tuple[str, LoraModule]]:
    """(original name, module) of every module of a Wan adapter; IncompatibleError names one without."""
    out = []
    for m in adapter:
        orig = original_name(m.name)
        if orig is None:
            raise IncompatibleError(f"module {m.name}: Wan's original (ComfyUI) and musubi-tuner names cover its "
                                    "transformer's attention, FFN, embedder and head projections only; "
                                    "write diffusers or peft")
        out.append((orig, m))
    return out
