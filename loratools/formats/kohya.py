"""kohya / sd-scripts LoRA: one file, keys `<lora_name>.lora_down.weight` / `.lora_up.weight` /
`.alpha` (+ LoCon Tucker `.lora_mid.weight`, LyCORIS-style DoRA `.dora_scale`).

`lora_name` is `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` + the module's path with
dots turned into `_`; names are resolved with `loratools.archs` (never by splitting on `_`).
Module names in the adapter are diffusers names with their component prefix (`unet.…`).
The writer computes kohya's metadata (`ss_network_dim`, `ss_network_alpha`, …) and the
`sshs_model_hash` / `sshs_legacy_hash` that sd-scripts precalculates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from typing import Dict, List, Optional, Tuple

import torch

from .. import safetensors_io
from ..adapter import LoraAdapter, LoraModule
from ..archs import KOHYA_PREFIXES, NameMap, canonical, flux, qwen, resolve_kohya, split_kohya, wan
from ..errors import FormatError, IncompatibleError, ShapeMismatchError
from ..lycoris_algos import Transform
from . import _single
from .record import Format

ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
         ".alpha": "alpha", ".dora_scale": "dora"}
LYCORIS_MARKERS = (".hada_", ".lokr_", ".diff", ".w_norm", ".b_norm", ".oft_", ".lora_down.diff")
# component -> kohya prefix when writing (text_encoder becomes lora_te1_ next to a text_encoder_2)
WRITE_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                  "text_encoder_3": "lora_te3_"}
# Flux (sd-scripts lora_flux.py): the transformer under its BFL names, CLIP-L as te1, T5 as te3
FLUX_PREFIXES = {"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2",
                 # diffusers' names flattened: OneTrainer (`lora_transformer_`, T5 as te2), older ai-toolkit
                 "lora_transformer_": "transformer", "lora_te2_": "text_encoder_2", "lora_unet_": "transformer"}
FLUX_WRITE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
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


def build_module(name: str, lora_name: str, parts: Dict[str, torch.Tensor], path: str) -> LoraModule:
    for role in ("down", "up"):
        if role not in parts:
            raise FormatError(f"{path}: module {lora_name} has no lora_{role} tensor")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    alpha = _single.scalar(parts["alpha"], f"{path}: {lora_name}.alpha") if "alpha" in parts else None
    if alpha == 0:  # sd-scripts treats alpha 0 (or none) as alpha = rank
        alpha = None
    magnitude = None
    d = parts.get("dora")
    input_axis = d is not None and d.dim() >= 2 and d.shape[0] == 1 and d.shape[1] == down.shape[1] != 1
    if d is not None and not input_axis:
        if d.dim() < 2 or d.shape[0] != up.shape[0] or d[0].numel() != 1:
            raise ShapeMismatchError(
                f"{path}: {lora_name}.dora_scale has shape {tuple(d.shape)}; LyCORIS writes [{up.shape[0]}, 1…] "
                f"(wd_on_output) or [1, {down.shape[1]}, …]")
        magnitude = d.reshape(-1)
    kind = "conv" if down.dim() == 4 or mid is not None else "linear"
    module = LoraModule(name=name, down=down, up=up, alpha=alpha, kind=kind, magnitude=magnitude, mid=mid)
    return dora_in(module, d) if input_axis else module


def dora_in(module: LoraModule, dora: torch.Tensor) -> LoraModule:
    """LyCORIS DoRA normed per input column (wd_on_output=False): no PEFT/diffusers equivalent, so an
    exact transform (`lycoris_algos`) that merge applies and `convert --rank` factors."""
    up, down = module.up.flatten(1).float(), module.down.float()
    if module.mid is not None:
        down = torch.einsum("abhw,bi->aihw", module.mid.float(), down.flatten(1))
    delta = (up @ down.flatten(1)) * module.scale
    op = Transform("dora", {"delta": delta, "dora_scale": dora, "on_output": False})
    return dataclasses.replace(module, op=op)


def read(path: str, base: Optional[str] = None, allow_unmatched: bool = False,
         keep_unmatched: bool = False) -> LoraAdapter:
    tensors, metadata = _single.load(path)
    groups, other = group(tensors, path)
    if other:
        raise FormatError(f"{path}: {len(other)} key(s) that are no kohya LoRA tensor: {', '.join(sorted(other)[:8])}")
    if not groups:
        raise FormatError(f"{path}: no LoRA modules")
    as_qwen = qwen.is_kohya(groups, metadata)  # musubi-tuner's Qwen-Image names look like Flux's flattened ones
    if is_flux(groups) and not as_qwen:
        return read_flux(groups, metadata, path, base, allow_unmatched, keep_unmatched)
    if is_wan(groups):
        return read_wan(groups, metadata, path, allow_unmatched, keep_unmatched)
    names_from = qwen.kohya_map(base) if as_qwen else base
    mapping, unmatched, nm = resolve(list(groups), path, names_from, allow_unmatched, keep_unmatched)
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


def is_flux(groups) -> bool:
    """BFL names (sd-scripts), or a Flux transformer's diffusers names flattened (OneTrainer, older ai-toolkit)."""
    names = NameMap.from_manifest("flux")
    for ln in groups:
        prefix = next((p for p in ("lora_unet_", "lora_transformer_") if ln.startswith(p)), None)
        if prefix and (flux.unflatten(ln[len(prefix):]) or names.resolve("transformer", ln[len(prefix):])):
            return True
    return False


