"""Original checkpoint names of a DiT family and exact fused <-> split LoRA conversion, for any family
given its name table (`Layout`): Flux.1 (`archs.flux`) and SD3/3.5 (`archs.sd3`) are one table each.

Original checkpoints (and kohya / ComfyUI LoRAs, which use their names) fuse q, k, v into one
projection (Flux's `single_blocks.N.linear1` also holds the MLP's input rows); diffusers splits them.
A LoRA on a fused weight is several LoRAs sharing A, each with a row slice of B; LoRAs on the parts
fuse back to one with A stacked and B block-diagonal (or, when they share A, B stacked: rank
unchanged). Adaptive norms that hold two chunks store [shift; scale] in the original layout and
[scale; shift] in diffusers' `AdaLayerNormContinuous`: B's (and a DoRA magnitude's) row halves swap.
A DoRA magnitude per output row follows its rows (fusing needs one on every part); a DoRA normed per input
column spans all rows of the fused weight, so it stays on the original module.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..adapter import LoraModule
from ..errors import IncompatibleError

COMPONENT = "transformer"
Table = Dict[str, Tuple[str, ...]]


@dataclass(frozen=True)
class Fused:
    """One original module and the diffusers modules (no component prefix) its rows hold, in order."""

    original: str
    parts: Tuple[str, ...]
    swap: bool = False  # an adaptive norm: row halves swap when the weight holds two chunks
    rest_last: bool = False  # the last part takes the rows left after the equal-width ones (Flux's MLP)

    def sizes(self, rows: int, in_features: int) -> List[int]:
        """Rows of each part in a weight of `rows` rows: equal thirds, or q, k, v as wide as the input and
        the last part (an MLP) the rest."""
        n = len(self.parts)
        if n == 1:
            return [rows]
        if self.rest_last:
            return [in_features] * (n - 1) + [rows - (n - 1) * in_features]
        return [rows // n] * n

    def swaps(self, rows: int, in_features: int) -> bool:
        """Two chunks (shift, scale) as wide as the input: the layouts order them differently."""
        return self.swap and rows == 2 * in_features


class Layout:
    """A family's original names: blocks (`original prefix`, `diffusers prefix`, {leaf: parts}) and global
    modules, the text encoders' key prefixes in single files and ComfyUI LoRAs, and kohya's. A family whose
    original names rename diffusers' one to one (Wan) is a table whose every entry has one part."""

    def __init__(self, family: str, blocks: Sequence[Tuple[str, str, Table]], globals_: Dict[str, str],
                 swaps: Iterable[str] = (), rest_last: Iterable[str] = (), mlp_ratio: int = 4,
                 text_encoders: Optional[Dict[str, str]] = None, kohya_te: Optional[Dict[str, str]] = None,
                 manifest: str = "", markers: Sequence[str] = (), kohya_module: str = "networks.lora",
                 kohya_read: Optional[Dict[str, str]] = None, implicit_alpha: bool = False,
                 ratios: Optional[Dict[str, float]] = None):
        self.family, self.blocks, self.globals = family, tuple(blocks), dict(globals_)
        self.swap_leaves, self.rest_leaves = frozenset(swaps), frozenset(rest_last)
        self.mlp_ratio = mlp_ratio  # a missing rest_last part's rows / the input width
        self.text_encoders = dict(text_encoders or {})  # `text_encoders.clip_l.transformer.` -> text_encoder
        self.kohya_te = dict(kohya_te or {})  # `lora_te1_` -> text_encoder (written and read)
        # read only, after kohya_te: other trainers' prefixes (-> component; names resolved in the manifest)
        self.kohya_read = {**self.kohya_te, **(kohya_read or {})}
        self.manifest, self.markers = manifest, tuple(markers)  # markers: weights every original checkpoint has
        self.kohya_module = kohya_module  # sd-scripts' network module (kohya metadata ss_network_module)
        # ComfyUI files: an alpha of 1·rank is left out unless one was read (diffusers' Wan loader raises on one
        # beside the embedders and the head)
        self.implicit_alpha = implicit_alpha
        # leaf -> rows / input width where it tells this family from one with the same names (Flux.1 / FLUX.2)
        self.ratios = dict(ratios or {})
        self._global_inverse = {v: k for k, v in self.globals.items()}

    def _entry(self, original: str, leaf: str, parts: Tuple[str, ...]) -> Fused:
        return Fused(original, parts, swap=leaf in self.swap_leaves, rest_last=leaf in self.rest_leaves)

    def lookup(self, original: str) -> Optional[Fused]:
        """The Fused entry of an original module name (`double_blocks.0.img_attn.qkv`), or None."""
        if original in self.globals:
            return self._entry(original, original, (self.globals[original],))
        for orig, diff, table in self.blocks:
            m = re.fullmatch(rf"{orig}\.(\d+)\.(.+)", original)
            if m and m.group(2) in table:
                return self._entry(original, m.group(2), tuple(f"{diff}.{m.group(1)}.{p}" for p in table[m.group(2)]))
        return None

    def fits(self, original: str, rows: int, in_features: int) -> bool:
        """False when a LoRA of `rows` x `in_features` on this original module has another family's widths."""
        ratio = None if original in self.globals else self.ratios.get(original.split(".", 2)[-1])
        return ratio is None or rows == round(ratio * in_features)

    def unflatten(self, flat: str) -> Optional[str]:
        """The original name whose dots became `_` in a kohya name (`double_blocks_0_img_attn_qkv`), or None."""
        for name in self.globals:
            if flat == name.replace(".", "_"):
                return name
        for orig, _, table in self.blocks:
            m = re.fullmatch(rf"{orig}_(\d+)_(.+)", flat)
            if m:
                leaf = next((k for k in table if k.replace(".", "_") == m.group(2)), None)
                if leaf:
                    return f"{orig}.{m.group(1)}.{leaf}"
        return None

    def original_of(self, diffusers_name: str) -> Optional[Tuple[Fused, int]]:
        """(the Fused entry holding it, its part index) for a diffusers transformer module name."""
        if diffusers_name in self._global_inverse:
            return self.lookup(self._global_inverse[diffusers_name]), 0
        for orig, diff, table in self.blocks:
            m = re.fullmatch(rf"{diff}\.(\d+)\.(.+)", diffusers_name)
            if m:
                for leaf, parts in table.items():
                    if m.group(2) in parts:  # the entry lookup() gives its original name, without parsing it again
                        entry = self._entry(f"{orig}.{m.group(1)}.{leaf}", leaf,
                                            tuple(f"{diff}.{m.group(1)}.{p}" for p in parts))
                        return entry, parts.index(m.group(2))
        return None

    def original_names(self, diffusers_names: Iterable[str]) -> Dict[str, List[str]]:
        """Original module name -> its diffusers parts, for the diffusers modules given (a model's, a manifest's)."""
        out: Dict[str, List[str]] = {}
        for name in diffusers_names:
            found = self.original_of(name)
            if found:
                out[found[0].original] = list(found[0].parts)
        return out

    def is_module(self, name: str) -> bool:
        comp, _, rest = name.partition(".")
        return comp == COMPONENT and self.original_of(rest) is not None

    def to_original(self, modules: Sequence[LoraModule], shape_of=None
                    ) -> Tuple[Dict[str, LoraModule], List[LoraModule]]:
        """Transformer LoRAs fused onto their original modules ({original name: module}), and the modules
        that are no transformer module of this family (text encoders, or modules already under their original
        name), unchanged. `shape_of(name)` gives a diffusers weight's shape when a base is known."""
        groups: Dict[str, Tuple[Fused, List[Optional[LoraModule]]]] = {}
        rest = []
        for m in modules:
            comp, _, local = m.name.partition(".")
            found = self.original_of(local) if comp == COMPONENT else None
            if found is None:
                rest.append(m)
                continue
            fused, idx = found
            slot = groups.setdefault(fused.original, (fused, [None] * len(fused.parts)))[1]
            slot[idx] = m
        out = {}
        for original, (fused, parts) in groups.items():
            out[original] = fuse(parts, fused, self._sizes(fused, parts, shape_of), f"{COMPONENT}.{original}")
        return out, rest

    def from_original(self, original: str, m: LoraModule) -> List[LoraModule]:
        """The diffusers-named LoRAs of a LoRA on an original module (IncompatibleError if none). A DoRA
        normalised per input column on a fused weight couples its parts: it stays on the original module."""
        fused = self.lookup(original)
        if fused is None:
            raise IncompatibleError(f"module {original}: no {self.family} transformer module has this name")
        if m.op is not None and m.op.algo == "full":  # a dense ΔW (and bias delta): its rows are the parts'
            return split_full(m, fused)
        if m.op is not None and (len(fused.parts) > 1 or fused.swaps(m.up.shape[0], m.down.shape[1])):
            return [dataclasses.replace(m, name=f"{COMPONENT}.{original}")]
        return split(m, fused)

    def _sizes(self, fused: Fused, parts: Sequence[Optional[LoraModule]], shape_of) -> List[int]:
        """Rows of each part: from the base's shapes when known, else from the LoRAs present (q, k, v are
        as wide as the input; a missing rest_last part is mlp_ratio times that)."""
        present = next(p for p in parts if p is not None)
        in_f = present.down.shape[1]
        sizes = []
        for j, (diff, p) in enumerate(zip(fused.parts, parts)):
            shape = shape_of(f"{COMPONENT}.{diff}") if shape_of else None
            if shape:
                sizes.append(int(shape[0]))
            elif p is not None:
                sizes.append(int(p.up.shape[0]))
            elif fused.rest_last:
                sizes.append(in_f * (self.mlp_ratio if j == len(fused.parts) - 1 else 1))
            else:
                sizes.append(int(present.up.shape[0]))
        return sizes

    def checkpoint_prefix(self, keys) -> Optional[str]:
        """The transformer's key prefix in a single-file checkpoint of this family (ComfyUI-saved under
        `model.diffusion_model.`, or bare as released), or None if it is not one."""
        keys = set(keys)
        return next((p for p in CHECKPOINT_PREFIXES if all(f"{p}{mark}" in keys for mark in self.markers)), None)

    def not_covered(self, name: str) -> IncompatibleError:
        """The error for a transformer module that has no original name in this family."""
        return IncompatibleError(f"module {name}: {self.family}'s original names have no such transformer module "
                                 "(they name its linear projections); write diffusers or peft")


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# scaled-fp8 checkpoints keep a per-tensor scale beside the fp8 weight (ComfyUI `scaled_fp8`, `weight_scale`)
SCALED_FP8_MARKS = ("scaled_fp8", ".scale_weight", ".weight_scale", ".input_scale", ".scale_input")


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


