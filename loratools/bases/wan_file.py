"""One .safetensors file with Wan 2.x's original names (`blocks.N.self_attn.q.weight`, `head.head.weight` …),
bare as Wan-AI and Comfy-Org release them or under `model.diffusion_model.` as ComfyUI saves a model. Adapter
modules in diffusers names are renamed one to one (`archs.wan`) and merged like any LoRA: fp8 weights
(float8_e4m3fn / e5m2) in fp32 and rounded once back to fp8; scaled-fp8 files are refused.
"""
from __future__ import annotations

import os
from typing import Optional

from ..archs import flux, wan
from ..archs.family import WAN
from ..checkpoint import Checkpoint
from ..errors import FormatError, IncompatibleError
from .diffusion import Loc
from .single_file import SingleFileBase

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
MARKS = ("blocks.0.self_attn.q.weight", "head.head.weight")


def checkpoint_prefix(keys) -> Optional[str]:
    """The transformer's key prefix in a single-file Wan checkpoint, or None if it is not one."""
    keys = set(keys)
    return next((p for p in PREFIXES if all(p + mark in keys for mark in MARKS)), None)


class WanFileBase(SingleFileBase):
    """A single-file Wan 2.x transformer checkpoint (T2V / I2V, 1.3B / 14B, either Wan 2.2 expert)."""

    family = WAN

    def __init__(self, path: str):  # reads, writes and shapes as SingleFileBase; names are Wan's
        self.ckpt = Checkpoint(path)
        self.path = os.path.join(self.ckpt.folder, self.ckpt.shards[0])
        self.prefix = checkpoint_prefix(self.ckpt.infos)
        if self.prefix is None:
            raise FormatError(f"{self.path}: no blocks.0.self_attn.q.weight and head.head.weight; not a Wan checkpoint")
        scaled = [k for k in self.ckpt.infos if any(m in k for m in flux.SCALED_FP8_MARKS)]
        if scaled:
            raise IncompatibleError(f"{self.path}: a scaled-fp8 checkpoint ({scaled[0]}); loratools merges into "
                                    "bf16/fp16/fp32 and plain float8_e4m3fn/e5m2 Wan files, not scaled ones")
        self.kind = "single-file Wan checkpoint"
        self.components = ["transformer"]
        self.folder, self.shards, self.infos = self.path, list(self.ckpt.shards), self.ckpt.infos

    def locate(self, name: str) -> Optional[Loc]:
        comp, _, rest = name.partition(".")
        module, dot, param = rest.rpartition(".")
        original = wan.to_original(module) if comp == "transformer" and dot else None
        key = f"{self.prefix}{original}.{param}" if original else None
        return Loc((None, key)) if key is not None and key in self.ckpt else None
