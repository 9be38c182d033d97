"""ComfyUI / original-names LoRA files: one file whose keys use the original checkpoint's module
names, as ComfyUI saves them and as ai-toolkit and BFL tools write Flux LoRAs:

    diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight / .lora_up.weight / .alpha
    diffusion_model.single_blocks.3.linear1.lora_A.weight / .lora_B.weight     (also read)
    text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight
    text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight

    diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight                  (Wan 2.x, `archs.wan`)

Flux's transformer modules are split exactly onto the diffusers modules when read (`archs.flux`)
and fused back when written; Wan's are renamed one to one. ComfyUI loads every key of this form;
diffusers' Flux loader reads the transformer and CLIP-L keys (it drops T5 ones with a log line), its
Wan loader every Wan key (an `.alpha` only beside blocks' modules: writing leaves out alphas of 1·rank).
Qwen-Image's original names are diffusers' (`diffusion_model.transformer_blocks.0.img_mlp.net.0.proj`, also
unprefixed as Lightning LoRAs have them, and PEFT's `lora_A.default.weight` as DiffSynth-Studio saves them).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import safetensors_io
from ..adapter import LoraAdapter, LoraModule
from ..archs import canonical, flux, qwen, wan
from ..errors import FormatError, IncompatibleError
from . import _single
from .record import Format

DIFFUSION = "diffusion_model."
TEXT_ENCODERS = flux.TEXT_ENCODERS
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
         ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".alpha": "alpha", ".dora_scale": "dora",
         ".diff": "diff", ".diff_b": "diff_b"}


def parse_key(key: str) -> Optional[Tuple[str, str, str]]:
    """(component, module name inside it, role) of a key, or None. The transformer's module names
    stay original (`double_blocks.0.img_attn.qkv`)."""
    role = next((r for suffix, r in ROLES.items() if key.endswith(suffix)), None)
    if role is None:
        return None
    module = key[: -len(next(s for s in ROLES if key.endswith(s)))]
    if module.startswith(DIFFUSION):
        local = module[len(DIFFUSION):]
        if role in ("diff", "diff_b"):  # any module (norms too): read() refuses them with the reason
            return "transformer", local, role
        known = flux.lookup(local) or wan.to_diffusers(local) or qwen.is_name(local)
        return ("transformer", local, role) if known else None
    for prefix, comp in TEXT_ENCODERS.items():
        if module.startswith(prefix) and len(module) > len(prefix):
            return comp, module[len(prefix):], role
    return ("transformer", module, role) if flux.lookup(module) or qwen.is_name(module) else None  # bare names


def detect(path: str) -> bool:
    parsed = [parse_key(k) for k in _single.peek_keys(path) or ()]
    return bool(parsed) and all(parsed) and any(p[2] == "down" for p in parsed)


def read(path: str) -> LoraAdapter:
    tensors, metadata = _single.load(path)
    groups: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    bad: List[str] = []
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            bad.append(key)
            continue
        comp, local, role = parsed
        parts = groups.setdefault((comp, local), {})
        if role in parts:
            raise FormatError(f"{path}: module {local} has two {role} tensors")
        parts[role] = t
    if bad:
        raise FormatError(f"{path}: {len(bad)} key(s) that are no original-names LoRA tensor: {', '.join(bad[:8])}")
    diffs = sorted(f"{local}.{r}" for (_, local), parts in groups.items() for r in parts if r.startswith("diff"))
    if diffs:
        raise IncompatibleError(f"{path}: {len(diffs)} full weight or bias delta(s) (.diff / .diff_b, e.g. {diffs[0]}) "
                                "that loratools does not carry (it reads LoRA factors only)")
    adapter = LoraAdapter(format="comfyui", metadata=metadata)
    alpha_dtypes = {}
    as_qwen = qwen.is_layout((local for comp, local in groups if comp == "transformer"), flux.lookup)
    for (comp, local), parts in sorted(groups.items()):
        for role in ("down", "up"):
            if role not in parts:
                raise FormatError(f"{path}: module {local} has no {role} tensor")
        if "dora" in parts:
            raise IncompatibleError(f"{path}: {local} has a dora_scale; DoRA in original-names files is not read")
        alpha = _single.scalar(parts["alpha"], f"{path}: {local}.alpha") if "alpha" in parts else None
        down, up = parts["down"], parts["up"]
        kind = "conv" if down.dim() == 4 else "linear"
        akey = f"{comp}.{local}"
        if comp == "transformer" and as_qwen and qwen.is_name(local):  # Qwen-Image: its diffusers names
            mods = [LoraModule(f"transformer.{local}", down, up, alpha or None, kind)]
        elif comp == "transformer" and wan.to_diffusers(local):  # keyed like kohya's: kept across the two
            mods = [LoraModule(f"transformer.{wan.to_diffusers(local)}", down, up, alpha or None, kind)]
            akey = mods[0].name
        elif comp == "transformer":
            mods = flux.from_original(local, LoraModule(f"transformer.{local}", down, up, alpha or None, kind))
        else:
            mods = [LoraModule(canonical(f"{comp}.{local}"), down, up, alpha or None, kind)]
        for m in mods:
            adapter.add(m)
        if "alpha" in parts:
            alpha_dtypes[akey] = safetensors_io.dtype_name(parts["alpha"].dtype)
    if not len(adapter):
        raise FormatError(f"{path}: no LoRA modules")
    adapter.config = {"alpha_dtypes": alpha_dtypes}
    return adapter


def state_dict(adapter: LoraAdapter) -> Dict[str, torch.Tensor]:
    if adapter.extra:
        raise IncompatibleError(f"original-names LoRA files cannot hold full tensors "
                                f"({', '.join(sorted(adapter.extra)[:4])}); write peft instead")
    dtypes = adapter.config.get("alpha_dtypes", {})
    if wan.is_wan(adapter):
        return _plain(((DIFFUSION + o, m.name, m) for o, m in wan.originals(adapter)), dtypes)
    if qwen.transformer_only(adapter, "ComfyUI"):  # Qwen-Image's original names are its diffusers names
        return _plain(((DIFFUSION + m.name.partition(".")[2], m.name, m) for m in adapter), dtypes, always_alpha=True)
    other = flux.other_family(adapter)
    if other:
        raise IncompatibleError(f"{other}: loratools writes original names for Flux.1, Wan and Qwen-Image "
                                "transformers only; write diffusers or peft")
    fused, rest = flux.to_original(list(adapter))
    items = [(DIFFUSION + original, f"transformer.{original}", m) for original, m in fused.items()]
    back = {c: p for p, c in TEXT_ENCODERS.items()}
    for m in rest:
        comp, _, local = canonical(m.name).partition(".")
        if comp not in back or not local:
            raise IncompatibleError(f"module {m.name}: original-names files hold a Flux transformer and its "
                                    "text_encoder (CLIP-L) / text_encoder_2 (T5) only; write diffusers or peft")
        items.append((back[comp] + local, m.name, m))
    return _plain(items, dtypes, always_alpha=True)


def _plain(items, dtypes: Dict[str, str], always_alpha: bool = False) -> Dict[str, torch.Tensor]:
    """Keys of (key, name, module) items. Without `always_alpha`, an alpha of 1·rank is left out unless
    one was read (diffusers' Wan loader takes no `.alpha` beside the embedders and the head)."""
    out: Dict[str, torch.Tensor] = {}
    for key, name, m in items:
        if m.is_dora or m.mid is not None or m.kind == "embedding" or m.fan_in_fan_out:
            raise IncompatibleError(f"module {m.name}: original-names files hold plain LoRA modules only")
        alpha = m.alpha_value * (m.rank ** 0.5) if m.use_rslora else m.alpha_value
        out[key + ".lora_down.weight"] = m.down.contiguous()
        out[key + ".lora_up.weight"] = m.up.contiguous()
        if always_alpha or name in dtypes or m.scale != 1.0:
            out[key + ".alpha"] = _single.alpha_tensor(alpha, None if m.use_rslora else dtypes.get(name),
                                                       m.down.dtype)
    return out


def write(adapter: LoraAdapter, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    if not len(adapter):
        raise FormatError("the adapter has no LoRA modules to write")
    meta = {k: v for k, v in adapter.metadata.items() if k != "lora_adapter_metadata"}
    meta.update(metadata or {})
    safetensors_io.save(path, state_dict(adapter), meta)


FORMAT = Format("comfyui", detect, read, write, folder=False)
