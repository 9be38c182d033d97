"""LyCORIS LoHa and LoKr files (read only), converted to plain LoRA.

Keys use kohya's names (`lora_unet_…`) with `.hada_w1_a` `.hada_w1_b` `.hada_w2_a` `.hada_w2_b`
(`.hada_t1` `.hada_t2` Tucker) or `.lokr_w1` / `.lokr_w1_a` `.lokr_w1_b`, `.lokr_w2` /
`.lokr_w2_a` `.lokr_w2_b` (`.lokr_t2`), plus `.alpha` and `.dora_scale`. The update follows
LyCORIS as ComfyUI applies it:
  LoHa: ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b),  r = w1b.shape[0]
  LoKr: ΔW = (alpha / r) · kron(w1, w2), r = the rank of the factored w1 or w2 (scale 1 if neither is)
There is no LoRA with the same factors, so each ΔW is built exactly (fp32) and factored by an
exact SVD at `rank` (default: its numerical rank, which is exact to fp32). The Frobenius
fraction each module keeps is in `adapter.config["retained"]`. Plain `lora_down/up` modules in
the same file are kept exactly.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ..adapter import LoraAdapter, LoraModule
from ..errors import FormatError, UsageError
from ..linalg import exact_svd, retained, split_factors
from . import _single, kohya
from .record import Format

HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PLAIN = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "dora_scale": "dora"}
KNOWN = set(HADA) | set(LOKR) | set(PLAIN) | {"alpha"}
# the largest ΔW built densely (fp32: 1 GiB); the biggest real layers (4096 x 14336 LLM MLPs) are ~2^26
MAX_DELTA_ELEMENTS = 1 << 28


def detect(path: str) -> bool:
    keys = _single.peek_keys(path)
    return bool(keys) and any(k.split(".", 1)[-1] in HADA + LOKR for k in keys) and all(
        kohya.is_kohya_key(k) for k in keys)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS Tucker: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def loha_delta(p: Dict[str, torch.Tensor]) -> torch.Tensor:
    f = {k: v.float() for k, v in p.items()}
    if "hada_t1" in f:
        m1 = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
        m2 = _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        m1, m2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
    scale = f["alpha"].item() / p["hada_w1_b"].shape[0] if "alpha" in f else 1.0
    return m1 * m2 * scale


def lokr_delta(p: Dict[str, torch.Tensor]) -> torch.Tensor:
    f = {k: v.float() for k, v in p.items()}
    dim = None
    if "lokr_w1" in f:
        w1 = f["lokr_w1"]
    else:
        dim, w1 = p["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        dim = p["lokr_w2_b"].shape[0]
        if "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = f["alpha"].item() / dim if "alpha" in f and dim else 1.0
    return torch.kron(w1, w2) * scale


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


def _probe(build, p: Dict[str, torch.Tensor], algo: str, where: str) -> torch.Tensor:
    """ΔW on the meta device: its shape, checked (and capped) before any memory is spent on it."""
    try:
        probe = build({k: v.to("meta") for k, v in p.items() if k != "alpha"})
    except (KeyError, RuntimeError, IndexError) as e:
        raise FormatError(f"{where}: incomplete or inconsistent {algo} tensors ({str(e).splitlines()[0]})") from None
    if probe.numel() > MAX_DELTA_ELEMENTS:
        raise FormatError(f"{where}: its {algo} update would be {tuple(probe.shape)} ({probe.numel():,} elements, "
                          f"over the {MAX_DELTA_ELEMENTS:,} loratools builds); no real layer is that large")
    return probe


def _weight_shape(delta: torch.Tensor, name: str, nm, path: str, lenient: bool = False) -> tuple:
    """The base weight's shape: ΔW's own when 4-D, else the known shape when it fits (a 2-D ΔW may
    be a flattened conv), else 2-D for text encoders, which hold linear layers only. `lenient`
    (reports): ΔW's own shape where nothing tells."""
    known = tuple(nm.shapes.get(name) or ())
    if delta.dim() == 4:
        return tuple(delta.shape)
    if known and math.prod(known) == delta.numel() and known[0] == delta.shape[0]:
        return known
    if lenient or not name.startswith(("unet.", "transformer.")):
        return tuple(delta.shape)
    why = f"it does not fit {known} in {nm.source}" if known else f"{nm.source} has no such module"
    raise FormatError(f"{path}: {name}: cannot tell the weight shape of a {tuple(delta.shape)} update ({why}; "
                      "a base pipeline folder resolves it: `inspect --base`, `convert --base`)")


