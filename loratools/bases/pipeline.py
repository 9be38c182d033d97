"""A diffusers pipeline folder: model_index.json and one model folder per component."""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional

from .. import paths
from ..archs import dit
from ..archs.family import pipeline_family
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, copy_other_files, rewrite
from ..errors import FormatError, IncompatibleError
from .diffusion import DiffusionBase, Loc


class PipelineBase(DiffusionBase):
    """A diffusers pipeline folder: model_index.json and one folder per component."""

    kind = "diffusers pipeline"
    noun = "pipeline"

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        read_model_index(self.folder)  # malformed -> FormatError before anything else
        self.ckpts: Dict[str, Checkpoint] = {}
        self.no_safetensors: List[str] = []
        for entry in sorted(os.listdir(self.folder)):
            sub = os.path.join(self.folder, entry)
            if entry.startswith(".") or not os.path.isdir(sub):
                continue
            if glob.glob(os.path.join(sub, "*.safetensors")):
                self.ckpts[entry] = Checkpoint(sub)
            elif glob.glob(os.path.join(sub, "*.bin")) or glob.glob(os.path.join(sub, "*.pt")):
                self.no_safetensors.append(entry)
        if not self.ckpts:
            raise FormatError(f"{self.folder}: a pipeline folder (model_index.json) without any component "
                              "holding .safetensors weights")
        self.components = list(self.ckpts)
        self.family = pipeline_family(self.folder, self.components)
        self.shards = [f"{c}/{s}" for c, ck in self.ckpts.items() for s in ck.shards]
        self.infos = {f"{c}/{n}": i for c, ck in self.ckpts.items() for n, i in ck.infos.items()}

    def plan(self, adapters, out_type=None):
        comps = {m.name.partition(".")[0] for a, _ in adapters for m in a}
        bad = sorted(comps & set(self.no_safetensors))
        if bad:
            raise FormatError(f"{self.folder}: component(s) {', '.join(bad)} hold only .bin/.pt weights; loratools "
                              "merges safetensors (re-save with `save_pretrained(..., safe_serialization=True)`)")
        kept = [m.name for a, _ in adapters for m in a if m.op is not None and dit.kept_original(m.name)]
        if kept:  # read from kohya/ComfyUI, left on the fused module (`Layout.from_original`)
            raise IncompatibleError(f"module {kept[0]}: a DoRA normed per input column (or a LyCORIS IA³/OFT/GLoRA "
                                    "update) spans all rows of this fused original module, which diffusers splits; "
                                    "merge it into a single-file checkpoint in the original layout instead")
        return super().plan(adapters, out_type)

    def locate(self, name: str) -> Optional[Loc]:
        comp, _, rest = name.partition(".")
        ck = self.ckpts.get(comp)
        if ck is None:
            return None
        # CLIPTextModel is saved with `text_model.` by transformers 4 and without it by 5; accept both
        for key in (rest, rest[len("text_model."):] if rest.startswith("text_model.") else "text_model." + rest):
            if key in ck:
                return Loc((comp, key))
        return None

    def real_shape(self, real):
        return self.ckpts[real[0]].shape(real[1])

    def real_dtype(self, real):
        return self.ckpts[real[0]].dtype(real[1])

    def read_real(self, real):
        return self.ckpts[real[0]].read(real[1])

    def write(self, plan, output, out_dtype, overwrite, check_finite, progress):
        writer_args = self._writer_args(plan, out_dtype, check_finite)
        with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
            for comp, ck in self.ckpts.items():
                os.makedirs(os.path.join(tmp, comp))
                left_out = rewrite(ck, os.path.join(tmp, comp), on_tensor=progress, **writer_args(comp))
                plan.not_copied += [f"{comp}/{entry}" for entry in left_out]
            plan.not_copied += copy_other_files(self.folder, tmp, skip=list(self.ckpts), nested_weights=True)


def read_model_index(folder: str) -> dict:
    try:
        with paths.open_input(os.path.join(folder, "model_index.json"), "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{folder}/model_index.json: unreadable ({e.__class__.__name__})") from None
