"""Wan 2.x's original module names: a one-to-one rename table (`archs.fused.Layout` with no fused entries).

Wan-AI's checkpoints, ComfyUI (`diffusion_model.blocks.0.self_attn.q`) and musubi-tuner
(`lora_unet_blocks_0_self_attn_q`) name the transformer's modules as Wan's own code does; diffusers
renames them one to one (no fused projections): `self_attn` is `attn1`, `cross_attn` `attn2` (its I2V
image keys/values `k_img`/`v_img` are `add_k_proj`/`add_v_proj`), `ffn.0`/`ffn.2` `ffn.net.0.proj`/
`ffn.net.2`, and the embedders live under `condition_embedder`. The table follows diffusers'
`_convert_non_diffusers_wan_lora_to_diffusers` (lora_conversion_utils.py, 0.42).
"""
from __future__ import annotations

from typing import Optional

from .family import WAN, is_family
from .fused import COMPONENT, Layout

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

# no text encoder: diffusers' Wan loader takes transformer LoRAs only, and Wan trainers train the transformer
LAYOUT = Layout(WAN, [("blocks", "blocks", {k: (v,) for k, v in _BLOCK.items()})], _GLOBAL, manifest="wan",
                markers=("blocks.0.self_attn.q.weight", "head.head.weight"), kohya_module="networks.lora_wan",
                implicit_alpha=True)


def to_diffusers(original: str) -> Optional[str]:
    """`blocks.3.cross_attn.k_img` -> `blocks.3.attn2.add_k_proj` (no component prefix), or None."""
    fused = LAYOUT.lookup(original)
    return fused.parts[0] if fused else None


def to_original(name: str) -> Optional[str]:
    """The original name of a diffusers Wan transformer module (no component prefix), or None."""
    found = LAYOUT.original_of(name)
    return found[0].original if found else None


unflatten = LAYOUT.unflatten  # musubi-tuner's `blocks_0_cross_attn_k_img` -> `blocks.0.cross_attn.k_img`


def is_block_module(original: str) -> bool:
    """diffusers 0.42 folds an `.alpha` into blocks' modules only; beside the others it raises."""
    return original.startswith("blocks.")


def is_wan(adapter) -> bool:
    """A Wan transformer LoRA: its names or metadata say Wan, and it has transformer modules."""
    return is_family(adapter, WAN) and any(m.name.startswith(COMPONENT + ".") for m in adapter)


def original_name(name: str) -> Optional[str]:
    """`transformer.blocks.0.attn1.to_q` -> `blocks.0.self_attn.q`, or None."""
    comp, _, local = name.partition(".")
    return to_original(local) if comp == COMPONENT else None
