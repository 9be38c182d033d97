"""ComfyUI / original-names LoRA files: one file whose keys use the original checkpoint's module
names, as ComfyUI saves them and as ai-toolkit and BFL tools write Flux LoRAs:

    diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight / .lora_up.weight / .alpha     (Flux.1)
    diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight …                           (SD3/3.5)
    diffusion_model.single_blocks.3.linear1.lora_A.weight / .lora_B.weight     (also read)
    text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight
    text_encoders.clip_g.transformer.… (SD3)
    text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight

    diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight                     (Wan 2.x, renamed one to one)
    diffusion_model.transformer_blocks.0.img_mlp.net.0.proj.lora_down.weight    (Qwen-Image: diffusers' names;
    also unprefixed as Lightning LoRAs have them, and `lora_A.default.weight` as DiffSynth-Studio saves them)

The transformer's modules are split exactly onto the diffusers modules when read (`archs.fused`) and
fused back when written. `dora_scale` is read as kohya/LyCORIS store it ([1, in]: normed per input
column, as ComfyUI applies it; [out, 1]: per output row, which ComfyUI does not apply as LyCORIS does, so
it is not written here). `.diff`/`.diff_b` (full weight and bias deltas) are refused with the reason.
ComfyUI loads every key of this form; diffusers' Flux loader reads the transformer and CLIP-L keys (it drops
T5 ones with a log line), its Wan loader every Wan key (an `.alpha` only beside blocks' modules: writing
leaves out Wan's alphas of 1·rank unless they were read).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import safetensors_io
from ..adapter import LoraAdapter
from ..archs import canonical, dit, flux, sd3
from ..errors import FormatError, IncompatibleError
from . import _single
from ._parts import build_module, lora_shape
from .record import Format

DIFFUSION = "diffusion_model."
TEXT_PREFIXES = sorted({p for lay in dit.LAYOUTS for p in lay.text_encoders}, key=len, reverse=True)
CLIP_G = "text_encoders.clip_g.transformer."
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
         ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",  # PEFT's adapter name (DiffSynth-Studio)
         ".alpha": "alpha", ".dora_scale": "dora", ".diff": "diff", ".diff_b": "diff_b"}


def parse_key(key: str) -> Optional[Tuple[str, str, str]]:
    """(`transformer` or a text encoder's key prefix, module name after it, role) of a key, or None.
    The transformer's module names stay original (`double_blocks.0.img_attn.qkv`)."""
    suffix = next((s for s in ROLES if key.endswith(s)), None)
    if suffix is None:
        return None
    module, role = key[: -len(suffix)], ROLES[suffix]
    if role in ("diff", "diff_b") and module.startswith(DIFFUSION):  # any module (norms too): read() refuses them
        return "transformer", module[len(DIFFUSION):], role
    for prefix in TEXT_PREFIXES:
        if module.startswith(prefix) and len(module) > len(prefix):
            return prefix, module[len(prefix):], role
    local = module[len(DIFFUSION):] if module.startswith(DIFFUSION) else module  # also bare original names
    return ("transformer", local, role) if any(lay.lookup(local) for lay in dit.LAYOUTS) else None


def detect(path: str) -> bool:
    parsed = [parse_key(k) for k in _single.peek_keys(path) or ()]
    return bool(parsed) and all(parsed) and any(p[2] == "down" for p in parsed)


def _layout(groups, metadata):
    transformer = [local for kind, local in groups if kind == "transformer"]
    clip_g = any(kind == CLIP_G for kind, _ in groups)
    shapes = {local: lora_shape(groups[("transformer", local)]) for local in transformer}
    found = dit.for_names(transformer, metadata, clip_g=clip_g, shapes={n: s for n, s in shapes.items() if s})
    return found or (sd3.LAYOUT if clip_g else flux.LAYOUT)


def read(path: str) -> LoraAdapter:
    tensors, metadata = _single.load(path)
    groups: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    bad: List[str] = []
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            bad.append(key)
            continue
        kind, local, role = parsed
        parts = groups.setdefault((kind, local), {})
        if role in parts:
            raise FormatError(f"{path}: module {local} has two {role} tensors")
        parts[role] = t
    if bad:
        raise FormatError(f"{path}: {len(bad)} key(s) that are no original-names LoRA tensor: {', '.join(bad[:8])}")
    diffs = sorted(f"{local}.{r}" for (_, local), parts in groups.items() for r in parts if r.startswith("diff"))
    if diffs:
        raise IncompatibleError(f"{path}: {len(diffs)} full weight or bias delta(s) (.diff / .diff_b, e.g. {diffs[0]}) "
                                "that loratools does not carry (it reads LoRA factors only)")
    layout = _layout(groups, metadata)
    adapter = LoraAdapter(format="comfyui", metadata=metadata)
    alpha_dtypes = {}
    for (kind, local), parts in sorted(groups.items()):
        if kind == "transformer":
            if layout.lookup(local) is None:
                raise FormatError(f"{path}: {local} is no {layout.family} module, but the file's other modules are")
            comp = "transformer"
            mods = layout.from_original(local, build_module(f"transformer.{local}", local, parts, path))
        else:
            if kind not in layout.text_encoders:
                raise FormatError(f"{path}: {kind}… is no text encoder of {layout.family}")
            comp = layout.text_encoders[kind]
            mods = [build_module(canonical(f"{comp}.{local}"), local, parts, path)]
        for m in mods:
            adapter.add(m)
        if "alpha" in parts:
            alpha_dtypes[f"{comp}.{local}"] = safetensors_io.dtype_name(parts["alpha"].dtype)
    if not len(adapter):
        raise FormatError(f"{path}: no LoRA modules")
    # ai-toolkit's `lora_A` keys: diffusers' FLUX.2 loader reads those only (it drops `lora_down` ones)
    adapter.config = {"alpha_dtypes": alpha_dtypes, "lora_ab": any(".lora_A." in k for k in tensors)}
    return adapter


def state_dict(adapter: LoraAdapter) -> Dict[str, torch.Tensor]:
    if adapter.extra:
        raise IncompatibleError(f"original-names LoRA files cannot hold full tensors "
                                f"({', '.join(sorted(adapter.extra)[:4])}); write peft instead")
    layout = dit.for_adapter(adapter)
    if layout is None and any(m.name.startswith("transformer.") for m in adapter):
        other = flux.other_family(adapter) or "this transformer LoRA"
        raise IncompatibleError(f"{other}: loratools writes original names for Flux.1, FLUX.2, SD3/3.5, Wan 2.x and "
                                "Qwen-Image transformers only; write diffusers or peft")
    layout = layout or flux.LAYOUT
    fused, rest = layout.to_original(list(adapter))
    dtypes = adapter.config.get("alpha_dtypes", {})
    items = [(DIFFUSION + original, f"transformer.{original}", m) for original, m in fused.items()]
    back = {c: p for p, c in layout.text_encoders.items()}
    for m in rest:
        comp, _, local = canonical(m.name).partition(".")
        if comp == "transformer" and layout.lookup(local):  # kept on its original module (a DoRA per input column)
            items.append((DIFFUSION + local, m.name, m))
            continue
        if comp == "transformer":
            raise layout.not_covered(m.name)
        if comp not in back or not local:
            encoders = f" and its {', '.join(back.values())}" if back else ""
            raise IncompatibleError(f"module {m.name}: original-names files hold a {layout.family} transformer"
                                    f"{encoders} only; write diffusers or peft")
        items.append((back[comp] + local, m.name, m))
    out: Dict[str, torch.Tensor] = {}
    for key, name, m in items:
        if m.is_dora:
            raise IncompatibleError(f"module {m.name}: a DoRA magnitude per output row (PEFT, LyCORIS wd_on_output) "
                                    "is not applied by ComfyUI as by them (it norms W, not W + ΔW; older versions "
                                    "norm per input column): write kohya (LyCORIS) or peft, or merge it")
        if m.mid is not None or m.kind == "embedding" or m.fan_in_fan_out:
            raise IncompatibleError(f"module {m.name}: original-names files hold plain LoRA modules only")
        alpha = m.alpha_value * (m.rank ** 0.5) if m.use_rslora else m.alpha_value
        out[key + ".lora_down.weight"] = m.down.contiguous()
        out[key + ".lora_up.weight"] = m.up.contiguous()
        if not layout.implicit_alpha or name in dtypes or m.scale != 1.0:
            out[key + ".alpha"] = _single.alpha_tensor(alpha, None if m.use_rslora else dtypes.get(name),
                                                       m.down.dtype)
        if m.op is not None:  # a DoRA normed per input column, as ComfyUI applies it ([1, in])
            out[key + ".dora_scale"] = m.op.params["dora_scale"]
    return out


def write(adapter: LoraAdapter, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    if not len(adapter):
        raise FormatError("the adapter has no LoRA modules to write")
    meta = {k: v for k, v in adapter.metadata.items() if k != "lora_adapter_metadata"}
    meta.update(metadata or {})
    safetensors_io.save(path, state_dict(adapter), meta)


FORMAT = Format("comfyui", detect, read, write, folder=False)
