"""Fuse a DiT adapter's split transformer LoRAs onto their original modules before an operation whose output
is written in original names (kohya, ComfyUI), so the operation acts on the fused ΔW.

A file in original names holds one LoRA per fused projection (Flux's `img_attn.qkv`, SD3's `attn.qkv`). Resizing
or blending the diffusers parts one by one leaves them with different A's, which only fuse back at the sum of
their ranks (block-diagonal B); fused first, the operation's rank is the fused module's rank. The fusion itself
is exact (`archs.fused.fuse`); modules of one part (renames) are left as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from .adapter import LoraAdapter, LoraModule
from .archs import dit
from .archs.fused import COMPONENT, Layout

ORIGINAL_FORMATS = ("kohya", "comfyui")  # the writers that fuse transformer parts onto original names
# the families with original modules of several diffusers parts (Flux.1, SD3/3.5, FLUX.2: qkv, Flux.1's linear1)
FUSING_FAMILIES = tuple(lay.family for lay in dit.LAYOUTS
                        if any(len(p) > 1 for *_, table in lay.blocks for p in table.values()))

Groups = Dict[str, Tuple[LoraModule, List[str]]]


def original_layout(adapter: LoraAdapter, fmt: str) -> Optional[Layout]:
    """The family layout whose original names `fmt` would write the adapter's transformer in (None: not an
    original-names format, or no DiT transformer module)."""
    return dit.for_adapter(adapter) if fmt in ORIGINAL_FORMATS else None


def fused_groups(adapter: LoraAdapter, layout: Layout) -> Groups:
    """{`transformer.<original>`: (the exact fused LoRA, the names of the parts it replaces)} for every original
    module that holds several diffusers parts, as the writer would fuse them."""
    parts: Dict[str, List[str]] = {}
    for m in adapter:
        comp, _, local = m.name.partition(".")
        found = layout.original_of(local) if comp == COMPONENT else None
        if found is not None and len(found[0].parts) > 1:
            parts.setdefault(f"{COMPONENT}.{found[0].original}", []).append(m.name)
    fused, _ = layout.to_original([adapter.modules[n] for names in parts.values() for n in names])
    return {m.name: (m, parts[m.name]) for m in fused.values()}


def replace_groups(adapter: LoraAdapter, groups: Groups) -> LoraAdapter:
    """The adapter with each group's parts replaced by its one module, where its first part was."""
    first_part = {names[0]: m for m, names in groups.values()}
    dropped = {n for _, names in groups.values() for n in names}
    modules: Dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        if name in first_part:
            modules[first_part[name].name] = first_part[name]
        elif name not in dropped:
            modules[name] = m
    return dataclasses.replace(adapter, modules=modules)


def fuse_for_format(adapter: LoraAdapter, fmt: str) -> LoraAdapter:
    """The adapter with its split transformer LoRAs fused onto their original modules when `fmt` writes
    original names, else unchanged."""
    layout = original_layout(adapter, fmt)
    if layout is None:
        return adapter
    groups = fused_groups(adapter, layout)
    return replace_groups(adapter, groups) if groups else adapter