def _plain(m: LoraModule, fused: Fused, what: str) -> None:
    """Row slices and swaps need a plain linear LoRA (a 1:1 rename takes any module)."""
    if m.kind != "linear" or m.mid is not None or m.op is not None:
        raise IncompatibleError(f"module {m.name}: only linear LoRAs map onto the rows of {what}")


def split(m: LoraModule, fused: Fused, component: str = COMPONENT) -> List[LoraModule]:
    """The LoRAs on the diffusers parts that make up exactly the fused LoRA `m`."""
    names = [f"{component}.{p}" for p in fused.parts]
    swap = fused.swaps(m.up.shape[0], m.down.shape[1])
    if len(names) == 1 and not swap:
        return [dataclasses.replace(m, name=names[0])]
    _plain(m, fused, fused.original)
    up = _swap(m.up) if swap else m.up
    mag = None if m.magnitude is None else (_swap(m.magnitude) if swap else m.magnitude)
    sizes = fused.sizes(up.shape[0], m.down.shape[1])
    if min(sizes) <= 0 or sum(sizes) != up.shape[0]:  # thirds of 47 rows would drop two
        raise IncompatibleError(f"module {m.name}: {up.shape[0]} rows do not split into {', '.join(fused.parts)}")
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


def _shares_down(present: Sequence[LoraModule]) -> bool:
    first = present[0]
    return (all(p.down is first.down or (p.down.shape == first.down.shape and p.down.dtype == first.down.dtype
                                         and torch.equal(p.down, first.down)) for p in present)
            and all(p.scale == first.scale and p.alpha == first.alpha and p.use_rslora == first.use_rslora
                    for p in present))


