"""Merge into diffusion models: diffusers pipeline folders and single-file SD 1.x/2.x/SDXL checkpoints.

Adapter modules are named `<component>.<diffusers module>` (`unet.…`, `text_encoder.…`). A base
here is a set of real tensors plus a `locate` that says where each such (virtual) parameter lives:
in a pipeline, `<component>/` + the same name; in a single file, an LDM/SGM key, possibly a third
of its rows (OpenCLIP's fused q/k/v) or transposed. `merge.plan_merge` checks the virtual names
exactly as it checks an LLM folder; the writer then streams the real tensors one at a time and
applies the planned terms to the right rows.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .adapter import LoraAdapter, LoraModule
from .archs.ldm import LdmLayout, is_ldm_checkpoint
from .atomic import atomic_output, check_output
from .checkpoint import Checkpoint, copy_other_files, rewrite, rewrite_file
from .errors import FormatError, IncompatibleError, UsageError
from .dtypes import output_dtype
from .merging import MergePlan, merge_tensor, plan_merge
from .safetensors_io import SafetensorsFile

Real = Tuple[Optional[str], str]  # (pipeline component or None for a single file, tensor name)


@dataclasses.dataclass(frozen=True)
class Loc:
    real: Real
    part: Optional[int] = None  # third of the rows (fused q/k/v)
    transpose: bool = False


class DiffusionBase:
    """What plan_merge needs (`in`, `shape`, `dtype` of virtual names) plus the writer."""

    kind = ""
    components: Sequence[str] = ()

    def locate(self, name: str) -> Optional[Loc]:
        raise NotImplementedError

    def real_shape(self, real: Real) -> Tuple[int, ...]:
        raise NotImplementedError

    def real_dtype(self, real: Real) -> torch.dtype:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return self.locate(name) is not None

    def shape(self, name: str) -> Tuple[int, ...]:
        loc = self.locate(name)
        s = tuple(self.real_shape(loc.real))
        if loc.part is not None:
            s = (s[0] // 3,) + s[1:]
        return s[::-1] if loc.transpose else s

    def dtype(self, name: str) -> torch.dtype:
        return self.real_dtype(self.locate(name).real)

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]]) -> MergePlan:
        """Check every module names a component, fit 1×1 conv/linear layouts, then plan_merge."""
        unknown = [m.name for a, _ in adapters for m in a if m.name.partition(".")[0] not in self.components]
        unknown += [n for a, _ in adapters for n in a.extra if n.partition(".")[0] not in self.components]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise IncompatibleError(
                f"{len(unknown)} adapter module(s) name no component of this {self.kind} "
                f"(it has {', '.join(self.components)}; names must start with one, e.g. unet.…): {shown}")
        return plan_merge(self, [(self._fit(a), w) for a, w in adapters])

    def _fit(self, adapter: LoraAdapter) -> LoraAdapter:
        modules = {}
        for name, m in adapter.modules.items():
            target = name + ".weight"
            modules[name] = fit_module(m, self.shape(target)) if target in self else m
        return dataclasses.replace(adapter, modules=modules)

    def _writer_args(self, plan: MergePlan, out_dtype: Optional[torch.dtype], check_finite: bool):
        """Per component (None for a single file): the writer's transform, dtype_of and unchanged."""
        groups: Dict[Real, List[Tuple[str, Loc]]] = {}
        for name in list(plan.terms) + [n for n in plan.replace if n not in plan.terms]:
            loc = self.locate(name)
            groups.setdefault(loc.real, []).append((name, loc))

        def dtype_for(comp):
            def dtype_of(key: str) -> torch.dtype:
                return output_dtype(self.real_dtype((comp, key)), out_dtype)
            return dtype_of

        def transform_for(comp):
            dtype_of = dtype_for(comp)

            def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
                target = dtype_of(key)
                parts = groups.get((comp, key))
                if not parts:  # converted (and checked for overflow) like the LLM path does
                    return merge_tensor(key, tensor, None, None, target, check_finite)
                work_dtype = torch.float32 if target != tensor.dtype else tensor.dtype
                work = tensor.to(work_dtype)
                for name, loc in parts:
                    view = work
                    if loc.part is not None:
                        rows = work.shape[0] // 3
                        view = work.narrow(0, loc.part * rows, rows)
                    if loc.transpose:
                        view = view.t()
                    merged = merge_tensor(name, view.contiguous(), plan.terms.get(name), plan.replace.get(name),
                                          work_dtype, check_finite)
                    view.copy_(merged)
                return merge_tensor(key, work, None, None, target, check_finite)
            return transform

        def writer_args(comp):
            return dict(transform=transform_for(comp), out_dtype=dtype_for(comp),
                        unchanged=lambda key: (comp, key) not in groups)
        return writer_args


