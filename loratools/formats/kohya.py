"""kohya / sd-scripts LoRA: one file, keys `<lora_name>.lora_down.weight` / `.lora_up.weight` /
`.alpha` (+ LoCon Tucker `.lora_mid.weight`, LyCORIS-style DoRA `.dora_scale`).

`lora_name` is `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` + the module's path with
dots turned into `_`; names are resolved with `loratools.archs` (never by splitting on `_`).
Module names in the adapter are diffusers names with their component prefix (`unet.…`).
The writer computes kohya's metadata (`ss_network_dim`, `ss_network_alpha`, …) and the
`sshs_model_hash` / `sshs_legacy_hash` that sd-scripts precalculates.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Dict, List, Optional, Tuple

import torch

from .. import safetensors_io
from ..adapter import LoraAdapter
from ..archs import KOHYA_PREFIXES, canonical, resolve_kohya, split_kohya
from ..errors import FormatError, IncompatibleError, ShapeMismatchError
from . import _single, kohya_dit
from ._parts import build_module
from .record import Format

ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
         ".alpha": "alpha", ".dora_scale": "dora"}
LYCORIS_MARKERS = (".hada_", ".lokr_", ".diff", ".w_norm", ".b_norm", ".oft_", ".lora_down.diff")
# component -> kohya prefix when writing (text_encoder becomes lora_te1_ next to a text_encoder_2)
WRITE_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                  "text_encoder_3": "lora_te3_"}
DROP_METADATA = ("format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash")


def is_kohya_key(key: str) -> bool:
    return split_kohya(key.split(".", 1)[0])[0] is not None


def detect(path: str) -> bool:
    keys = _single.peek_keys(path)
    if not keys:
        return False
    return (any(k.endswith(".lora_down.weight") for k in keys) and all(is_kohya_key(k) for k in keys)
            and not any(m in k for k in keys for m in LYCORIS_MARKERS))


def group(tensors: Dict[str, torch.Tensor], path: str) -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[str]]:
    """lora_name -> {role: tensor}; and the keys that are no kohya LoRA part."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    other = []
    for key, t in tensors.items():
        for suffix, role in ROLES.items():
            if key.endswith(suffix) and "." not in key[: -len(suffix)]:
                groups.setdefault(key[: -len(suffix)], {})[role] = t
                break
        else:
            other.append(key)
    return groups, other


def resolve(names: List[str], path: str, base: Optional[str], allow_unmatched: bool, keep_unmatched: bool = False):
    """kohya name -> real name, or an error that lists the names no known module has.
    With `keep_unmatched` (inspect, validate, resize) those names are kept as they are instead."""
    mapping, unmatched, nm = resolve_kohya(names, base)
    if keep_unmatched:
        mapping.update({n: n for n in unmatched})
    elif unmatched and not allow_unmatched:
        shown = ", ".join(sorted(unmatched)[:8]) + (" …" if len(unmatched) > 8 else "")
        # no option names here: commands differ in what they take (`convert --base/--allow-unmatched`)
        hint = "is it for this base?" if base else "an adapter for a model family loratools has no name list for?"
        raise FormatError(f"{path}: {len(unmatched)} module name(s) match no module of {nm.source}: {shown} ({hint} "
                          "`loratools inspect` shows them; `convert --base` resolves them from a pipeline or "
                          "model folder)")
    return mapping, unmatched, nm


def unresolved_config(unmatched: List[str], kept: bool) -> dict:
    """Names no known module has: dropped ("unmatched") or kept as they are in the file ("unresolved")."""
    return {"unmatched": [] if kept else sorted(unmatched), "unresolved": sorted(unmatched) if kept else []}