def factor(name: str, delta: torch.Tensor, shape: tuple, rank: Optional[int], dtype: torch.dtype,
           magnitude: Optional[torch.Tensor], device: Optional[str] = None):
    """Best rank-k LoRA of ΔW (exact SVD, fp32, on `device`): (module, retained Frobenius fraction)."""
    mat = delta.reshape(shape[0], -1).to(device or "cpu")
    u, s, vh = exact_svd(mat)
    if rank is None:  # numerical rank: singular values above fp32 round-off of the largest
        tol = float(s[0]) * max(mat.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
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
    return module, retained(s, k)[0]


def read(path: str, base: Optional[str] = None, allow_unmatched: bool = False, rank: Optional[int] = None,
         keep_unmatched: bool = False, device: Optional[str] = None) -> LoraAdapter:
    if rank is not None and rank < 1:
        raise UsageError("--rank must be at least 1")
    tensors, metadata = _single.load(path)
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        lora_name, _, part = key.partition(".")
        if part in KNOWN:
            groups.setdefault(lora_name, {})[part] = t
        else:
            unknown.append(key)
    if unknown:
        raise FormatError(f"{path}: {len(unknown)} key(s) loratools cannot convert to LoRA (LyCORIS full, norm "
                          f"or OFT modules?): {', '.join(sorted(unknown)[:8])}")
    mapping, unmatched, nm = kohya.resolve(list(groups), path, base, allow_unmatched, keep_unmatched)
    adapter = LoraAdapter(format="lycoris", metadata=metadata)
    kept: Dict[str, float] = {}
    algos: Dict[str, str] = {}
    native: Dict[str, dict] = {}
    for lora_name in sorted(groups):
        if lora_name not in mapping:
            continue
        name, p = mapping[lora_name], groups[lora_name]
        if "lora_down.weight" in p:
            parts = {PLAIN[k]: v for k, v in p.items() if k in PLAIN}
            if "alpha" in p:
                parts["alpha"] = p["alpha"]
            adapter.add(kohya.build_module(name, lora_name, parts, path))
            algos[name] = "lora"
            continue
        algo = "loha" if "hada_w1_a" in p else "lokr"
        build = loha_delta if algo == "loha" else lokr_delta
        shape = _weight_shape(_probe(build, p, algo, f"{path}: {lora_name}"), name, nm, path, lenient=keep_unmatched)
        try:
            delta = build(p)
        except (KeyError, RuntimeError) as e:  # e.g. an alpha that is not a scalar
            raise FormatError(f"{path}: {lora_name}: inconsistent {algo} tensors ({str(e).splitlines()[0]})") from None
        dora = None
        if "dora_scale" in p:
            dora = kohya.build_module(name, lora_name, {"down": torch.zeros(1, 1), "up": torch.zeros(shape[0], 1),
                                                        "dora": p["dora_scale"]}, path).magnitude
        dtype = next(v.dtype for k, v in p.items() if k != "alpha")
        module, kept[name] = factor(name, delta.reshape(shape), shape, rank, dtype, dora, device)
        adapter.add(module)
        algos[name] = algo
        native[name] = native_rank_alpha(algo, p, module.rank, f"{path}: {lora_name}.alpha")
    adapter.config = {"retained": kept, "algorithms": algos, "native": native,
                      **kohya.unresolved_config(unmatched, keep_unmatched),
                      "names_from": nm.source}
    return adapter


FORMAT = Format("lycoris", detect, read, None, folder=False,
                options=("base", "allow_unmatched", "rank", "keep_unmatched", "device"))
