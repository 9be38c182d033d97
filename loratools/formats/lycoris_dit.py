"""The module names of LyCORIS files (LoKr, LoHa, full/diff, IA³, OFT …) for the DiT families (`archs.dit`:
Flux.1, SD3/3.5, Wan 2.x, Qwen-Image), as the trainers write them:

    lora_unet_double_blocks_0_img_attn_qkv.lokr_w1        kohya names of the original checkpoint (LyCORIS' kohya
                                                           wrapper in sd-scripts / musubi-tuner), fused q, k, v
    lycoris_transformer_blocks_0_attn_to_q.lokr_w1        LyCORIS wrapping the diffusers transformer (SimpleTuner):
                                                           its module paths with `.` flattened to `_` (also an SD
                                                           UNet's: `lycoris_down_blocks_1_attentions_0_…`)
    diffusion_model.transformer_blocks.0.attn.to_q.lokr_w1   dotted paths (ai-toolkit; also `transformer.` or bare),
    diffusion_model.double_blocks.0.img_attn.qkv.hada_w1_a   in diffusers or original names

Text encoders: kohya's `lora_te1_` … `lora_te3_`, or ComfyUI's `text_encoders.clip_l.transformer.…` (made kohya names).
kohya names go to `kohya_dit` as they are; dotted original names become kohya names; `lycoris_` and dotted
diffusers names resolve against the family manifests (or the base) to `transformer.…` modules directly.
`lycoris` builds each module (a LoHa/LoKr factored exactly into LoRA); one on a fused original module (Flux's
qkv and linear1, SD3's qkv) is then split by rows onto the diffusers parts, which is exact: row slices of B of an
exact factorization. Transforms of the base weight (IA³, OFT, full …) stay on the fused module.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch

from ..archs import ARCHS, NameMap, dit, split_kohya
from ..archs.family import from_metadata
from ..archs.fused import COMPONENT
from ..errors import FormatError
from .kohya_dit import UNET

PREFIX = "lycoris_"  # LyCORIS' own prefix (LycorisNetwork.LORA_PREFIX) when it wraps a model
# ComfyUI's text-encoder prefixes -> kohya's: clip_l `lora_te1_`, clip_g `lora_te2_`, t5xxl `lora_te3_` (Flux, SD3)
TE_KOHYA = {p: k for lay in dit.LAYOUTS for p, comp in lay.text_encoders.items()
            for k, c in lay.kohya_te.items() if c == comp}
DOTTED = ("model.diffusion_model.", "diffusion_model.", f"{COMPONENT}.")

Groups = Dict[str, Dict[str, torch.Tensor]]


def group(tensors: Dict[str, torch.Tensor], known) -> Tuple[Groups, List[str]]:
    """module name -> {LyCORIS part: tensor} (the longest part name that ends a key wins: `lora_down.weight`
    before IA³'s `weight`); and the keys that end in no part name."""
    parts = sorted(known, key=len, reverse=True)
    groups: Groups = {}
    unknown = []
    for key, t in tensors.items():
        part = next((p for p in parts if key.endswith("." + p) and len(key) > len(p) + 1), None)
        if part is None:
            unknown.append(key)
        else:
            groups.setdefault(key[: -len(part) - 1], {})[part] = t
    return groups, unknown


def is_own(name: str) -> bool:
    """A name this module resolves (LyCORIS' flattened paths, module paths: `proj_out` bare too), not a kohya one."""
    return name.startswith(PREFIX) or split_kohya(name)[0] is None


def _local(name: str) -> str:
    prefix = next((p for p in DOTTED if name.startswith(p)), "")
    return name[len(prefix):]


def _maps(base: Optional[str], metadata: Dict[str, str]) -> List[NameMap]:
    """The name lists to resolve against: the base's, else the families' manifests (the metadata's first)."""
    if base:
        return [NameMap.from_base(base)]
    fam = from_metadata(metadata)
    first = dit.BY_FAMILY.get(fam[0]) if fam else None
    layouts = ([first] if first else []) + [lay for lay in dit.LAYOUTS if lay is not first]
    return [NameMap.from_manifest(lay.manifest) for lay in layouts] + [NameMap.from_manifest(a) for a in ARCHS]


def _diffusers_name(nm: NameMap, name: str) -> Optional[str]:
    if name.startswith(PREFIX):  # a wrapped transformer, or an SD UNet (SimpleTuner's SD 1.x/XL LyCORIS)
        hits = [h for comp in (COMPONENT, "unet") for h in nm.resolve(comp, name[len(PREFIX):])]
        return hits[0] if len(hits) == 1 else None
    full = f"{COMPONENT}.{_local(name)}"
    return full if full in nm.shapes else None


def rename(groups: Groups, metadata: Dict[str, str], base: Optional[str]
           ) -> Tuple[Groups, Dict[str, str], List[str], Optional[NameMap]]:
    """(kohya-named groups, {name: diffusers module} of the others, the names neither resolves, the name list used).
    Dotted names are original ones (made kohya names) when some of them is no diffusers module but an original one."""
    te = {n: next((p for p in TE_KOHYA if n.startswith(p)), None) for n in groups}
    kohya = {TE_KOHYA[p] + n[len(p):].replace(".", "_"): groups[n] for n, p in te.items() if p}  # as kohya names them
    own = [n for n in groups if is_own(n) and not te[n]]
    kohya.update({n: p for n, p in groups.items() if not is_own(n)})
    if not own:
        return kohya, {}, [], None
    maps = _maps(base, metadata)
    scores = [sum(1 for n in own if _diffusers_name(nm, n)) for nm in maps]
    nm = maps[scores.index(max(scores))]
    hits = {n: _diffusers_name(nm, n) for n in own}
    dotted = [n for n in own if not n.startswith(PREFIX)]
    originals = [n for n in dotted if not hits[n] and any(lay.lookup(_local(n)) for lay in dit.LAYOUTS)]
    direct, unmatched = {}, []
    for n in own:
        if originals and n in dotted:
            ln = UNET + _local(n).replace(".", "_")
            if ln in kohya:  # one module under its kohya and its dotted name: which one to keep is no guess
                raise FormatError(f"module {ln} appears twice (also as {n}): "
                                  "the file is inconsistent; keep one of them")
            kohya[ln] = groups[n]
            continue
        if hits[n]:
            direct[n] = hits[n]
        else:
            unmatched.append(n)
    return kohya, direct, unmatched, nm


def with_original_shapes(nm, layout) -> SimpleNamespace:
    """`nm`'s shapes plus each fused original module's (its parts' rows summed), so a LyCORIS update on one is
    known to be a linear one (`lycoris` asks whether a 2-D update may be a flattened conv)."""
    shapes = dict(nm.shapes)
    local = [n[len(COMPONENT) + 1:] for n in shapes if n.startswith(COMPONENT + ".")]
    for original, parts in layout.original_names(local).items():
        sizes = [shapes.get(f"{COMPONENT}.{p}") for p in parts]
        if all(s is not None and len(s) == 2 for s in sizes):
            shapes[f"{COMPONENT}.{original}"] = (sum(s[0] for s in sizes), sizes[0][1])
    return SimpleNamespace(shapes=shapes, source=nm.source)


def unresolved_error(path: str, names: List[str], nm) -> FormatError:
    shown = ", ".join(sorted(names)[:8]) + (" …" if len(names) > 8 else "")
    return FormatError(f"{path}: {len(names)} LyCORIS module name(s) match no module of {nm.source}: {shown} "
                       "(`loratools inspect` shows them; `convert --base` resolves them from a pipeline folder)")