def read(path: str, base: Optional[str] = None, allow_unmatched: bool = False,
         keep_unmatched: bool = False) -> LoraAdapter:
    tensors, metadata = _single.load(path)
    groups, other = group(tensors, path)
    if other:
        raise FormatError(f"{path}: {len(other)} key(s) that are no kohya LoRA tensor: {', '.join(sorted(other)[:8])}")
    if not groups:
        raise FormatError(f"{path}: no LoRA modules")
    layout = kohya_dit.layout_of(groups, metadata)
    if layout is not None:
        return kohya_dit.read_original(groups, layout, metadata, path, base, allow_unmatched, keep_unmatched)
    mapping, unmatched, nm = resolve(list(groups), path, base, allow_unmatched, keep_unmatched)
    adapter = LoraAdapter(format="kohya", metadata=metadata)
    keys, alpha_dtypes, dora_shapes = {}, {}, {}
    for lora_name in sorted(groups):
        if lora_name not in mapping:
            continue
        name, parts = mapping[lora_name], groups[lora_name]
        module = build_module(name, lora_name, parts, path)
        if base and name in nm.shapes and tuple(nm.shapes[name]) != module.weight_shape:
            raise ShapeMismatchError(f"{path}: {lora_name} updates a {module.weight_shape} weight but {name} "
                                     f"in {base} is {tuple(nm.shapes[name])}")
        adapter.add(module)
        keys[name] = lora_name
        if "alpha" in parts:
            alpha_dtypes[name] = safetensors_io.dtype_name(parts["alpha"].dtype)
        if "dora" in parts:
            dora_shapes[name] = list(parts["dora"].shape)
    adapter.config = {"keys": keys, "alpha_dtypes": alpha_dtypes, "dora_shapes": dora_shapes,
                      **unresolved_config(unmatched, keep_unmatched), "names_from": nm.source}
    return adapter


def kohya_names(adapter: LoraAdapter) -> Dict[str, str]:
    """Real module name -> kohya lora_name: the one read, else flattened from the name."""
    read_keys = adapter.config.get("keys", {})
    comps = {m.name.split(".", 1)[0] for m in adapter}
    out: Dict[str, str] = {}
    for m in adapter:
        comp, _, rest = canonical(m.name).partition(".")
        if m.name in read_keys:
            ln = read_keys[m.name]
            if comp.startswith("text_encoder") and rest:  # sd-scripts' `text_model_…` spelling: ComfyUI maps only it
                ln = ln[: len(ln) - len(split_kohya(ln)[1])] + rest.replace(".", "_")
            out[m.name] = ln
            continue
        if comp not in WRITE_PREFIXES or not rest:
            why = ("kohya names DiT transformers by their original checkpoint names, which loratools maps for Flux.1, "
                   "FLUX.2, SD3/3.5, Wan 2.x and Qwen-Image only; write diffusers or peft instead"
                   if comp == "transformer" else
                   "its modules are one model's: write peft, or first name the component with "
                   "`loratools convert ADAPTER --component unet --to kohya`")
            raise IncompatibleError(f"module {m.name}: kohya needs a pipeline component prefix "
                                    f"({', '.join(WRITE_PREFIXES)}); {why}")
        prefix = WRITE_PREFIXES[comp]
        if comp == "text_encoder" and "text_encoder_2" in comps:
            prefix = "lora_te1_"
        out[m.name] = prefix + rest.replace(".", "_")
    seen: Dict[str, str] = {}
    for name, ln in out.items():
        if ln in seen:
            raise IncompatibleError(f"modules {seen[ln]} and {name} both flatten to the kohya name {ln}")
        seen[ln] = name
    return out