def _rows(t: Optional[torch.Tensor], swap: bool, sizes: Sequence[int]) -> List[Optional[torch.Tensor]]:
    if t is None:
        return [None] * len(sizes)
    return list(torch.split(_swap(t) if swap else t, list(sizes)))


def split_full(m: LoraModule, fused: Fused, component: str = COMPONENT) -> List[LoraModule]:
    """A LyCORIS full (diff) update on a fused weight as one on each part: row slices of ΔW and of the bias delta."""
    diff, bias = m.op.params["diff"], m.op.bias
    if diff.dim() != 2:
        raise IncompatibleError(f"module {m.name}: a {tuple(diff.shape)} full (diff) update on "
                                f"{fused.original}, a linear weight: the file is not for this model")
    rows, in_f = diff.shape
    swap = fused.swaps(rows, in_f)
    sizes = fused.sizes(rows, in_f)
    if min(sizes) <= 0 or sum(sizes) != rows:  # thirds of 47 rows would drop two
        raise IncompatibleError(f"module {m.name}: {rows} rows do not split into {', '.join(fused.parts)}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise IncompatibleError(f"module {m.name}: its bias update has shape {tuple(bias.shape)}, its weight "
                                f"update {rows} rows: the file is "
                                f"inconsistent (re-export it from the trainer)")
    out = []
    for part, d, b in zip(fused.parts, _rows(diff, swap, sizes), _rows(bias, swap, sizes)):
        op = dataclasses.replace(m.op, params={"diff": d.contiguous()}, bias=None if b is None else b.contiguous())
        out.append(dataclasses.replace(m, name=f"{component}.{part}", up=m.up.new_zeros(d.shape[0], 1), op=op))
    return out


