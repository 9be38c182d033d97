"""Which model family (SD 1.x, SD 2.x, SDXL, Flux, SD3, Wan, Qwen-Image …) an adapter or a base belongs to.

An adapter says it in its metadata (kohya `ss_base_model_version`, `ss_v2`, `modelspec.architecture`)
or shows it in its names (a second text encoder is SDXL; `double_blocks` is Flux; `transformer.blocks.` is Wan;
`img_mlp.net.` / `img_mod.1` are Qwen-Image's)
and shapes (the UNet's cross-attention width: 768 for SD 1.x's CLIP-L, 1024 for SD 2.x's OpenCLIP-H, 2048 for SDXL).
Used to name an architecture mismatch instead of listing the modules it breaks.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, Optional, Sequence, Tuple

from . import load_manifest

SD1, SD2, SDXL, SDXL_REFINER, FLUX, SD3, WAN = "SD 1.x", "SD 2.x", "SDXL", "SDXL refiner", "Flux", "SD3", "Wan"
QWEN, FLUX2 = "Qwen-Image", "FLUX.2"
# LdmLayout.arch -> family
LDM_ARCHS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER}
# diffusers pipeline class -> family (SD 1.x and 2.x share a class: the UNet's width tells them apart)
PIPELINES = {"StableDiffusionXLPipeline": SDXL, "StableDiffusionXLImg2ImgPipeline": SDXL, "FluxPipeline": FLUX,
             "StableDiffusion3Pipeline": SD3, "WanPipeline": WAN, "WanImageToVideoPipeline": WAN,
             **{f"QwenImage{task}Pipeline": QWEN for task in ("", "Img2Img", "Inpaint", "Edit", "EditPlus",
                                                              "EditInpaint", "ControlNet", "ControlNetInpaint",
                                                              "Layered")},
             **{f"Flux2{kind}Pipeline": FLUX2 for kind in ("", "Klein", "KleinInpaint", "KleinKV")}}
CROSS_ATTENTION = {768: SD1, 1024: SD2, 2048: SDXL}
# substrings of sd-scripts' ss_base_model_version / modelspec.architecture, most specific first
_VERSION_WORDS = (("qwen", QWEN), ("refiner", SDXL_REFINER), ("xl", SDXL),
                  *((word, FLUX2) for word in ("flux2", "flux.2", "flux_2", "flux-2", "flux 2", "klein")),
                  ("flux", FLUX), ("wan", WAN),
                  ("sd3", SD3), ("stable-diffusion-3", SD3), ("v3", SD3), ("v2", SD2), ("sd2", SD2), ("v1", SD1),
                  ("sd1", SD1))
# module name fragments (real or still flattened kohya names) that only one family has
_NAME_MARKS = (("double_blocks", FLUX), ("single_blocks", FLUX), ("single_transformer_blocks", FLUX),
               ("joint_blocks", SD3), ("context_block", SD3), ("transformer.pos_embed.", SD3),
               ("transformer.blocks.", WAN), ("transformer.condition_embedder.", WAN),
               *((mark, QWEN) for mark in ("img_mlp.net.", "txt_mlp.net.", "img_mod.1", "txt_mod.1",
                                           "img_mlp_net_", "txt_mlp_net_", "img_mod_1", "txt_mod_1")),
               ("text_encoder_2.", SDXL), ("lora_te2_", SDXL))

# FLUX.2's diffusers names (also flattened) that Flux.1 has not; looked for in every name first, since the two
# share `single_transformer_blocks` / `double_blocks` (a single block's `attn.to_out` is FLUX.2's only, too)
_FLUX2_MARKS = ("to_qkv_mlp_proj", "ff.linear_", "ff_context.linear_", "ff_linear_", "ff_context_linear_",
                "time_guidance_embed", "stream_modulation")
_FLUX2_SINGLE_OUT = re.compile(r".*single_transformer_blocks[._]\d+[._]attn[._]to_out")

# DiT families that share diffusers' transformer names (`transformer_blocks.N.attn.to_q` …): a LoRA on
# those only is told apart by its shapes (hidden width 3072 for Flux.1, 1536 / 2432 for SD3 / 3.5 large); Qwen-Image's
# attention is as wide as Flux's: its 60 blocks (Flux has 19 of that name) or its own modules tell it; so is FLUX.2
# [klein] 4B's (Flux.1 is looked at first: the attention's split is the same)
_SHAPE_MANIFESTS = (("flux", FLUX), ("flux2", FLUX2), ("flux2-klein-4b", FLUX2), ("flux2-klein-9b", FLUX2),
                    ("qwen-image", QWEN), ("sd3", SD3), ("sd3.5-large", SD3))


def _from_version(text: str) -> Optional[str]:
    text = text.lower()
    return next((fam for word, fam in _VERSION_WORDS if word in text), None)


# metadata keys that say an adapter's family (the third: musubi-tuner; ss_v2: kohya's SD 2.x flag)
FAMILY_KEYS = ("modelspec.architecture", "ss_base_model_version", "ss_architecture", "ss_v2")


def shared_family_metadata(metadatas: Sequence[Dict[str, str]]) -> Dict[str, str]:
    """The family keys every one of `metadatas` holds with the same value: what an adapter made from them
    (a blend) may still say, so its family is not guessed from shapes alone."""
    out = {}
    for key in FAMILY_KEYS:
        values = {str(m.get(key)) if m.get(key) is not None else None for m in metadatas}
        if len(values) == 1 and None not in values and metadatas:
            out[key] = values.pop()
    return out


def from_metadata(metadata: Dict[str, str]) -> Optional[Tuple[str, str]]:
    for key in FAMILY_KEYS[:3]:
        fam = _from_version(metadata.get(key) or "")
        if fam:
            return fam, f"metadata {key}={metadata[key]}"
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return SD2, "metadata ss_v2=True"
    return None


def from_modules(shapes: Dict[str, Tuple[int, ...]]) -> Optional[Tuple[str, str]]:
    """From module names and the weight shapes they update (`name` -> shape)."""
    dit = any(n.startswith("transformer.") for n in shapes)  # Flux/SD3 keep T5 or CLIP-G as text_encoder_2
    for name in shapes:
        if any(mark in name for mark in _FLUX2_MARKS) or _FLUX2_SINGLE_OUT.fullmatch(name):
            return FLUX2, f"module {name}"
    for name in shapes:
        for mark, fam in _NAME_MARKS:
            if mark in name and not (dit and fam == SDXL):
                return fam, f"module {name}"
        if name.startswith("transformer.transformer_blocks.") and ".attn2." in name:  # SD3.5's dual attention
            return SD3, f"module {name}"
    found = from_transformer_shapes(shapes)
    if found:
        return found
    for name, shape in shapes.items():  # cross-attention keys/values read the text encoder's width
        if ("attn2.to_k" in name or "attn2_to_k" in name) and len(shape) == 2 and shape[1] in CROSS_ATTENTION:
            return CROSS_ATTENTION[shape[1]], f"cross-attention width {shape[1]} ({name})"
    return None


def from_transformer_shapes(shapes: Dict[str, Tuple[int, ...]]) -> Optional[Tuple[str, str]]:
    """The DiT family whose manifest has every `transformer.` module with its shape, or None."""
    found = shape_families(shapes)
    if not found:
        return None
    arch, fam = found[0]
    name, shape = next((n, s) for n, s in shapes.items() if n.startswith("transformer."))
    return fam, f"transformer shapes of {arch} ({name} {list(shape)})"


def shape_families(shapes: Dict[str, Tuple[int, ...]]):
    """[(manifest, family)] of every DiT manifest that has each `transformer.` module with its shape."""
    mods = {n[len("transformer."):]: tuple(s) for n, s in shapes.items() if n.startswith("transformer.")}
    out = []
    for arch, fam in _SHAPE_MANIFESTS if mods else ():
        table = load_manifest(arch)["components"]["transformer"]
        if all(tuple(table.get(n, ())) == s for n, s in mods.items()):
            out.append((arch, fam))
    return out


def adapter_family(adapter) -> Optional[Tuple[str, str]]:
    """(family, evidence) of a LoraAdapter, or None when nothing tells. A reader may name the family its
    layout alone has (`config["family"]`: XLabs is Flux's)."""
    layout = adapter.config.get("family")
    return (from_metadata(adapter.metadata) or (tuple(layout) if layout else None)
            or from_modules({m.name: m.weight_shape for m in adapter}))


def is_family(adapter, family: str) -> bool:
    """The adapter is one of `family` (its metadata, names or shapes say so)."""
    fam = adapter_family(adapter)
    return fam is not None and fam[0] == family


def pipeline_family(folder: str, components: Iterable[str]) -> Optional[str]:
    """Family of a diffusers pipeline folder from model_index.json and the UNet's config."""
    index = _json(os.path.join(folder, "model_index.json"))
    fam = PIPELINES.get(str(index.get("_class_name", "")))
    if fam:
        return fam
    comps = set(components)
    if "unet" in comps and "text_encoder_2" in comps:
        return SDXL if "text_encoder" in comps else SDXL_REFINER
    width = _json(os.path.join(folder, "unet", "config.json")).get("cross_attention_dim")
    if index.get("_class_name") == "StableDiffusionPipeline":  # SD 2.x reads OpenCLIP-H's 1024 wide states
        return SD2 if width == 1024 else SD1
    return CROSS_ATTENTION.get(width) if isinstance(width, int) else None


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def mismatch(adapter, base_family: Optional[str], base_kind: str) -> Optional[str]:
    """"SDXL LoRA, SD 1.x checkpoint" when both families are known and differ, else None."""
    fam = adapter_family(adapter)
    if fam is None or base_family is None or fam[0] == base_family:
        return None
    if fam[1].startswith("transformer shapes of ") and base_family in {
            f for _, f in shape_families({m.name: m.weight_shape for m in adapter})}:
        return None  # widths several families share (attention at 3072: Flux.1, FLUX.2 klein 4B, Qwen-Image)
    return f"{fam[0]} LoRA, {base_family} {base_kind} (the adapter was made for another model; {fam[1]})"