def state_dict(adapter: LoraAdapter) -> Dict[str, torch.Tensor]:
    if adapter.extra:
        raise IncompatibleError(f"kohya LoRA files cannot hold full tensors ({', '.join(sorted(adapter.extra)[:4])}); "
                                "write peft instead")
    alpha_dtypes = adapter.config.get("alpha_dtypes", {})
    dora_shapes = adapter.config.get("dora_shapes", {})
    layout = kohya_dit.write_layout(adapter)
    if layout is not None:
        items = kohya_dit.original_items(adapter, layout)
    else:
        names = kohya_names(adapter)
        items = [(names[m.name], m, alpha_dtypes.get(m.name)) for m in adapter]
    out: Dict[str, torch.Tensor] = {}
    for ln, m, alpha_dtype in items:
        if m.kind == "embedding":
            raise IncompatibleError(f"module {m.name}: kohya LoRA has no embedding modules; write peft instead")
        if m.fan_in_fan_out:
            raise IncompatibleError(f"module {m.name}: kohya LoRA cannot hold fan_in_fan_out (Conv1D) modules")
        # rsLoRA folds exactly into alpha: alpha/sqrt(r) == (alpha*sqrt(r))/r
        alpha = m.alpha_value * math.sqrt(m.rank) if m.use_rslora else m.alpha_value
        out[ln + ".lora_down.weight"] = m.down
        out[ln + ".lora_up.weight"] = m.up
        if m.mid is not None:
            out[ln + ".lora_mid.weight"] = m.mid
        out[ln + ".alpha"] = _single.alpha_tensor(alpha, None if m.use_rslora else alpha_dtype, m.down.dtype)
        if m.magnitude is not None:
            shape = dora_shapes.get(m.name) or [m.magnitude.numel()] + [1] * (m.up.dim() - 1)
            out[ln + ".dora_scale"] = m.magnitude.reshape(shape)
        elif m.op is not None:  # a DoRA normed per input column, as read ([1, in])
            out[ln + ".dora_scale"] = m.op.params["dora_scale"]
    return {k: v.contiguous() for k, v in out.items()}


def _summary(values) -> str:
    vals = set(values)
    return "Dynamic" if len(vals) != 1 else vals.pop()


def build_metadata(adapter: LoraAdapter, metadata: Optional[Dict[str, str]]) -> Dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if k not in DROP_METADATA}
    meta.update(metadata or {})
    mods = list(adapter)
    alpha = lambda m: m.alpha_value * math.sqrt(m.rank) if m.use_rslora else m.alpha_value  # noqa: E731
    conv3 = [m for m in mods if m.kind == "conv" and m.weight_shape[2:] != (1, 1)]
    main = [m for m in mods if all(m is not c for c in conv3)] or mods
    meta["ss_network_dim"] = _summary(str(m.rank) for m in main)
    meta["ss_network_alpha"] = _summary(str(float(alpha(m))) for m in main)
    layout = kohya_dit.write_layout(adapter)  # sd-scripts' own network module for Flux / SD3
    meta.setdefault("ss_network_module", layout.kohya_module if layout else "networks.lora")
    if conv3:
        try:
            args = json.loads(meta.get("ss_network_args", "{}"))
        except ValueError:
            args = {}
        args = args if isinstance(args, dict) else {}
        args["conv_dim"] = _summary(str(m.rank) for m in conv3)
        args["conv_alpha"] = _summary(str(float(alpha(m))) for m in conv3)
        meta["ss_network_args"] = json.dumps(args)
    return meta


def kohya_hashes(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Tuple[str, str, List[str]]:
    """(sshs_model_hash, sshs_legacy_hash, tensor order) as sd-scripts computes them.

    Follows kohya-ss/sd-scripts library/train_util.py `precalculate_safetensors_hashes`: serialise
    the tensors with only the `ss_*` metadata using safetensors itself; the model hash is the
    sha256 of everything after the header (`addnet_hash_safetensors`), the legacy hash the first
    8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (`addnet_hash_legacy`).
    The order is the one safetensors laid the tensors out in, so our file has the same data section.
    """
    import safetensors.torch
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(tensors, ss)
    (n,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return model_hash, legacy_hash, order


def write(adapter: LoraAdapter, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    if not len(adapter):
        raise FormatError("the adapter has no LoRA modules to write")
    tensors = state_dict(adapter)
    meta = build_metadata(adapter, metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"], order = kohya_hashes(tensors, meta)
    safetensors_io.save(path, tensors, meta, order=order)


__all__ = ["detect", "read", "write", "KOHYA_PREFIXES"]


FORMAT = Format("kohya", detect, read, write, folder=False, options=("base", "allow_unmatched", "keep_unmatched"))
