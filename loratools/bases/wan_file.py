"""One .safetensors file with Wan 2.x's original names (`blocks.N.self_attn.q.weight`, `head.head.weight` …),
bare as Wan-AI and Comfy-Org release them or under `model.diffusion_model.` as ComfyUI saves a model. Adapter
modules in diffusers names are renamed one to one (`archs.wan`) and merged like any LoRA: fp8 weights
(float8_e4m3fn / e5m2) in fp32 and rounded once back to fp8; scaled-fp8 files are refused.
"""
from __future__ import annotations

from typing import Optional

from ..archs import wan
from ..archs.family import WAN
from .diffusion import Loc
from .single_file import SingleFileBase, open_dit_file

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
        open_dit_file(self, path, checkpoint_prefix, "blocks.0.self_attn.q.weight and head.head.weight", "Wan")
        self.kind = "single-file Wan checkpoint"
        self.components = ["transformer"]

    def locate(self, name: str) -> Optional[Loc]:
        comp, _, rest = name.partition(".")
        module, dot, param = rest.rpartition(".")
        original = wan.to_original(module) if comp == "transformer" and dot else None
        key = f"{self.prefix}{original}.{param}" if original else None
        return Loc((None, key)) if key is not None and key in self.ckpt else None
