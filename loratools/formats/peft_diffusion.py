"""PEFT adapters of a diffusion pipeline: one PEFT folder per component, as PEFT saves them
(`out/unet/adapter_config.json` + `adapter_model.safetensors`, `out/text_encoder/…`).
Module names get the component prefix (`unet.down_blocks.0…`), like every diffusion adapter here."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

from ..adapter import LoraAdapter
from ..archs import COMPONENTS
from ..errors import FormatError
from . import peft
from .diffusers import split_components


def _components(path: str) -> Dict[str, str]:
    return {c: os.path.join(path, c) for c in COMPONENTS if peft.detect(os.path.join(path, c))}


def detect(path: str) -> bool:
    return os.path.isdir(path) and not peft.detect(path) and bool(_components(path))


def read(path: str) -> LoraAdapter:
    comps = _components(path)
    if not comps:
        raise FormatError(f"{path}: no component folders ({', '.join(COMPONENTS)}) with an adapter_config.json")
    adapter = LoraAdapter(format="peft_diffusion", config={"components": {}})
    for comp, folder in comps.items():
        sub = peft.read(folder)
        adapter.config["components"][comp] = sub.config
        adapter.metadata.update(sub.metadata)
        adapter.base_model = adapter.base_model or sub.base_model
        for m in sub:
            adapter.add(dataclasses.replace(m, name=f"{comp}.{m.name}"))
        for name, t in sub.extra.items():
            adapter.extra[f"{comp}.{name}"] = t
    return adapter


def write(adapter: LoraAdapter, folder: str, metadata: Optional[Dict[str, str]] = None) -> None:
    subs = split_components(dataclasses.replace(adapter, extra={}), "peft_diffusion")
    stray = [k for k in adapter.extra if k.split(".", 1)[0] not in subs]
    if stray:  # checked before anything is written
        raise FormatError(f"full tensors outside the adapter's components cannot be placed: {', '.join(stray[:4])}")
    for comp, sub in subs.items():
        prefix = comp + "."
        sub.extra = {k[len(prefix):]: t for k, t in adapter.extra.items() if k.startswith(prefix)}
        os.makedirs(os.path.join(folder, comp))
        peft.write(sub, os.path.join(folder, comp), metadata=metadata)
