"""Flux.1 original (BFL) module names and exact fused <-> split LoRA conversion.

BFL checkpoints, kohya (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI
(`diffusion_model.double_blocks.0.img_attn.qkv`) name the transformer's modules as BFL does, with
q, k, v fused into one projection (`single_blocks.N.linear1` also holds the MLP's input rows);
diffusers splits them. A LoRA on a fused weight is three (four) LoRAs sharing A, each with a row
slice of B; LoRAs on the parts fuse back to one with A stacked and B block-diagonal (or, when
they share A, A and B stacked: rank unchanged). BFL's final adaLN stores [shift; scale] where
diffusers' `norm_out.linear` stores [scale; shift]: B's row halves swap.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..adapter import LoraModule
from ..errors import IncompatibleError
from .family import FLUX, adapter_family

COMPONENT = "transformer"
_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
           "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
           "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
           "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation.lin": ("norm.linear",)}
_GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
MLP_RATIO = 4  # Flux.1's single-block MLP width / hidden width (sizes a missing proj_mlp part)


@dataclass(frozen=True)
class Fused:
    """One original module and the diffusers modules (no component prefix) its rows hold, in order."""

    original: str
    parts: Tuple[str, ...]
    swap: bool = False  # row halves swapped (final adaLN)

    def sizes(self, rows: int, in_features: int) -> List[int]:
        """Rows of each part in a weight of `rows` rows: q, k, v are as wide as the input; the MLP takes the rest."""
        n = len(self.parts)
        if n == 1:
            return [rows]
        if self.parts[-1].endswith("proj_mlp"):
            return [in_features] * (n - 1) + [rows - (n - 1) * in_features]
        return [rows // n] * n


def _block_tables() -> List[Tuple[str, str, Dict[str, Tuple[str, ...]]]]:
    return [("double_blocks", "transformer_blocks", _DOUBLE), ("single_blocks", "single_transformer_blocks", _SINGLE)]


def lookup(original: str) -> Optional[Fused]:
    """The Fused entry of an original module name (`double_blocks.0.img_attn.qkv`), or None."""
    if original in _GLOBAL:
        return Fused(original, (_GLOBAL[original],), swap=original == "final_layer.adaLN_modulation.1")
    for bfl, diff, table in _block_tables():
        m = re.fullmatch(rf"{bfl}\.(\d+)\.(.+)", original)
        if m and m.group(2) in table:
            return Fused(original, tuple(f"{diff}.{m.group(1)}.{p}" for p in table[m.group(2)]))
    return None


def unflatten(flat: str) -> Optional[str]:
    """The original name whose dots became `_` in a kohya name (`double_blocks_0_img_attn_qkv`), or None."""
    for name in _GLOBAL:
        if flat == name.replace(".", "_"):
            return name
    for bfl, _, table in _block_tables():
        m = re.fullmatch(rf"{bfl}_(\d+)_(.+)", flat)
        if m:
            leaf = next((k for k in table if k.replace(".", "_") == m.group(2)), None)
            if leaf:
                return f"{bfl}.{m.group(1)}.{leaf}"
    return None


def original_of(diffusers_name: str) -> Optional[Tuple[Fused, int]]:
    """(the Fused entry holding it, its part index) for a diffusers transformer module name."""
    inverse = {v: k for k, v in _GLOBAL.items()}
    if diffusers_name in inverse:
        return lookup(inverse[diffusers_name]), 0
    for bfl, diff, table in _block_tables():
        m = re.fullmatch(rf"{diff}\.(\d+)\.(.+)", diffusers_name)
        if m:
            for leaf, parts in table.items():
                if m.group(2) in parts:
                    return lookup(f"{bfl}.{m.group(1)}.{leaf}"), parts.index(m.group(2))
    return None


def original_names(num_layers: int, num_single_layers: int, guidance: bool) -> Dict[str, List[str]]:
    """Every original module name of a Flux transformer -> its diffusers parts (for the manifest)."""
    out = {}
    names = [g for g in _GLOBAL if guidance or not g.startswith("guidance_in")]
    names += [f"double_blocks.{i}.{k}" for i in range(num_layers) for k in _DOUBLE]
    names += [f"single_blocks.{i}.{k}" for i in range(num_single_layers) for k in _SINGLE]
    for name in names:
        out[name] = list(lookup(name).parts)
    return out


def _swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def _block_ranks(up: torch.Tensor, sizes: Sequence[int]) -> Optional[int]:
    """The per-part rank when `up` is block-diagonal over the parts with equal rank blocks (kohya
    split_qkv, or our own fuse of separately trained parts), else None."""
    n, rank = len(sizes), up.shape[1]
    if n == 1 or rank % n:
        return None
    r, row = rank // n, 0
    for j, size in enumerate(sizes):
        block = up[row:row + size]
        if torch.count_nonzero(block[:, :j * r]) or torch.count_nonzero(block[:, (j + 1) * r:]):
            return None
        row += size
    return r


def split(m: LoraModule, fused: Fused, component: str = COMPONENT) -> List[LoraModule]:
    """The LoRAs on the diffusers parts that make up exactly the fused LoRA `m`."""
    if m.kind != "linear" or m.mid is not None:
        raise IncompatibleError(f"module {m.name}: only linear LoRAs map onto Flux's original modules")
    up = _swap(m.up) if fused.swap else m.up
    mag = None if m.magnitude is None else (_swap(m.magnitude) if fused.swap else m.magnitude)
    sizes = fused.sizes(up.shape[0], m.down.shape[1])
    if min(sizes) <= 0:
        raise IncompatibleError(f"module {m.name}: {up.shape[0]} rows do not split into {', '.join(fused.parts)}")
    names = [f"{component}.{p}" for p in fused.parts]
    r = _block_ranks(up, sizes)
    out, row = [], 0
    for j, (name, size) in enumerate(zip(names, sizes)):
        part_mag = None if mag is None else mag[row:row + size]
        if r is None:  # shared A: same rank, alpha and scale
            out.append(dataclasses.replace(m, name=name, up=up[row:row + size], magnitude=part_mag))
        else:  # the block's own rank: keep the scale s = alpha/R with alpha_j = s * r
            out.append(dataclasses.replace(m, name=name, down=m.down[j * r:(j + 1) * r],
                                           up=up[row:row + size, j * r:(j + 1) * r].contiguous(),
                                           alpha=m.scale * r, use_rslora=False, magnitude=part_mag))
        row += size
    return out


def fuse(parts: Sequence[Optional[LoraModule]], fused: Fused, sizes: Sequence[int], name: str) -> LoraModule:
    """One LoRA on the fused weight from LoRAs on its parts (None: part not adapted, its rows stay 0)."""
    present = [p for p in parts if p is not None]
    first = present[0]
    if any(p.kind != "linear" or p.mid is not None for p in present):
        raise IncompatibleError(f"module {first.name}: only linear LoRAs map onto Flux's original modules")
    if any(p.is_dora for p in present) and len(present) != len(parts):
        raise IncompatibleError(f"module {name}: DoRA on some of {', '.join(fused.parts)} only cannot be fused")
    dtype = first.up.dtype
    for p in present:
        dtype = torch.promote_types(dtype, p.up.dtype)
    shared = (all(p.down is first.down or (p.down.shape == first.down.shape and p.down.dtype == first.down.dtype
                                           and torch.equal(p.down, first.down)) for p in present)
              and all(p.scale == first.scale and p.alpha == first.alpha and p.use_rslora == first.use_rslora
                      for p in present))
    if shared:  # rank unchanged: B rows stacked, zero rows for parts without a LoRA
        ups = [p.up.to(dtype) if p is not None else first.up.new_zeros(size, first.rank).to(dtype)
               for p, size in zip(parts, sizes)]
        up = torch.cat(ups)
        down, alpha, rslora = first.down, first.alpha, first.use_rslora
    else:  # rank Σr: A stacked, B block-diagonal; equal scales stay in alpha, else fold into B
        ranks = [p.rank for p in present]
        total = sum(ranks)
        same = all(p.scale == first.scale for p in present)
        up = torch.zeros(sum(sizes), total, dtype=dtype)
        row, col, downs = 0, 0, []
        for p, size in zip(parts, sizes):
            if p is not None:
                block = p.up if same else (p.up.float() * p.scale).to(dtype)
                up[row:row + size, col:col + p.rank] = block
                downs.append(p.down.to(torch.promote_types(p.down.dtype, first.down.dtype)))
                col += p.rank
            row += size
        down = torch.cat([d.to(downs[0].dtype) for d in downs])
        alpha, rslora = (first.scale * total if same else float(total)), False
    mags = [p.magnitude for p in parts] if first.is_dora else None
    mag = torch.cat(mags) if mags else None
    if fused.swap:
        up = _swap(up)
        mag = None if mag is None else _swap(mag)
    return LoraModule(name=name, down=down, up=up.contiguous(), alpha=alpha, kind="linear", use_rslora=rslora,
                      magnitude=mag)


def other_family(adapter) -> Optional[str]:
    """Why the adapter's transformer is no Flux.1 one ("SD3 LoRA (evidence)"), or None. SD3 shares diffusers'
    `transformer_blocks.N.attn.to_q` names, so those alone must not be renamed into Flux's original ones; Wan's
    `transformer.blocks.N` names tell themselves."""
    fam = adapter_family(adapter)
    if fam is None or fam[0] == FLUX or not any(m.name.startswith(COMPONENT + ".") for m in adapter):
        return None
    return f"{fam[0]} LoRA ({fam[1]})"


def is_flux_module(name: str) -> bool:
    comp, _, rest = name.partition(".")
    return comp == COMPONENT and original_of(rest) is not None


def _sizes(fused: Fused, parts: Sequence[Optional[LoraModule]], shape_of) -> List[int]:
    """Rows of each part: from the base's shapes when known, else from the LoRAs present
    (q, k, v are as wide as the input; a missing MLP part is MLP_RATIO times that)."""
    present = next(p for p in parts if p is not None)
    in_f = present.down.shape[1]
    sizes = []
    for diff, p in zip(fused.parts, parts):
        shape = shape_of(f"{COMPONENT}.{diff}") if shape_of else None
        if shape:
            sizes.append(int(shape[0]))
        elif p is not None:
            sizes.append(int(p.up.shape[0]))
        else:
            sizes.append(in_f * (MLP_RATIO if diff.endswith("proj_mlp") else 1) if len(fused.parts) == 4
                         else int(present.up.shape[0]))
    return sizes


def to_original(modules: Sequence[LoraModule], shape_of=None) -> Tuple[Dict[str, LoraModule], List[LoraModule]]:
    """Flux transformer LoRAs fused onto their original modules ({original name: module}), and the
    modules that are no Flux transformer module (text encoders), unchanged. `shape_of(name)` gives
    a diffusers weight's shape when a base is known."""
    groups: Dict[str, Tuple[Fused, List[Optional[LoraModule]]]] = {}
    rest = []
    for m in modules:
        comp, _, local = m.name.partition(".")
        found = original_of(local) if comp == COMPONENT else None
        if found is None:
            rest.append(m)
            continue
        fused, idx = found
        slot = groups.setdefault(fused.original, (fused, [None] * len(fused.parts)))[1]
        slot[idx] = m
    out = {}
    for original, (fused, parts) in groups.items():
        out[original] = fuse(parts, fused, _sizes(fused, parts, shape_of), f"{COMPONENT}.{original}")
    return out, rest


def from_original(original: str, m: LoraModule) -> List[LoraModule]:
    """The diffusers-named LoRAs of a LoRA on an original module (IncompatibleError if none)."""
    fused = lookup(original)
    if fused is None:
        raise IncompatibleError(f"module {original}: no Flux transformer module has this name")
    return split(m, fused)


# single-file Flux checkpoints and ComfyUI LoRAs: the text encoders' key prefixes -> pipeline component
TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder",
                 "text_encoders.t5xxl.transformer.": "text_encoder_2"}
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "")  # ComfyUI-saved, BFL-released
# scaled-fp8 checkpoints keep a per-tensor scale beside the fp8 weight (ComfyUI `scaled_fp8`, `weight_scale`)
SCALED_FP8_MARKS = ("scaled_fp8", ".scale_weight", ".weight_scale", ".input_scale", ".scale_input")


def checkpoint_prefix(keys) -> Optional[str]:
    """The transformer's key prefix in a single-file Flux checkpoint, or None if it is not one."""
    keys = set(keys)
    for prefix in CHECKPOINT_PREFIXES:
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in keys:
            return prefix
    return None