def fit_module(m: LoraModule, shape: Tuple[int, ...]) -> LoraModule:
    """Reshape a module's factors (views, exact) when base and adapter disagree only on linear vs 1×1 conv,
    as SD's `proj_in`/`proj_out` do between LDM checkpoints and some diffusers configs."""
    if m.mid is not None or m.fan_in_fan_out or tuple(m.weight_shape) == tuple(shape):
        return m
    if m.kind == "linear" and len(shape) == 4 and shape[2:] == (1, 1) and tuple(m.weight_shape) == shape[:2]:
        return dataclasses.replace(m, kind="conv", down=m.down[:, :, None, None], up=m.up[:, :, None, None])
    if m.kind == "conv" and len(shape) == 2 and tuple(m.weight_shape) == tuple(shape) + (1, 1):
        return dataclasses.replace(m, kind="linear", down=m.down.flatten(1), up=m.up.flatten(1))
    return m


class PipelineBase(DiffusionBase):
    """A diffusers pipeline folder: model_index.json and one folder per component."""

    kind = "diffusers pipeline"

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
        self.shards = [f"{c}/{s}" for c, ck in self.ckpts.items() for s in ck.shards]
        self.infos = {f"{c}/{n}": i for c, ck in self.ckpts.items() for n, i in ck.infos.items()}

    def plan(self, adapters):
        comps = {m.name.partition(".")[0] for a, _ in adapters for m in a}
        bad = sorted(comps & set(self.no_safetensors))
        if bad:
            raise FormatError(f"{self.folder}: component(s) {', '.join(bad)} hold only .bin/.pt weights; loratools "
                              "merges safetensors (re-save with `save_pretrained(..., safe_serialization=True)`)")
        return super().plan(adapters)

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

    def write(self, plan, output, out_dtype, overwrite, check_finite, progress):
        if os.path.abspath(output) == self.folder:
            raise UsageError("the output must not be the base folder itself")
        writer_args = self._writer_args(plan, out_dtype, check_finite)
        with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
            for comp, ck in self.ckpts.items():
                os.makedirs(os.path.join(tmp, comp))
                rewrite(ck, os.path.join(tmp, comp), on_tensor=progress, **writer_args(comp))
            copy_other_files(self.folder, tmp, skip=list(self.ckpts))


class SingleFileBase(DiffusionBase):
    """One .safetensors file with the original LDM (SD 1.x/2.x) or SGM (SDXL) names."""

    def __init__(self, path: str):
        self.ckpt = Checkpoint(path)
        self.path = os.path.join(self.ckpt.folder, self.ckpt.shards[0])
        self.layout = LdmLayout.from_keys(self.ckpt.infos, where=self.path)
        self.kind = f"single-file {self.layout.arch} checkpoint"
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

    def write(self, plan, output, out_dtype, overwrite, check_finite, progress):
        if os.path.abspath(output) == self.path:
            raise UsageError("the output must not be the base file itself")
        writer_args = self._writer_args(plan, out_dtype, check_finite)
        with atomic_output(output, overwrite=overwrite, directory=False) as tmp:
            rewrite_file(self.path, tmp, on_tensor=progress, **writer_args(None))


def open_diffusion_base(path) -> Optional[DiffusionBase]:
    """A PipelineBase or SingleFileBase if `path` is one, else None (an ordinary model folder)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        return PipelineBase(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        with SafetensorsFile(path) as f:
            if is_ldm_checkpoint(f.tensors):
                return SingleFileBase(path)
    return None


def merge_diffusion(base: DiffusionBase, adapters: Sequence[Tuple[LoraAdapter, float]], output,
                    out_dtype: Optional[torch.dtype], overwrite: bool, check_finite: bool,
                    progress: Optional[Callable[[str], None]]) -> MergePlan:
    """Plan (every check before anything is written), then stream the base into `output` atomically."""
    check_output(output, overwrite)
    plan = base.plan(adapters)
    base.write(plan, output, out_dtype, overwrite, check_finite, progress)
    return plan


def read_model_index(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{folder}/model_index.json: unreadable ({e.__class__.__name__})") from None
