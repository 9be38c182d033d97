"""LyCORIS files (read only): LoHa and LoKr converted to plain LoRA; full/diff, (IA)³, OFT, BOFT,
GLoRA and input-axis DoRA kept as exact transforms of the base weight (`lycoris_algos`), which
`merge` applies and `read(rank=…, base=…)` factors into LoRA.

Keys use kohya's names (`lora_unet_…`) with `.hada_w1_a` `.hada_w1_b` `.hada_w2_a` `.hada_w2_b`
(`.hada_t1` `.hada_t2` Tucker) or `.lokr_w1` / `.lokr_w1_a` `.lokr_w1_b`, `.lokr_w2` /
`.lokr_w2_a` `.lokr_w2_b` (`.lokr_t2`), plus `.alpha` and `.dora_scale`. The update follows
LyCORIS as ComfyUI applies it:
  LoHa: ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b),  r = w1b.shape[0]
  LoKr: ΔW = (alpha / r) · kron(w1, w2), r = the rank of the factored w1 or w2 (scale 1 if neither is)
There is no LoRA with the same factors, so each ΔW is built exactly (fp32) and factored by an
exact SVD at `rank` (default: its numerical rank, which is exact to fp32; a rank well below ΔW's size takes
the randomized top-k SVD, bounded in time). The Frobenius
fraction each module keeps is in `adapter.config["retained"]`. Plain `lora_down/up` modules in
the same file are kept exactly. DiT families' files (`lycoris_` and dotted names, original fused modules) are
named by `lycoris_dit` and split onto the diffusers modules by `kohya_dit`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

import torch

from .. import lycoris_algos
from ..adapter import LoraAdapter, LoraModule, placeholders
from ..errors import FormatError, IncompatibleError, UsageError
from ..lycoris_algos import Transform
from ..linalg import (OVERSAMPLE, POWER_ITERS, exact_svd, gram_dot, lowrank_svd, randomized_svd, retained,
                      split_factors, uses_exact_svd)
from ..archs import NameMap
from . import _single, kohya, kohya_dit, lycoris_dit
from ._parts import build_module, dora_in, lora_shape, output_magnitude
from .record import Format

BaseWeight = Callable[[str], Optional[torch.Tensor]]  # a weight of the base by name, None if it has none

HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PLAIN = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "dora_scale": "dora"}
# the key each transform algorithm is recognised by, and the keys it may have
TRANSFORMS = {"diff": "full", "oft_blocks": "oft", "weight": "ia3", "a1.weight": "glora"}
OTHER = ("diff", "diff_b", "oft_blocks", "rescale", "weight", "on_input", "a1.weight", "a2.weight", "b1.weight",
         "b2.weight", "bm.weight")
KNOWN = set(HADA) | set(LOKR) | set(PLAIN) | set(OTHER) | {"alpha"}
# the largest ΔW built densely (fp32: 1 GiB); the biggest real layers (4096 x 14336 LLM MLPs) are ~2^26
MAX_DELTA_ELEMENTS = 1 << 28


def detect(path: str) -> bool:
    keys = _single.peek_keys(path)
    own = set(HADA + LOKR + OTHER) - {"weight"}  # IA³'s `weight` alone ends every checkpoint key
    groups, unknown = lycoris_dit.group(dict.fromkeys(keys or ()), KNOWN)
    return bool(groups) and not unknown and any(own.intersection(p) for p in groups.values())


def algorithm(p: Dict[str, torch.Tensor]) -> str:
    if "lora_down.weight" in p:
        return "lora"
    if "hada_w1_a" in p:
        return "loha"
    if any(k.startswith("lokr_") for k in p):
        return "lokr"
    algo = next((a for k, a in TRANSFORMS.items() if k in p), None)
    if algo is None:
        raise FormatError(f"tensors {', '.join(sorted(p))} form no LyCORIS module loratools knows")
    return "boft" if algo == "oft" and p["oft_blocks"].dim() == 4 else algo


def native_rank_alpha(algo: str, p: Dict[str, torch.Tensor], factored: int, what: str) -> dict:
    """The rank (LyCORIS `dim`) and alpha the file was trained with, as its scale uses them
    (not those of the LoRA it is factored into): LoKr without a factored block has scale 1."""
    if algo == "loha":
        dim = int(p["hada_w1_b"].shape[0])
    else:
        dim = next((int(p[k].shape[0]) for k in ("lokr_w2_b", "lokr_w1_b") if k in p), None)
    if dim is None:
        return {"algorithm": algo, "rank": factored, "alpha": float(factored)}
    alpha = _single.scalar(p["alpha"], what) if "alpha" in p else float(dim)
    return {"algorithm": algo, "rank": dim, "alpha": alpha}


def _update_shape(p: Dict[str, torch.Tensor]) -> Optional[tuple]:
    """(rows, input width) of a module's linear update as its tensors' shapes tell (meta: nothing is built), or None
    (conv, a side only the base tells, or tensors that do not fit: the module's own read says why)."""
    try:
        algo = algorithm(p)
        if algo == "lora":
            return lora_shape({"down": p.get("lora_down.weight"), "up": p.get("lora_up.weight")})
        if algo in ("loha", "lokr"):
            build = lycoris_algos.loha_delta if algo == "loha" else lycoris_algos.lokr_delta
            shape = tuple(build({k: v.to("meta") for k, v in p.items() if k != "alpha"}).shape)
        else:
            shape = lycoris_algos.weight_shape(algo, p)
    except (FormatError, KeyError, RuntimeError, IndexError):
        return None
    return shape if len(shape) == 2 and min(shape) > 0 else None


def _probe(build, p: Dict[str, torch.Tensor], algo: str, where: str) -> torch.Tensor:
    """ΔW on the meta device: its shape, checked (and capped) before any memory is spent on it."""
    try:
        probe = build({k: v.to("meta") for k, v in p.items() if k != "alpha"})
    except (KeyError, RuntimeError, IndexError) as e:
        raise FormatError(f"{where}: incomplete or inconsistent {algo} tensors ({str(e).splitlines()[0]})") from None
    _cap(tuple(probe.shape), algo, where)
    return probe


def _cap(shape: tuple, algo: str, where: str) -> None:
    n = math.prod(d for d in shape if d)  # 0: a side only the base can tell, which bounds it itself
    if n > MAX_DELTA_ELEMENTS:
        raise FormatError(f"{where}: its {algo} update would be {shape} ({n:,} elements, "
                          f"over the {MAX_DELTA_ELEMENTS:,} loratools builds); no real layer is that large")


def _weight_shape(delta: torch.Tensor, name: str, nm, flat: Dict[str, str]) -> tuple:
    """The base weight's shape: ΔW's own when 4-D, else the known shape when it fits (a 2-D ΔW may
    be a flattened conv), else ΔW's own: merge fits a flattened conv to the base's kernel, and `flat`
    says why no file can be written from it."""
    known = tuple(nm.shapes.get(name) or ())
    if delta.dim() == 4:
        return tuple(delta.shape)
    if known and math.prod(known) == delta.numel() and known[0] == delta.shape[0]:
        return known
    if len(known) == 2:  # a linear module of the name list (of a smaller model of the family: merge checks)
        return tuple(delta.shape)
    if name.startswith(("unet.", "transformer.")):  # may be a flattened conv: only a base can tell
        why = f"it does not fit {known} in {nm.source}" if known else f"{nm.source} has no such module"
        flat[name] = f"cannot tell the weight shape of a {tuple(delta.shape)} update ({why}; --base resolves it)"
    return tuple(delta.shape)


def _transform_shape(algo: str, p: Dict[str, torch.Tensor], name: str, nm) -> tuple:
    """What the tensors say of the weight's shape, completed by the name list where it agrees (0: unknown)."""
    own = lycoris_algos.weight_shape(algo, p)
    known = tuple(nm.shapes.get(name) or ())
    if known and all(o in (-1, k) for o, k in zip(own, known)):
        return known
    if algo == "ia3" and p["weight"].dim() == 4:
        own = own + (-1, -1)
    if algo == "oft" and "rescale" in p:
        own = own + (-1,) * (p["rescale"].dim() - 2)
    return tuple(0 if o == -1 else o for o in own)


def _transform(algo: str, p: Dict[str, torch.Tensor], lora_name: str, path: str) -> Transform:
    if algo == "full":
        return Transform("full", {"diff": p["diff"]}, bias=p.get("diff_b"))
    keep = {k: v for k, v in p.items() if k != "diff_b"}
    if algo in ("oft", "boft") and "alpha" in p:
        keep["alpha"] = _single.scalar(p["alpha"], f"{path}: {lora_name}.alpha")
    return Transform(algo, keep)


def factor(name: str, delta: Optional[torch.Tensor], shape: tuple, rank: Optional[int], dtype: torch.dtype,
           magnitude: Optional[torch.Tensor], device: Optional[str] = None, pair=None):
    """Best rank-k LoRA of ΔW (fp32, on `device`): (module, retained Frobenius fraction). With `pair`
    (up, down), an exact LoRA of ΔW, the SVD is taken from its factors (the QR trick) and ΔW is never built.
    A dense ΔW at a rank well below its size gets the randomized top-k SVD (O(rows·cols·k), not a full SVD's
    O(n³)); its fraction is then measured on the factors written, ||up @ down||_F / ||ΔW||_F."""
    total = None  # ||ΔW||_F where the SVD was randomized
    if pair is not None:
        u, s, vh = lowrank_svd(pair[0].to(device or "cpu"), pair[1].to(device or "cpu"))
    else:
        matrix = delta.reshape(shape[0], -1).to(device or "cpu")
        if rank is not None and not uses_exact_svd(min(matrix.shape), rank):
            u, s, vh = randomized_svd(matrix, rank, oversample=OVERSAMPLE, n_iter=POWER_ITERS)
            total = float(torch.linalg.vector_norm(matrix, dtype=torch.float64))
        else:
            u, s, vh = exact_svd(matrix)
    if rank is None:  # numerical rank: singular values above fp32 round-off of the largest
        width = max(shape[0], math.prod(shape[1:]))
        tol = float(s[0]) * width * torch.finfo(torch.float32).eps if s.numel() else 0.0
        k = max(1, int((s > tol).sum()))
    else:
        k = max(1, min(rank, s.numel()))
    up, down = split_factors(u, s, vh, k)
    conv = len(shape) == 4
    if conv:
        up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    module = LoraModule(name=name, down=down.to("cpu", dtype).contiguous(), up=up.to("cpu", dtype).contiguous(),
                        alpha=float(k),
                        kind="conv" if conv else "linear", magnitude=magnitude)
    if total is None:
        return module, retained(s, k)[0]
    # the written product is ΔW projected on k orthonormal directions: its norm over ||ΔW|| is what it keeps
    kept = gram_dot(*(f.double().flatten(1) for f in (module.up, module.down, module.up, module.down)))
    return module, math.sqrt(max(kept, 0.0)) / total if total > 0 else 1.0


def _base_weight(base_weight: Optional[BaseWeight], base: Optional[str], name: str, what: str) -> torch.Tensor:
    if base is None or base_weight is None:
        raise UsageError(f"{what} depends on the base weight: give --base (the model it was trained on) to "
                         "factor it into LoRA")
    w = base_weight(name + ".weight")
    if w is None:
        raise FormatError(f"{what}: {base} has no weight {name}.weight")
    return w


def read(path: str, base: Optional[str] = None, allow_unmatched: bool = False, rank: Optional[int] = None,
         keep_unmatched: bool = False, device: Optional[str] = None,
         base_weight: Optional[BaseWeight] = None) -> LoraAdapter:
    """With `rank` (convert), every module is factored into LoRA (transforms of the base weight read
    it through `base_weight`, which the caller opens from `base`: formats sit below bases); without,
    transforms stay exact for `merge`. SVDs run on `device`."""
    if rank is not None and rank < 1:
        raise UsageError("--rank must be at least 1")
    tensors, metadata = _single.load(path)
    raw, unknown = lycoris_dit.group(tensors, KNOWN)
    if not raw:
        raise FormatError(f"{path}: no LyCORIS modules")
    if unknown:
        raise FormatError(f"{path}: {len(unknown)} key(s) of no LyCORIS algorithm loratools reads (norm modules?): "
                          f"{', '.join(sorted(unknown)[:8])}")
    groups, direct, unmatched, dnm = lycoris_dit.rename(raw, metadata, base)
    if unmatched and not (allow_unmatched or keep_unmatched):
        raise lycoris_dit.unresolved_error(path, unmatched, dnm)
    if keep_unmatched:  # shown as they are in the file
        direct.update({n: n for n in unmatched})
    layout = kohya_dit.layout_of(groups, metadata, _update_shape) if groups else None
    if layout is not None:  # a DiT family's original (fused) names
        nm = NameMap.from_base(base) if base else NameMap.from_manifest(layout.manifest)
        reader = _Reader(path, base, rank, device, lycoris_dit.with_original_shapes(nm, layout), base_weight)
        adapter = kohya_dit.read_original(groups, layout, metadata, path, base, allow_unmatched, keep_unmatched,
                                          build=reader.build, nm=nm)
        reader.follow(adapter.config["original_keys"])
        unmatched += adapter.config["unmatched"] + adapter.config["unresolved"]
        adapter = dataclasses.replace(adapter, format="lycoris")
    else:
        mapping, more, nm = kohya.resolve(list(groups), path, base, allow_unmatched, keep_unmatched) if groups \
            else ({}, [], dnm)
        unmatched += more
        reader = _Reader(path, base, rank, device, nm, base_weight)
        adapter = LoraAdapter(format="lycoris", metadata=metadata)
        for lora_name in sorted(groups):
            if lora_name in mapping:
                adapter.add(reader.build(mapping[lora_name], lora_name, groups[lora_name]))
    for lora_name in sorted(direct):
        adapter.add(reader.build(direct[lora_name], lora_name, raw[lora_name]))
    adapter.config = {"retained": reader.kept, "algorithms": reader.algos, "native": reader.native,
                      "flat": reader.flat, **kohya.unresolved_config(unmatched, keep_unmatched),
                      "names_from": nm.source, "file_modules": sorted(raw)}  # as named in the file: loaders read them
    return adapter


class _Reader:
    """Builds each module of one file and records what it was (algorithm, native rank/alpha, retained energy)."""

    def __init__(self, path: str, base: Optional[str], rank: Optional[int], device: Optional[str], nm,
                 base_weight: Optional[BaseWeight] = None):
        self.path, self.base, self.rank, self.device, self.nm = path, base, rank, device, nm
        self.base_weight = base_weight
        self.kept: Dict[str, float] = {}
        self.algos: Dict[str, str] = {}
        self.native: Dict[str, dict] = {}
        self.flat: Dict[str, str] = {}
        self.names: Dict[str, str] = {}  # file name -> the module name it was built under

    def build(self, name: str, lora_name: str, p: Dict[str, torch.Tensor], path: str = "") -> LoraModule:
        algo = self.algos[name] = algorithm(p)
        self.names[lora_name] = name
        what = f"{self.path}: {lora_name}"
        try:
            module = _module(algo, name, lora_name, p, self.path, self.nm, self.kept, self.flat, self.device,
                             self.rank)
        except KeyError as e:
            raise FormatError(f"{what}: {algo} module without its {e} tensor") from None
        if module.op is not None:
            self.native[name] = {"algorithm": algo, "rank": 1, "alpha": 1.0}
        elif algo in ("loha", "lokr"):
            self.native[name] = native_rank_alpha(algo, p, module.rank, f"{what}.alpha")
        if self.rank is None or not (module.op is not None or algo in ("loha", "lokr") or module.mid is not None):
            return module
        if algo in ("loha", "lokr") and "dora_scale" not in p:  # _module factored it at the rank already
            return module
        label = module.op.label if module.op is not None else algo
        w = _base_weight(self.base_weight, self.base, name, f"{what} ({label})") if module.op is not None and \
            module.op.algo != "full" else None
        pair = None
        if module.op is None and module.mid is None and module.magnitude is None:  # an exact LoRA: no ΔW needed
            pair, delta = (module.up.float().flatten(1) * module.scale, module.down.float().flatten(1)), None
        else:
            delta = module.op.delta(w) if w is not None else (
                module.op.params["diff"].float() if module.op is not None else module.dense_delta())
        if module.op is not None and module.op.bias is not None:
            raise IncompatibleError(f"{what}: the full (diff) update also changes the bias, which LoRA cannot "
                                    "hold; merge it instead")
        shape = tuple(w.shape) if w is not None else module.weight_shape if delta is None else tuple(delta.shape)
        delta = None if delta is None else delta.reshape(shape)
        module, self.kept[name] = factor(name, delta, shape, self.rank, torch.float32, None, self.device, pair)
        return module

    def follow(self, split: Dict[str, List[str]]) -> None:
        """What was recorded for a module on a fused original name holds for each diffusers part it became."""
        for lora_name, parts in split.items():
            name = self.names.get(lora_name)
            for table in (self.kept, self.algos, self.native, self.flat):
                if name in table:
                    for part in parts:
                        table[part] = table[name]
                    if name not in parts:
                        del table[name]


def _module(algo: str, name: str, lora_name: str, p: Dict[str, torch.Tensor], path: str, nm,
            retained: Dict[str, float], flat: Dict[str, str], device: Optional[str] = None,
            rank: Optional[int] = None) -> LoraModule:
    """One module: a LoRA (LoHa/LoKr factored exactly at their numerical rank, or at `rank` when given and
    the module has no DoRA scale, the kept fraction in `retained`) or a transform."""
    if algo == "lora":
        parts = {PLAIN[k]: v for k, v in p.items() if k in PLAIN}
        if "alpha" in p:
            parts["alpha"] = p["alpha"]
        return build_module(name, lora_name, parts, path)
    where = f"{path}: {lora_name}"
    if algo in ("loha", "lokr"):
        build = lycoris_algos.loha_delta if algo == "loha" else lycoris_algos.lokr_delta
        shape = _weight_shape(_probe(build, p, algo, where), name, nm, flat)
        try:
            pair = lycoris_algos.lowrank_factors(algo, p)
            delta = build(p).reshape(shape) if pair is None else None
        except (KeyError, RuntimeError) as e:  # e.g. an alpha that is not a scalar
            raise FormatError(f"{where}: inconsistent {algo} tensors ({str(e).splitlines()[0]})") from None
        dtype = next(v.dtype for k, v in p.items() if k != "alpha")
        at = None if "dora_scale" in p else rank  # DoRA's norm is of the exact update: factored after it
        module, retained[name] = factor(name, delta, shape, at, dtype, None, device, pair)
        if "dora_scale" in p:
            d = p["dora_scale"]
            if d.dim() >= 2 and d.shape[0] == 1 and d.shape[1] != 1:
                return dora_in(module, d)
            mag = output_magnitude(d, shape[0], 1, f"{path}: {lora_name}")
            module = dataclasses.replace(module, magnitude=mag)
        return module
    op = _transform(algo, p, lora_name, path)
    shape = _transform_shape(algo, p, name, nm)
    if len(shape) < 2:  # a weight is 2-D or more (a 1-D `diff` is a bias's size)
        raise FormatError(f"{where}: its {algo} update has shape {shape}, which no weight has; the file is damaged")
    _cap(shape, algo, where)  # GLoRA's b1·b2 is built from small factors; the rest are W-sized
    return LoraModule(name=name, **placeholders(shape), op=op)


FORMAT = Format("lycoris", detect, read, None, folder=False,
                options=("base", "allow_unmatched", "rank", "keep_unmatched", "device", "base_weight"))
