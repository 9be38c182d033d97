"""diffusers LoRA files (`pytorch_lora_weights.safetensors`): PEFT-style keys with a pipeline
component prefix, `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`,
`text_encoder_2.`, `transformer.`). Alpha comes from `<module>.alpha` keys or from the
`lora_adapter_metadata` safetensors metadata (a LoraConfig dict per component, keys
`<component>.lora_alpha` …); without either, alpha = rank. The writer always writes the metadata
form, which `load_lora_weights` reads. Also reads the old attention-processor form
(`…attn1.processor.to_q_lora.down.weight`, `…lora_linear_layer.down.weight`, `…to_q.lora.down.weight`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Optional, Tuple

import torch

from .. import safetensors_io
from ..adapter import LoraAdapter, LoraModule
from ..archs import COMPONENTS, canonical, flat_clip
from ..errors import FormatError, IncompatibleError
from . import _single, peft
from .record import Format

WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHTS_BIN = "pytorch_lora_weights.bin"
META_KEY = "lora_adapter_metadata"
# new (PEFT) suffixes -> (role, kind)
SUFFIXES = {".lora_A.weight": ("down", None), ".lora_B.weight": ("up", None),
            ".lora_embedding_A": ("down", "embedding"), ".lora_embedding_B": ("up", "embedding"),
            ".lora_magnitude_vector": ("magnitude", None), ".lora_magnitude_vector.weight": ("magnitude", None),
            ".alpha": ("alpha", None),
            # old forms
            ".lora_linear_layer.down.weight": ("down", None), ".lora_linear_layer.up.weight": ("up", None),
            ".lora.down.weight": ("down", None), ".lora.up.weight": ("up", None)}
# old attention processors: `<attn>.processor.to_q_lora.down.weight` (UNet) or `<attn>.to_q_lora…` (CLIP)
OLD_PROC = re.compile(r"^(?P<attn>.+?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _file(path: str) -> str:
    if os.path.isdir(path):
        for name in (WEIGHTS, WEIGHTS_BIN):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FormatError(f"{path}: no {WEIGHTS} in this folder")
    return path


def _split_component(key: str) -> Tuple[Optional[str], str]:
    comp, _, rest = key.partition(".")
    return (comp, rest) if comp in COMPONENTS and rest else (None, key)


def parse_key(key: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """`unet.x.lora_A.weight` -> ("unet.x", "down", None); None if the key is not a LoRA part."""
    comp, rest = _split_component(key)
    comp = comp or "unet"  # unprefixed old files (UNet.save_attn_procs) hold the UNet only
    m = OLD_PROC.match(rest)
    if m:
        proj = (UNET_PROJ if comp in ("unet", "transformer") else CLIP_PROJ)[m["proj"]]
        return canonical(f"{comp}.{m['attn']}.{proj}"), m["role"], None
    for suffix, (role, kind) in SUFFIXES.items():
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return canonical(f"{comp}.{rest[: -len(suffix)]}"), role, kind
    return None


def detect(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, WEIGHTS)) or os.path.isfile(os.path.join(path, WEIGHTS_BIN))
    keys = _single.peek_keys(path)
    if not keys:
        return False
    lora = [k for k in keys if ".lora_A." in k or ".lora_B." in k or "lora_linear_layer." in k
            or re.search(r"(_lora|\.lora)\.(down|up)\.weight$", k)]
    return bool(lora) and all(parse_key(k) for k in keys)


def _component_configs(metadata: Dict[str, str], path: str) -> Dict[str, dict]:
    raw = metadata.get(META_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):
        raise FormatError(f"{path}: {META_KEY} metadata is not JSON") from None
    out: Dict[str, dict] = {}
    for key, value in (flat.items() if isinstance(flat, dict) else []):
        comp, _, field = key.partition(".")
        out.setdefault(comp, {})[field] = value
    for comp, cfg in out.items():  # the same field checks as a PEFT adapter_config.json
        peft.check_config(cfg, f"{path}: {META_KEY} for {comp}")
    return out


def read(path: str) -> LoraAdapter:
    file = _file(path)
    tensors, metadata = _single.load(file)
    configs = _component_configs(metadata, file)
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    kinds: Dict[str, str] = {}
    bad = []
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            bad.append(key)
            continue
        module, role, kind = parsed
        if role in parts.setdefault(module, {}):
            raise FormatError(f"{file}: module {module} has two {role} tensors (old and new key forms)")
        parts[module][role] = t
        if kind:
            kinds[module] = kind
    if bad:
        raise FormatError(f"{file}: {len(bad)} key(s) that are no diffusers LoRA tensor: {', '.join(sorted(bad)[:8])}")
    flat = sorted({k.split(".", 1)[0] for k in tensors if canonical(k) != k})  # transformers >= 5 CLIP spelling
    adapter = LoraAdapter(format="diffusers", metadata=metadata, config={"components": configs, "flat_clip": flat})
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise FormatError(f"{file}: module {module} has no lora_{'A' if 'down' not in p else 'B'} tensor")
        comp, _, local = module.partition(".")
        cfg = configs.get(comp, {})
        if "alpha" in p:
            alpha = _single.scalar(p["alpha"], f"{file}: {module}.alpha")
        elif cfg:
            alpha = float(peft.pattern_value(cfg.get("alpha_pattern") or {}, local,
                                             cfg.get("lora_alpha", cfg.get("r", p["down"].shape[0]))))
        else:
            alpha = None  # diffusers' convention without alphas: scale 1
        kind = kinds.get(module) or ("conv" if p["down"].dim() == 4 else "linear")
        adapter.add(LoraModule(name=module, down=p["down"], up=p["up"], alpha=alpha, kind=kind,
                               use_rslora=bool(cfg.get("use_rslora", False)), magnitude=p.get("magnitude")))
    return adapter


def split_components(adapter: LoraAdapter, fmt: str) -> Dict[str, LoraAdapter]:
    """One PEFT adapter per pipeline component, module names without the component prefix."""
    if adapter.extra:
        raise IncompatibleError(f"{fmt} cannot hold full tensors ({', '.join(sorted(adapter.extra)[:4])}); "
                                "write peft instead")
    configs = adapter.config.get("components", {})
    flat = adapter.config.get("flat_clip", [])  # components read in transformers >= 5 spelling
    out: Dict[str, LoraAdapter] = {}
    for m in adapter:
        comp, local = _split_component(m.name)
        if comp is None:
            raise IncompatibleError(f"module {m.name}: {fmt} needs a pipeline component prefix "
                                    f"({', '.join(COMPONENTS)}); its modules are one model's: write peft, or first "
                                    "name the component with `loratools convert ADAPTER --component unet --to "
                                    f"{fmt}`")
        sub = out.setdefault(comp, LoraAdapter(format="peft", base_model=adapter.base_model,
                                               config=dict(configs.get(comp, {}))))
        if comp in flat:
            local = flat_clip(m.name).partition(".")[2]
        sub.add(dataclasses.replace(m, name=local))
    if not out:
        raise FormatError("the adapter has no LoRA modules to write")
    return out


def _flat_names(comp: str, sub: LoraAdapter) -> LoraAdapter:
    """CLIP names without `text_model.` for the LoraConfig: PEFT matches target_modules and pattern
    keys as name suffixes, so these match with and without the prefix (transformers 4 and 5);
    diffusers itself strips `text_model.` from the tensor keys when the model has none."""
    modules = {}
    for m in sub:
        local = flat_clip(f"{comp}.{m.name}").partition(".")[2]
        modules[local] = dataclasses.replace(m, name=local)
    return dataclasses.replace(sub, modules=modules)


def write(adapter: LoraAdapter, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    packed = {}
    tensors: Dict[str, torch.Tensor] = {}
    for comp, sub in split_components(adapter, "diffusers").items():
        cfg = peft.build_config(_flat_names(comp, sub))
        packed.update({f"{comp}.{k}": v for k, v in cfg.items()})
        for key, t in peft.state_dict(sub).items():
            tensors[f"{comp}.{key[len(peft.PREFIX):]}"] = t
    meta = {"format": "pt"}
    meta.update(metadata or {})
    meta[META_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    safetensors_io.save(path, tensors, meta)


FORMAT = Format("diffusers", detect, read, write, folder=False, files=((WEIGHTS, WEIGHTS_BIN),))
