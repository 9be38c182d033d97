"""Qwen-Image transformer module names in the layouts its LoRAs come in.

Qwen's own checkpoints, diffusers, ComfyUI, DiffSynth-Studio, ai-toolkit and musubi-tuner all name the
transformer's modules alike (`transformer_blocks.N.attn.to_q`, `img_mod.1`, `img_mlp.net.0.proj`, `txt_mlp.net.2`,
`img_in`, `proj_out` …) and none fuses projections, so every layout is a rename of the same modules:
`transformer.` (diffusers / PEFT), `diffusion_model.` (ComfyUI, DiffSynth), no prefix (Lightning LoRAs),
`lora_unet_` with dots as `_` (kohya / musubi-tuner, resolved through the manifest's names, never by splitting).
`img_in` and `txt_in` are also Flux's original names: a file is read as Qwen-Image when it holds a module only
Qwen-Image has (its blocks, `proj_out`, `norm_out.linear`, `time_text_embed.…`).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, FrozenSet, Iterable, Optional

from ..errors import IncompatibleError
from . import NameMap, base_modules, load_manifest
from .family import QWEN, adapter_family, from_metadata

ARCH = "qwen-image"
COMPONENT = "transformer"
KOHYA_PREFIX = "lora_unet_"
# single-file checkpoints: bare (Comfy-Org, diffusers' from_single_file) or as ComfyUI saves them
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "")


@functools.lru_cache(maxsize=None)
def _names() -> FrozenSet[str]:
    return frozenset(load_manifest(ARCH)["components"][COMPONENT])


def is_name(local: str) -> bool:
    """A Qwen-Image transformer module name (without the component prefix)."""
    return local in _names()


def is_layout(locals_: Iterable[str], flux_lookup) -> bool:
    """True when the transformer names of a file are Qwen-Image's: one of them only Qwen-Image has
    (`flux_lookup(name)` is truthy for Flux's original names)."""
    return any(is_name(n) and not flux_lookup(n) for n in locals_)


def checkpoint_prefix(keys) -> Optional[str]:
    """The transformer's key prefix in a single-file Qwen-Image checkpoint, or None if it is not one."""
    keys = set(keys)
    return next((p for p in CHECKPOINT_PREFIXES if f"{p}transformer_blocks.0.img_mod.1.weight" in keys), None)


@functools.lru_cache(maxsize=None)
def _flat() -> FrozenSet[str]:
    return frozenset(n.replace(".", "_") for n in _names())


@functools.lru_cache(maxsize=None)
def _flat_qwen_only() -> FrozenSet[str]:
    """Flattened Qwen-Image names that no Flux.1 module has flattened (diffusers' names or BFL's)."""
    flux = load_manifest("flux")
    names = set(flux["components"][COMPONENT]) | set(flux.get("original", {}).get(COMPONENT, {}))
    return _flat() - {n.replace(".", "_") for n in names}


def is_kohya(lora_names: Iterable[str], metadata: Optional[Dict[str, str]] = None) -> bool:
    """kohya / musubi-tuner names of Qwen-Image (`lora_unet_transformer_blocks_0_img_mlp_net_0_proj`): one is a
    module only Qwen-Image has (older ai-toolkit flattens Flux's diffusers names alike, attention included),
    or the metadata says Qwen-Image and one is a Qwen-Image name."""
    flats = [n[len(KOHYA_PREFIX):] for n in lora_names if n.startswith(KOHYA_PREFIX)]
    if any(f in _flat_qwen_only() for f in flats):
        return True
    fam = from_metadata(metadata or {})
    return fam is not None and fam[0] == QWEN and any(f in _flat() for f in flats)


def kohya_map(base: Optional[str] = None) -> NameMap:
    """Resolves `lora_unet_<flattened name>` to `transformer.<name>`: from the base's transformer when
    given (a pipeline or transformer folder), else from the shipped manifest (also for a GGUF model's names)."""
    if isinstance(base, (str, os.PathLike)):
        modules, _ = base_modules(base)
        source = f"base {base}"
    else:
        modules = {f"{COMPONENT}.{n}": tuple(s) for n, s in load_manifest(ARCH)["components"][COMPONENT].items()}
        source = f"the {ARCH} manifest"
    prefix = COMPONENT + "."
    aliases = {"unet." + n[len(prefix):]: n for n in modules if n.startswith(prefix)}
    return NameMap(source, modules, aliases)


def is_qwen(adapter) -> bool:
    """The adapter is a Qwen-Image one (its metadata, names or shapes say so)."""
    fam = adapter_family(adapter)
    return fam is not None and fam[0] == QWEN


def transformer_only(adapter, target: str) -> bool:
    """True for a Qwen-Image adapter, whose modules must then all be the transformer's: `target` files
    (kohya, ComfyUI) name only that, so a Qwen2.5-VL text-encoder module is refused."""
    if not is_qwen(adapter):
        return False
    for m in adapter:
        comp, _, local = m.name.partition(".")
        if comp != COMPONENT or not local:
            raise IncompatibleError(f"module {m.name}: {target} Qwen-Image LoRA files hold the transformer only; "
                                    "write diffusers or peft_diffusion")
    return True
