"""One .safetensors file with a DiT family's original names (`archs.fused.Layout`): Flux.1
(`double_blocks.N.img_attn.qkv.weight` …), SD3/3.5 (`joint_blocks.N.x_block.attn.qkv.weight` …), Wan 2.x
(`blocks.N.self_attn.q.weight`, `head.head.weight` …; transformer only, either Wan 2.2 expert), Qwen-Image or FLUX.2
(`single_stream_modulation.lin.weight`, `double_blocks.N.img_attn.qkv.weight` …), bare as
released or under `model.diffusion_model.` with the text encoders bundled as ComfyUI and Stability save them
(`text_encoders.clip_l.transformer.`, SD3's `text_encoders.clip_g.transformer.`, `text_encoders.t5xxl.transformer.`;
other keys such as the VAE's are copied). Adapters in diffusers names are fused onto the original modules
first (`Layout.to_original`: exact), then merged like any LoRA. fp8 weights (float8_e4m3fn / e5m2) merge in
fp32 and are rounded once back to fp8; scaled-fp8 files (a per-tensor scale beside each fp8 weight) are refused.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..archs import dit
from ..archs.family import adapter_family, mismatch
from ..archs.fused import CHECKPOINT_PREFIXES, SCALED_FP8_MARKS
from ..checkpoint import Checkpoint
from ..errors import FormatError, IncompatibleError
from .diffusion import Loc
from .single_file import SingleFileBase


class DitFileBase(SingleFileBase):
    """A single-file Flux.1, SD3/3.5 or Wan 2.x checkpoint (transformer, and the text encoders when bundled)."""

    def __init__(self, path: str):  # reads, writes and shapes as SingleFileBase; names and fit are the family's
        self.ckpt = Checkpoint(path)
        self.path = os.path.join(self.ckpt.folder, self.ckpt.shards[0])
        layout = dit.for_checkpoint(self.ckpt.infos)
        if layout is None:
            marks = " or ".join(" and ".join(lay.markers) for lay in dit.LAYOUTS)
            raise FormatError(f"{self.path}: no {marks}; not a {', '.join(lay.family for lay in dit.LAYOUTS)} "
                              "checkpoint")
        scaled = [k for k in self.ckpt.infos if any(m in k for m in SCALED_FP8_MARKS)]
        if scaled:
            raise IncompatibleError(f"{self.path}: a scaled-fp8 checkpoint ({scaled[0]}); loratools merges into "
                                    f"bf16/fp16/fp32 and plain float8_e4m3fn/e5m2 {layout.family} files, not scaled "
                                    "ones")
        self.layout, self.family = layout, layout.family
        self.prefix = layout.checkpoint_prefix(self.ckpt.infos)
        other = self._second_copy()
        if other is not None:
            raise FormatError(f"{self.path}: transformer weights under two prefixes ({other!r} beside "
                              f"{self.prefix or 'bare'!r} ones): only one copy would be merged; keep one of them")
        self.text_encoders = {c: p for p, c in layout.text_encoders.items()
                              if any(k.startswith(p) for k in self.ckpt.infos)}
        self.kind = f"single-file {layout.family} checkpoint"
        self.components = ["transformer"] + list(self.text_encoders)
        self.folder, self.shards, self.infos = self.path, list(self.ckpt.shards), self.ckpt.infos

    def _key(self, name: str) -> Optional[str]:
        comp, _, rest = name.partition(".")
        if comp == "transformer":  # an original name (fit renamed the diffusers ones), not a look-alike one
            return self.prefix + rest if self.layout.lookup(rest.rpartition(".")[0]) else None
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
        found = self.layout.original_of(name.partition(".")[2])
        key = self.prefix + found[0].original + ".weight" if found else None
        if key not in self.ckpt:
            return None
        shape = tuple(self.ckpt.shape(key))
        if len(found[0].parts) == 1:
            return shape
        sizes = found[0].sizes(shape[0], shape[1]) if len(shape) == 2 else [0]
        if min(sizes) <= 0 or sum(sizes) != shape[0]:
            raise FormatError(f"{self.path}: {key} has shape {shape}, which does not split into "
                              f"{', '.join(found[0].parts)}; not a {self.family} checkpoint loratools can merge into")
        return (sizes[found[1]],) + shape[1:]

    def _second_copy(self) -> Optional[str]:
        """A transformer weight under another of the prefixes a single file may use (ComfyUI's or bare):
        only the copy under `prefix` would be merged, the other left as it was."""
        for key in self.ckpt.infos:
            if self.prefix and key.startswith(self.prefix):
                continue
            for p in CHECKPOINT_PREFIXES:
                if p != self.prefix and key.startswith(p) and self.layout.lookup(key[len(p):].rpartition(".")[0]):
                    return key
        return None

    def fit(self, adapter):
        named = mismatch(adapter, self.family, self.noun)  # Flux and SD3 share many diffusers names
        if named:
            raise IncompatibleError(named)
        fused, rest = self.layout.to_original(list(adapter), self.diffusers_shape)
        modules = {m.name: m for m in rest}
        modules.update({m.name: m for m in fused.values()})
        # the family is the adapter's own: the checkpoint's names (`double_blocks`, Flux.1's and FLUX.2's) tell none
        family = adapter_family(adapter) or (self.family, "the checkpoint's names")
        return super().fit(dataclasses.replace(adapter, modules=modules, config={**adapter.config, "family": family}))
