"""Which DiT family's original names (`archs.fused.Layout`: Flux.1, SD3/3.5, Wan 2.x, Qwen-Image, FLUX.2) a file
or an adapter uses.

Files tell by their names: `double_blocks` is Flux (Flux.1 or FLUX.2: the shared modulations, or else the MLP
widths, tell which; attention alone reads the same in both), `joint_blocks` SD3, `blocks` Wan, `transformer_blocks`
Qwen-Image (whose `img_in` / `txt_in` are also Flux names: most names win); only the final layer's
names are shared between Flux and SD3 (and mean the same modules in both). Where the names do not tell,
the metadata's family does, then SD3's CLIP-G text encoder; else Flux, the common case. Adapters in diffusers
names tell by their family (metadata, names, a real model's widths), else by which table has every transformer
module.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from .family import adapter_family, from_metadata
from .fused import COMPONENT, Layout
from . import flux, flux2, qwen, sd3, wan

LAYOUTS = (flux.LAYOUT, sd3.LAYOUT, wan.LAYOUT, qwen.LAYOUT, flux2.LAYOUT)
# single files: FLUX.2's marker (a shared modulation) is no Flux.1 weight, Flux.1's (double_blocks.0's qkv) is both's
_CHECKPOINT_ORDER = (flux2.LAYOUT,) + LAYOUTS[:-1]
BY_FAMILY = {layout.family: layout for layout in LAYOUTS}


def for_names(originals: Iterable[str], metadata: Dict[str, str], clip_g: bool = False,
              shapes: Optional[Dict[str, Tuple[int, int]]] = None) -> Optional[Layout]:
    """The layout of a file whose transformer modules have these original names (None: no layout has any).
    `clip_g`: the file has LoRAs on a CLIP-G text encoder (kohya `lora_te2_`, `text_encoders.clip_g.…`);
    `shapes`: original name -> (rows, input width) of its LoRA (Flux.1 and FLUX.2 share names, not widths)."""
    names = list(originals)
    counts = [sum(1 for n in names if layout.lookup(n)) for layout in LAYOUTS]
    if not any(counts):
        return None
    best = max(counts)
    hits = [layout for layout, c in zip(LAYOUTS, counts) if c == best]
    fitting = [lay for lay in hits if all(lay.fits(n, *s) for n, s in (shapes or {}).items() if lay.lookup(n))]
    hits = fitting or hits
    if len(hits) == 1:
        return hits[0]
    fam = from_metadata(metadata)
    if fam and fam[0] in BY_FAMILY:
        return BY_FAMILY[fam[0]]
    return sd3.LAYOUT if clip_g and sd3.LAYOUT in hits else hits[0]


def for_adapter(adapter) -> Optional[Layout]:
    """The layout to write an adapter's transformer modules in (None: no transformer module, or a family
    with no original-names table)."""
    mods = [m for m in adapter if m.name.partition(".")[0] == COMPONENT]
    local = [m.name.partition(".")[2] for m in mods]
    if not local:
        return None
    fam = adapter_family(adapter)
    if fam:
        return BY_FAMILY.get(fam[0])
    if any(m.name.endswith(".norm1_context.linear") and m.up.shape[0] == 2 * m.down.shape[1] for m in mods):
        return sd3.LAYOUT  # SD3's pre-only last block (Flux's context adaLN always has 6 chunks)
    comps = {m.name.partition(".")[0] for m in adapter} - {COMPONENT}  # Flux has no text_encoder_3
    return next((lay for lay in LAYOUTS if comps <= set(lay.text_encoders.values())
                 and all(lay.original_of(n) or lay.lookup(n) for n in local)), None)


def for_checkpoint(keys) -> Optional[Layout]:
    """The layout of a single-file checkpoint (its transformer's marker weight), or None."""
    keys = set(keys)
    return next((lay for lay in _CHECKPOINT_ORDER if lay.checkpoint_prefix(keys) is not None), None)


def kept_original(name: str) -> bool:
    """A module still under an original name no diffusers module has (`transformer.joint_blocks.0.x_block.attn.qkv`:
    a LoRA that cannot be split, kept as read)."""
    comp, _, local = name.partition(".")
    return comp == COMPONENT and any(lay.lookup(local) and not lay.original_of(local) for lay in LAYOUTS)
