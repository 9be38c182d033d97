"""kohya LoRAs for DiT families that sd-scripts trains on the original checkpoint (`archs.fused.Layout`):
Flux.1 (networks/lora_flux.py: `lora_unet_double_blocks_0_img_attn_qkv`, CLIP-L `lora_te1_`, T5 `lora_te3_`),
SD3/3.5 (networks/lora_sd3.py: `lora_unet_joint_blocks_0_x_block_attn_qkv`, CLIP-L / CLIP-G / T5 as
`lora_te1_` / `lora_te2_` / `lora_te3_`), Wan 2.x (musubi-tuner: `lora_unet_blocks_0_self_attn_q`) and Qwen-Image
(musubi-tuner: `lora_unet_transformer_blocks_0_img_mlp_net_0_proj`). The
transformer's LoRAs are split exactly onto the diffusers modules when read and fused back when written; the
text encoders resolve against the family's manifest (or the base). Also read: Flux transformers in diffusers'
names flattened (OneTrainer `lora_transformer_…` with T5 as `lora_te2_`, older ai-toolkit `lora_unet_…`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .. import safetensors_io
from ..adapter import LoraAdapter, LoraModule
from ..archs import NameMap, canonical, dit, qwen
from ..archs.family import QWEN, from_metadata
from ..archs.fused import COMPONENT, Layout
from ..errors import FormatError, IncompatibleError
from ._parts import build_module, lora_shape

UNET = "lora_unet_"


def layout_of(groups, metadata: Dict[str, str], shape_of=lora_shape) -> Optional[Layout]:
    """The family layout of a kohya file's `lora_unet_` names, or None (an SD 1.x/2.x/XL LoRA). `shape_of(group)`:
    the (rows, input width) a module's update has, or None (the widths tell FLUX.2's MLP from Flux.1's)."""
    originals = [ln[len(UNET):] for ln in groups if ln.startswith(UNET)]
    names, shapes = [], {}
    for lay in dit.LAYOUTS:
        for o in originals:
            name = lay.unflatten(o)
            if name:
                names.append(name)
                shapes[name] = shape_of(groups[UNET + o])
    found = dit.for_names(names, metadata, clip_g=any(ln.startswith("lora_te2_") for ln in groups),
                          shapes={n: s for n, s in shapes.items() if s})
    fam = from_metadata(metadata)
    if not originals and fam and fam[0] in dit.BY_FAMILY:  # text encoders only: the metadata names the family
        return dit.BY_FAMILY[fam[0]]
    # diffusers' names flattened (SD3's original `context_embedder` is also Flux's diffusers name): most names win
    flat = {lay: sum(1 for ln in groups if _flat_diffusers(lay, ln)) for lay in dit.LAYOUTS}
    best = max(dit.LAYOUTS, key=flat.get)
    count = sum(1 for n in names if found.lookup(n)) if found else 0
    if flat[best] > count:
        return best
    # Qwen-Image's original names are diffusers' own: attention alone on the first blocks is also Flux's
    # flattened (older ai-toolkit); the metadata tells, else Flux as before
    if found is qwen.LAYOUT and flat[best] == count and not (fam and fam[0] == QWEN):
        return best
    return found


def _flat_diffusers(layout: Layout, lora_name: str) -> List[str]:
    """The transformer modules of the layout's manifest a name under a transformer alias prefix (OneTrainer's
    `lora_transformer_`) flattens."""
    prefix = next((p for p, c in layout.kohya_read.items() if c == COMPONENT and lora_name.startswith(p)), None)
    return NameMap.from_manifest(layout.manifest).resolve(COMPONENT, lora_name[len(prefix):]) if prefix else []


