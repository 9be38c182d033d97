"""One .safetensors file with Flux.1's original (BFL) names: `double_blocks.N.img_attn.qkv.weight` …,
bare as BFL releases them or under `model.diffusion_model.` with `text_encoders.clip_l.transformer.`
and `text_encoders.t5xxl.transformer.` as ComfyUI saves them. Adapters in diffusers names are fused
onto the original modules first (`archs.flux.to_original`: exact), then merged like any LoRA.
fp8 weights (float8_e4m3fn / e5m2) merge in fp32 and are rounded once back to fp8; scaled-fp8
files (a per-tensor scale beside each fp8 weight) are refused.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..archs import flux
from ..archs.family import FLUX
from .diffusion import Loc
from .single_file import SingleFileBase, open_dit_file


class FluxFileBase(SingleFileBase):
    """A single-file Flux.1 checkpoint (transformer, and the text encoders when ComfyUI bundled them)."""

    family = FLUX

    def __init__(self, path: str):  # reads, writes and shapes as SingleFileBase; names and fit are Flux's
        open_dit_file(self, path, flux.checkpoint_prefix, "double_blocks.0.img_attn.qkv.weight", "Flux.1")
        self.text_encoders = {c: p for p, c in flux.TEXT_ENCODERS.items()
                              if any(k.startswith(p) for k in self.ckpt.infos)}
        self.kind = "single-file Flux checkpoint"
        self.components = ["transformer"] + list(self.text_encoders)

    def _key(self, name: str) -> Optional[str]:
        comp, _, rest = name.partition(".")
        if comp == "transformer":
            return self.prefix + rest
        if comp not in self.text_encoders:
            return None
        key = self.text_encoders[comp] + rest
        if key not in self.ckpt and rest.startswith("text_model."):  # CLIP saved without `text_model.`
            key = self.text_encoders[comp] + rest[len("text_model."):]
        return key

    def locate(self, name: str) -> Optional[Loc]:
        key = self._key(name)
        return Loc((None, key)) if key is not None and key in self.ckpt else None

    def diffusers_shape(self, name: str):
        """The shape a diffusers module's weight has inside its fused original weight (None if unknown)."""
        found = flux.original_of(name.partition(".")[2])
        key = self.prefix + found[0].original + ".weight" if found else None
        if key not in self.ckpt:
            return None
        rows, cols = self.ckpt.shape(key)[:2]
        return (found[0].sizes(rows, cols)[found[1]], cols)

    def fit(self, adapter):
        fused, rest = flux.to_original(list(adapter), self.diffusers_shape)
        modules = {m.name: m for m in rest}
        modules.update({m.name: m for m in fused.values()})
        return super().fit(dataclasses.replace(adapter, modules=modules))
