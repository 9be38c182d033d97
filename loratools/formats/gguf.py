"""llama.cpp LoRA adapters (`.gguf`): `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, tensors `blk.N.attn_q.weight.lora_a` [r, in] / `.lora_b` [out, r] named
and laid out as llama.cpp names the base weights (see archs/gguf_names.py).

llama.cpp scales every module by one `alpha / rank` (alpha 0: by 1). Modules whose own scale
differs (rank/alpha patterns, rsLoRA) get the ratio folded into B, in fp32, so each update is
exact. Token embeddings store lora_a transposed ([vocab, r]), as llama.cpp's converter does.
We also write the head and layer counts, so our files can be read back without the base.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import torch

from ..adapter import LoraAdapter, LoraModule, common_alpha
from ..archs.gguf_names import GgufArch, from_gguf_module, to_gguf_module
from ..errors import FormatError, IncompatibleError, UsageError
from ..checkpoint import model_path
from ..gguf_io import from_torch, is_gguf, metadata, new_writer, open_reader, to_torch
from .record import Format

SUFFIXES = (".lora_a", ".lora_b")
_EMBED = "token_embd"


def detect(path: str) -> bool:
    return os.path.isfile(path) and is_gguf(path)


def base_arch(base) -> GgufArch:
    """GgufArch from a base: a GGUF model file, a model folder, or its config.json."""
    if isinstance(base, GgufArch):
        return base
    path = model_path(base)  # also a Hub reference
    if os.path.isfile(path) and is_gguf(path):
        reader = open_reader(path)
        return GgufArch.from_metadata(metadata(reader), {t.name for t in reader.tensors})
    return GgufArch.from_config_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)


def read(path: str, base=None) -> LoraAdapter:
    reader = open_reader(path)
    kv = metadata(reader)
    if kv.get("general.type") != "adapter":
        raise FormatError(f"{path}: a GGUF model (general.type {kv.get('general.type')!r}), not a LoRA adapter; "
                          "merge adapters into it with `loratools merge`")
    if kv.get("adapter.type") != "lora":
        raise FormatError(f"{path}: GGUF adapter of type {kv.get('adapter.type')!r}; only LoRA is supported")
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    extra: Dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        stem, suffix = os.path.splitext(t.name)
        if suffix in SUFFIXES:
            pairs.setdefault(stem, {})[suffix] = to_torch(t)
        elif t.name.endswith("_norm.weight"):  # mergekit adds norms; llama.cpp ignores them (kept for round trips)
            extra[t.name] = to_torch(t)
        else:
            raise FormatError(f"{path}: tensor {t.name} is neither .lora_a nor .lora_b")
    arch = _arch_for(path, kv, base, pairs)
    alpha = float(kv.get("adapter.lora.alpha", 0.0) or 0.0)
    reverse = {v: k for k, v in arch.name_map().items()}
    # the architecture rides along, so a GGUF adapter can be written back (resize, blend) without --base
    adapter = LoraAdapter(format="gguf", config={"gguf_arch": dataclasses.asdict(arch), "alpha": alpha})
    for stem, ab in pairs.items():
        if set(ab) != set(SUFFIXES):
            raise FormatError(f"{path}: {stem} has only {next(iter(ab))} (lora_a and lora_b come in pairs)")
        a, b = ab[".lora_a"], ab[".lora_b"]
        embedding = stem.startswith(_EMBED + ".")
        down = a.t() if embedding else a
        rank = int(b.shape[1]) if b.dim() == 2 else 0
        # token_embd: ΔE [vocab, dim] = (B @ A)^T with A stored transposed, i.e. PEFT's embedding layout
        gm = LoraModule(stem[: -len(".weight")], down, b, alpha=alpha if alpha else float(rank),
                        kind="embedding" if embedding else "linear")
        adapter.add(from_gguf_module(gm, arch, reverse))
    for name, t in extra.items():
        hf = reverse.get(name)
        adapter.extra[(hf or name[: -len(".weight")]) + ".weight"] = t
    return adapter


def _arch_for(path: str, kv: dict, base, pairs) -> GgufArch:
    arch_name = str(kv.get("general.architecture", ""))
    if base is not None:
        arch = base_arch(base)
        if arch.arch != arch_name:
            raise IncompatibleError(f"{path}: an adapter for {arch_name!r} models, but the base is {arch.arch!r}")
        return arch
    if f"{arch_name}.block_count" in kv and f"{arch_name}.attention.head_count" in kv:
        return GgufArch.from_metadata(kv)
    layers = [int(s.split(".")[1]) for s in pairs if s.startswith("blk.") and s.split(".")[1].isdigit()]
    arch = GgufArch(arch_name, max(layers, default=-1) + 1, 1, 1)
    if arch.permutes and any(".attn_q." in s or ".attn_k." in s for s in pairs):
        raise UsageError(f"{path}: a {arch_name} adapter on q/k without head counts; give the base model "
                         "(--base MODEL or its config.json) to undo llama.cpp's RoPE row order")
    return arch


def write(adapter: LoraAdapter, path: str, metadata: Optional[Dict[str, str]] = None, base=None) -> None:
    known = adapter.config.get("gguf_arch")
    if base is None and isinstance(known, dict) and known.get("n_head", 1) > 1:
        base = GgufArch(**known)
    if base is None:
        raise UsageError("writing a GGUF adapter needs the base model (--base MODEL, its config.json or a "
                         "GGUF model) for llama.cpp's architecture, tensor names and head counts")
    arch = base_arch(base)
    if adapter.extra:
        raise IncompatibleError(f"llama.cpp adapters hold LoRA pairs only; full tensors such as "
                                f"{next(iter(adapter.extra))} (modules_to_save) cannot be applied by llama.cpp")
    modules = [_check(m) for m in adapter]
    if not modules:
        raise FormatError("the adapter has no modules to write")
    alpha = common_alpha(modules)
    writer = new_writer(path, arch.arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_uint32(f"{arch.arch}.block_count", arch.n_layers)
    writer.add_uint32(f"{arch.arch}.attention.head_count", arch.n_head)
    writer.add_uint32(f"{arch.arch}.attention.head_count_kv", arch.n_head_kv)
    for key, value in (metadata or {}).items():
        writer.add_string(f"loratools.{key}", str(value))
    for m in modules:
        g = to_gguf_module(m, arch)
        up = g.up
        fold = m.scale * m.rank / alpha
        if fold != 1.0:  # llama.cpp applies alpha / rank: the rest of this module's scale goes into B
            up = up.to(torch.float32) * fold
        a = g.down.t() if m.kind == "embedding" else g.down
        for suffix, t in ((".lora_a", a), (".lora_b", up)):
            array, raw = from_torch(t)
            writer.add_tensor(f"{g.name}.weight{suffix}", array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check(m: LoraModule) -> LoraModule:
    why = None
    if m.is_dora:
        why = "DoRA (its magnitude renormalises rows; llama.cpp only adds B·A)"
    elif m.kind == "conv" or m.mid is not None:
        why = "a convolution"
    elif m.fan_in_fan_out:
        why = "a transposed (fan_in_fan_out) weight"
    if why:
        raise IncompatibleError(f"module {m.name}: llama.cpp cannot apply {why}; merge it into the base "
                                "(`loratools merge`) instead")
    return m


FORMAT = Format("gguf", detect, read, write, folder=False, suffix=".gguf", options=("base",),
                write_options=("base",))
