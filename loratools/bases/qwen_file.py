"""One .safetensors file holding a Qwen-Image transformer under its own (diffusers) names: bare, as Comfy-Org
ships them (`transformer_blocks.0.attn.to_q.weight`; diffusers' `from_single_file` maps them as they are), or
under `model.diffusion_model.` as ComfyUI saves checkpoints. No projection is fused: each module's weight is one
key. fp8 weights merge in fp32 and are rounded once back to fp8; scaled-fp8 files are refused (as for Flux).
"""
from __future__ import annotations

from typing import Optional

from ..archs import qwen
from ..archs.family import QWEN
from .diffusion import Loc
from .single_file import SingleFileBase, open_dit_file


class QwenFileBase(SingleFileBase):
    """A single-file Qwen-Image transformer (reads, writes and shapes as SingleFileBase; names are its own)."""

    family = QWEN
    components = (qwen.COMPONENT,)

    def __init__(self, path: str):
        open_dit_file(self, path, qwen.checkpoint_prefix, "transformer_blocks.0.img_mod.1.weight", "Qwen-Image")
        self.kind = "single-file Qwen-Image checkpoint"

    def locate(self, name: str) -> Optional[Loc]:
        comp, _, rest = name.partition(".")
        key = self.prefix + rest
        return Loc((None, key)) if comp == qwen.COMPONENT and key in self.ckpt else None
