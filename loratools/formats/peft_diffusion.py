"""PEFT adapters of a diffusion pipeline: one PEFT folder per component, as PEFT saves them
(`out/unet/adapter_config.json` + `adapter_model.safetensors`, `out/text_encoder/…`).
Module names get the component prefix (`unet.down_blocks.0…`), like every diffusion adapter here,
and CLIP names their canonical `text_model.` (transformers >= 5 saves PEFT adapters of a flattened
CLIPTextModel without it; such folders are written back in the spelling they were read in)."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

from ..adapter import LoraAdapter
from ..archs import COMPONENTS, canonical, flat_clip
from ..errors import FormatError
from . import peft
from .diffusers import split_components
from .record import Format


def _components(path: str) -> Dict[str, str]:
    return {c: os.path.join(path, c) for c in COMPONENTS if peft.detect(os.path.join(path, c))}


def detect(path: str) -> bool:
    return os.path.isdir(path) and not peft.detect(path) and bool(_components(path))


def read(path: str) -> LoraAdapter:
    comps = _components(path)
    if not comps:
        raise FormatError(f"{path}: no component folders ({', '.join(COMPONENTS)}) with an adapter_config.json")
    adapter = LoraAdapter(format="peft_diffusion", config={"components": {}, "flat_clip": []})
    for comp, folder in comps.items():
        sub = peft.read(folder)
        adapter.config["components"][comp] = sub.config
        adapter.metadata.update(sub.metadata)
        adapter.base_model = adapter.base_model or sub.base_model
        names = [f"{comp}.{m.name}" for m in sub] + [f"{comp}.{n}" for n in sub.extra]
        if any(canonical(n) != n for n in names):
            adapter.config["flat_clip"].append(comp)
        for m in sub:
            adapter.add(dataclasses.replace(m, name=canonical(f"{comp}.{m.name}")))
        for name, t in sub.extra.items():
            adapter.extra[canonical(f"{comp}.{name}")] = t
    return adapter


def write(adapter: LoraAdapter, folder: str, metadata: Optional[Dict[str, str]] = None) -> None:
    subs = split_components(dataclasses.replace(adapter, extra={}), "peft_diffusion")
    stray = [k for k in adapter.extra if k.split(".", 1)[0] not in subs]
    if stray:  # checked before anything is written
        raise FormatError(f"full tensors outside the adapter's components cannot be placed: {', '.join(stray[:4])}")
    for comp, sub in subs.items():
        prefix = comp + "."
        sub.extra = {k[len(prefix):]: t for k, t in adapter.extra.items() if k.startswith(prefix)}
        if comp in adapter.config.get("flat_clip", []):
            sub.extra = {flat_clip(prefix + k)[len(prefix):]: t for k, t in sub.extra.items()}
        os.makedirs(os.path.join(folder, comp))
        peft.write(sub, os.path.join(folder, comp), metadata=metadata)


FORMAT = Format("peft_diffusion", detect, read, write, folder=True, files=peft.FORMAT.files,
                subfolders=COMPONENTS)