def read_original(groups, layout: Layout, metadata, path, base, allow_unmatched, keep_unmatched,
                  build=build_module, nm: Optional[NameMap] = None) -> LoraAdapter:
    """A kohya LoRA of a DiT family: `lora_unet_<original name>` split onto the diffusers modules (exactly),
    the text encoders resolved from the family's manifest (or the base's names). `build(name, lora_name, parts,
    path)` makes one module of a file's tensors (LyCORIS files: `lycoris`)."""
    nm = nm or (NameMap.from_base(base) if base else NameMap.from_manifest(layout.manifest))
    adapter = LoraAdapter(format="kohya", metadata=metadata)
    keys, alpha_dtypes, unmatched = {}, {}, []
    for lora_name in sorted(groups):
        parts = groups[lora_name]
        original = layout.unflatten(lora_name[len(UNET):]) if lora_name.startswith(UNET) else None
        prefix = next((p for p in layout.kohya_read if lora_name.startswith(p)), None)
        hits = nm.resolve(layout.kohya_read[prefix], lora_name[len(prefix):]) if prefix else []
        if original:
            mods = layout.from_original(original, build(f"transformer.{original}", lora_name, parts, path))
        elif len(hits) == 1:
            mods = [build(hits[0], lora_name, parts, path)]
        else:
            unmatched.append(lora_name)
            if keep_unmatched:
                adapter.add(build(lora_name, lora_name, parts, path))
            continue
        for m in mods:
            adapter.add(m)
        keys[lora_name] = [m.name for m in mods]
        if "alpha" in parts:
            alpha_dtypes[lora_name] = safetensors_io.dtype_name(parts["alpha"].dtype)
    if unmatched and not (allow_unmatched or keep_unmatched):
        shown = ", ".join(unmatched[:8]) + (" …" if len(unmatched) > 8 else "")
        raise FormatError(f"{path}: {len(unmatched)} module name(s) of this {layout.family} LoRA match no module of "
                          f"{nm.source}: {shown} (`loratools inspect` shows them)")
    unresolved = sorted(unmatched)
    adapter.config = {"original_keys": keys, "alpha_dtypes": alpha_dtypes, "keys": {}, "dora_shapes": {},
                      "unmatched": [] if keep_unmatched else unresolved,
                      "unresolved": unresolved if keep_unmatched else [], "names_from": nm.source}
    return adapter


def write_layout(adapter: LoraAdapter) -> Optional[Layout]:
    """The layout a kohya file of this adapter names its transformer in (None: no DiT transformer module)."""
    layout = dit.for_adapter(adapter)
    return layout if layout is not None and any(_written_by(layout, m.name) for m in adapter) else None


def _written_by(layout: Layout, name: str) -> bool:
    """A transformer module of the layout, under its diffusers name or already on its original one (a fused
    projection `convert --fused-rank` refactored: an adapter of those only is still a DiT file)."""
    comp, _, local = name.partition(".")
    return layout.is_module(name) or (comp == COMPONENT and layout.lookup(local) is not None)


def original_items(adapter: LoraAdapter, layout: Layout) -> List[Tuple[str, LoraModule, Optional[str]]]:
    """(kohya name, module, alpha dtype) of a DiT adapter: transformer LoRAs fused onto the original names."""
    fused, rest = layout.to_original(list(adapter))
    dtypes = adapter.config.get("alpha_dtypes", {})
    items = []
    for original, m in fused.items():
        ln = UNET + original.replace(".", "_")
        items.append((ln, m, dtypes.get(ln)))
    back = {c: p for p, c in layout.kohya_te.items()}
    for m in rest:
        comp, _, local = canonical(m.name).partition(".")
        if comp == COMPONENT and layout.lookup(local):  # kept on its original module (a DoRA per input column)
            items.append((UNET + local.replace(".", "_"), m, dtypes.get(UNET + local.replace(".", "_"))))
            continue
        if comp == COMPONENT:
            raise layout.not_covered(m.name)
        if comp not in back or not local:
            encoders = f" and {', '.join(back)}" if back else ""
            raise IncompatibleError(f"module {m.name}: a kohya {layout.family} LoRA holds the transformer{encoders} "
                                    "only")
        ln = back[comp] + local.replace(".", "_")
        items.append((ln, m, dtypes.get(ln)))
    return items
