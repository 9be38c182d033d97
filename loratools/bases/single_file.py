"""One .safetensors file with the original LDM (SD 1.x/2.x) or SGM (SDXL) names."""
from __future__ import annotations

import os
from typing import Optional

from ..archs.family import LDM_ARCHS
from ..archs.ldm import LdmLayout
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, rewrite_file
from ..errors import FormatError
from .diffusion import DiffusionBase, Loc


class SingleFileBase(DiffusionBase):
    """One .safetensors file with the original LDM (SD 1.x/2.x) or SGM (SDXL) names."""

    def __init__(self, path: str):
        self.ckpt = Checkpoint(path)
        self.path = os.path.join(self.ckpt.folder, self.ckpt.shards[0])
        self.layout = LdmLayout.from_keys(self.ckpt.infos, where=self.path)
        self.kind = f"single-file {self.layout.arch} checkpoint"
        self.family = LDM_ARCHS.get(self.layout.arch)
        self.components = ["unet"] + list(self.layout.text_encoders)
        self.folder, self.shards, self.infos = self.path, list(self.ckpt.shards), self.ckpt.infos

    def locate(self, name: str) -> Optional[Loc]:
        slot = self.layout.slot(name)
        if slot is None or slot.key not in self.ckpt:
            return None
        shape = self.ckpt.shape(slot.key)
        if slot.part is not None and (len(shape) < 1 or shape[0] % 3):
            raise FormatError(f"{self.path}: {slot.key} has shape {tuple(shape)}, not a fused q/k/v projection")
        if slot.transpose and len(shape) != 2:
            return None
        return Loc((None, slot.key), slot.part, slot.transpose)

    def real_shape(self, real):
        return self.ckpt.shape(real[1])

    def real_dtype(self, real):
        return self.ckpt.dtype(real[1])

    def read_real(self, real):
        return self.ckpt.read(real[1])

    def write(self, plan, output, out_dtype, overwrite, check_finite, progress):
        writer_args = self._writer_args(plan, out_dtype, check_finite)
        with atomic_output(output, overwrite=overwrite, directory=False) as tmp:
            rewrite_file(self.path, tmp, on_tensor=progress, **writer_args(None))
