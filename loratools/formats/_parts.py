"""LoRA modules from the tensors of one kohya-style module (`lora_down` / `lora_up` / `alpha` / `lora_mid` /
`dora_scale`), as kohya, LyCORIS and ComfyUI's original-names files store them."""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from ..adapter import LoraModule
from ..errors import FormatError, ShapeMismatchError
from ..lycoris_algos import Transform
from . import _single


def build_module(name: str, lora_name: str, parts: Dict[str, torch.Tensor], path: str) -> LoraModule:
    for role in ("down", "up"):
        if role not in parts:
            raise FormatError(f"{path}: module {lora_name} has no lora_{role} tensor")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    alpha = _single.scalar(parts["alpha"], f"{path}: {lora_name}.alpha") if "alpha" in parts else None
    if alpha == 0:  # sd-scripts treats alpha 0 (or none) as alpha = rank
        alpha = None
    d = parts.get("dora")
    input_axis = d is not None and d.dim() >= 2 and d.shape[0] == 1 and d.shape[1] == down.shape[1] != 1
    magnitude = output_magnitude(d, up.shape[0], down.shape[1], f"{path}: {lora_name}") \
        if d is not None and not input_axis else None
    kind = "conv" if down.dim() == 4 or mid is not None else "linear"
    module = LoraModule(name=name, down=down, up=up, alpha=alpha, kind=kind, magnitude=magnitude, mid=mid)
    return dora_in(module, d) if input_axis else module


def output_magnitude(d: torch.Tensor, rows: int, cols: int, where: str) -> torch.Tensor:
    """The DoRA magnitude of a `dora_scale` normed per output row ([rows, 1…]), as a vector."""
    if d.dim() < 2 or d.shape[0] != rows or d[0].numel() != 1:
        raise ShapeMismatchError(f"{where}.dora_scale has shape {tuple(d.shape)}; LyCORIS writes [{rows}, 1…] "
                                 f"(wd_on_output) or [1, {cols}, …]")
    return d.reshape(-1)


def lora_shape(parts: Dict[str, torch.Tensor]):
    """(rows, input width) of a plain LoRA's tensors, or None (a factor missing, or not 2-D)."""
    down, up = parts.get("down"), parts.get("up")
    ok = down is not None and up is not None and down.dim() == 2 and up.dim() == 2
    return (int(up.shape[0]), int(down.shape[1])) if ok else None


def dora_in(module: LoraModule, dora: torch.Tensor) -> LoraModule:
    """LyCORIS DoRA normed per input column (wd_on_output=False): no PEFT/diffusers equivalent, so an
    exact transform (`lycoris_algos`) that merge applies and `convert --rank` factors."""
    up, down = module.up.flatten(1).float(), module.down.float()
    if module.mid is not None:
        down = torch.einsum("abhw,bi->aihw", module.mid.float(), down.flatten(1))
    delta = (up @ down.flatten(1)) * module.scale
    op = Transform("dora", {"delta": delta, "dora_scale": dora, "on_output": False})
    return dataclasses.replace(module, op=op)