def read_flux(groups, metadata, path, base, allow_unmatched, keep_unmatched) -> LoraAdapter:
    """A kohya Flux LoRA: `lora_unet_<BFL name>` split onto the diffusers modules (exactly), the
    text encoders resolved from the Flux manifest (or the base's names)."""
    nm = NameMap.from_base(base) if base else NameMap.from_manifest("flux")
    adapter = LoraAdapter(format="kohya", metadata=metadata)
    keys, alpha_dtypes, unmatched = {}, {}, []
    for lora_name in sorted(groups):
        parts = groups[lora_name]
        original = flux.unflatten(lora_name[len("lora_unet_"):]) if lora_name.startswith("lora_unet_") else None
        prefix = next((p for p in FLUX_PREFIXES if lora_name.startswith(p)), "")
        hits = nm.resolve(FLUX_PREFIXES[prefix], lora_name[len(prefix):]) if prefix else []
        if original:
            module = build_module(f"transformer.{original}", lora_name, parts, path)
            mods = flux.from_original(original, module)
        elif len(hits) == 1:
            mods = [build_module(hits[0], lora_name, parts, path)]
        else:
            unmatched.append(lora_name)
            if keep_unmatched:
                adapter.add(build_module(lora_name, lora_name, parts, path))
            continue
        for m in mods:
            adapter.add(m)
        keys[lora_name] = [m.name for m in mods]
        if "alpha" in parts:
            alpha_dtypes[lora_name] = safetensors_io.dtype_name(parts["alpha"].dtype)
    if unmatched and not (allow_unmatched or keep_unmatched):
        shown = ", ".join(unmatched[:8]) + (" …" if len(unmatched) > 8 else "")
        raise FormatError(f"{path}: {len(unmatched)} module name(s) of this Flux LoRA match no module of "
                          f"{nm.source}: {shown} (`loratools inspect` shows them)")
    adapter.config = {"flux_keys": keys, "alpha_dtypes": alpha_dtypes, "keys": {}, "dora_shapes": {},
                      **unresolved_config(unmatched, keep_unmatched), "names_from": nm.source}
    return adapter


def is_wan(groups) -> bool:
    return any(ln.startswith("lora_unet_") and wan.unflatten(ln[len("lora_unet_"):]) for ln in groups)


def read_wan(groups, metadata, path, allow_unmatched, keep_unmatched) -> LoraAdapter:
    """A musubi-tuner Wan LoRA: `lora_unet_<Wan's original name>`, renamed one to one (`archs.wan`)."""
    adapter = LoraAdapter(format="kohya", metadata=metadata)
    keys, alpha_dtypes, unmatched = {}, {}, []
    for lora_name in sorted(groups):
        original = wan.unflatten(lora_name[len("lora_unet_"):]) if lora_name.startswith("lora_unet_") else None
        if original is None:
            unmatched.append(lora_name)
            if keep_unmatched:
                adapter.add(build_module(lora_name, lora_name, groups[lora_name], path))
            continue
        module = build_module(f"transformer.{wan.to_diffusers(original)}", lora_name, groups[lora_name], path)
        adapter.add(module)
        keys[module.name] = lora_name
        if "alpha" in groups[lora_name]:
            alpha_dtypes[module.name] = safetensors_io.dtype_name(groups[lora_name]["alpha"].dtype)
    if unmatched and not (allow_unmatched or keep_unmatched):
        raise FormatError(f"{path}: {len(unmatched)} module name(s) of this Wan LoRA have no Wan transformer "
                          f"module: {', '.join(unmatched[:8])} (`loratools inspect` shows them)")
    adapter.config = {"keys": keys, "alpha_dtypes": alpha_dtypes, "dora_shapes": {},
                      **unresolved_config(unmatched, keep_unmatched), "names_from": "Wan's original names"}
    return adapter


def flux_items(adapter: LoraAdapter) -> List[Tuple[str, LoraModule, Optional[str]]]:
    """(kohya name, module, alpha dtype) of a Flux adapter: transformer LoRAs fused onto BFL names."""
    fused, rest = flux.to_original(list(adapter))
    dtypes = adapter.config.get("alpha_dtypes", {})
    items = []
    for original, m in fused.items():
        ln = "lora_unet_" + original.replace(".", "_")
        items.append((ln, m, dtypes.get(ln)))
    for m in rest:
        comp, _, local = canonical(m.name).partition(".")
        if comp not in FLUX_WRITE or not local:
            raise IncompatibleError(f"module {m.name}: a kohya Flux LoRA holds the transformer and text_encoder "
                                    "(CLIP-L) / text_encoder_2 (T5) only")
        ln = FLUX_WRITE[comp] + local.replace(".", "_")
        items.append((ln, m, dtypes.get(ln)))
    return items


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
            why = ("kohya names DiT transformers by their original checkpoint names, which loratools maps for "
                   "Flux.1 and Wan only (not SD3 yet); write diffusers or peft instead" if comp == "transformer" else
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
    if wan.is_wan(adapter):  # musubi-tuner's names, which ComfyUI maps too
        items = [("lora_unet_" + o.replace(".", "_"), m, alpha_dtypes.get(m.name)) for o, m in wan.originals(adapter)]
    elif qwen.transformer_only(adapter, "kohya"):  # musubi-tuner's names, which diffusers and ComfyUI read
        items = [("lora_unet_" + m.name.partition(".")[2].replace(".", "_"), m, alpha_dtypes.get(m.name))
                 for m in adapter]
    elif any(flux.is_flux_module(m.name) for m in adapter) and flux.other_family(adapter) is None:
        items = flux_items(adapter)
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
    meta.setdefault("ss_network_module", "networks.lora")
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