def _fuse_full(parts: Sequence[Optional[LoraModule]], fused: Fused, sizes: Sequence[int], name: str) -> LoraModule:
    """Full (diff) updates on parts as one on the fused weight (zero rows for parts without one)."""
    first = next(p for p in parts if p is not None)
    in_f = first.op.params["diff"].shape[1]

    def cat(get, width):
        if all(p is None or get(p) is None for p in parts):
            return None
        t = torch.cat([get(p) if p is not None and get(p) is not None else first.up.new_zeros((size,) + width)
                       for p, size in zip(parts, sizes)])
        return _swap(t) if fused.swaps(t.shape[0], in_f) else t
    diff = cat(lambda p: p.op.params["diff"], (in_f,))
    bias = cat(lambda p: p.op.bias, ())
    op = dataclasses.replace(first.op, params={"diff": diff}, bias=bias)
    return dataclasses.replace(first, name=name, up=first.up.new_zeros(diff.shape[0], 1), op=op)


def fuse(parts: Sequence[Optional[LoraModule]], fused: Fused, sizes: Sequence[int], name: str) -> LoraModule:
    """One LoRA on the fused weight from LoRAs on its parts (None: part not adapted, its rows stay 0)."""
    present = [p for p in parts if p is not None]
    first = present[0]
    if all(p.op is not None and p.op.algo == "full" for p in present):
        return _fuse_full(parts, fused, sizes, name)
    if len(parts) == 1 and not fused.swaps(first.up.shape[0], first.down.shape[1]):
        return dataclasses.replace(first, name=name)
    for p in present:
        _plain(p, fused, fused.original)
    if any(p.is_dora for p in present) and not (len(present) == len(parts) and all(p.is_dora for p in present)):
        raise IncompatibleError(f"module {name}: DoRA on some of {', '.join(fused.parts)} only cannot be fused "
                                "(the other parts have no magnitude, whose rows would depend on the base weight)")
    dtype = first.up.dtype
    for p in present:
        dtype = torch.promote_types(dtype, p.up.dtype)
    if _shares_down(present):  # rank unchanged: B rows stacked, zero rows for parts without a LoRA
        ups = [p.up.to(dtype) if p is not None else first.up.new_zeros(size, first.rank).to(dtype)
               for p, size in zip(parts, sizes)]
        up = torch.cat(ups)
        down, alpha, rslora = first.down, first.alpha, first.use_rslora
    else:  # rank Σr: A stacked, B block-diagonal; equal scales stay in alpha, else fold into B
        total = sum(p.rank for p in present)
        same = all(p.scale == first.scale for p in present)
        up = torch.zeros(sum(sizes), total, dtype=dtype)
        row, col = 0, 0
        for p, size in zip(parts, sizes):
            if p is not None:
                block = p.up if same else (p.up.float() * p.scale).to(dtype)
                up[row:row + size, col:col + p.rank] = block
                col += p.rank
            row += size
        down_dtype = first.down.dtype  # the widest: a bf16 part first must not round an fp32 part's A
        for p in present:
            down_dtype = torch.promote_types(down_dtype, p.down.dtype)
        down = torch.cat([p.down.to(down_dtype) for p in present])
        alpha, rslora = (first.scale * total if same else float(total)), False
    mag = torch.cat([p.magnitude for p in parts]) if first.is_dora else None
    if fused.swaps(up.shape[0], down.shape[1]):
        up = _swap(up)
        mag = None if mag is None else _swap(mag)
    return LoraModule(name=name, down=down, up=up.contiguous(), alpha=alpha, kind="linear", use_rslora=rslora,
                      magnitude=mag)
