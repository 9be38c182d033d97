"""Which tools load a LyCORIS file (LoKr, LoHa, full …) of a DiT family as it is, from the names the file uses;
the rules of their key maps, restated (not their code):

- ComfyUI (comfy/lora.py `model_lora_keys_unet` / `_clip`, comfy/utils.py `flux_to_diffusers`; LoRA, LoHa, LoKr,
  GLoRA, OFT and full tensors alike under any mapped name): every model takes its original names as kohya's
  `lora_unet_…` and as `diffusion_model.…`. diffusers names: under `transformer.` or `lycoris_` (SimpleTuner) for
  Flux.1, FLUX.2, SD3 and Qwen-Image, bare for Flux and Qwen-Image (whose original names are diffusers'); none for
  Wan. FLUX.2 is a Flux subclass there: its map has FLUX.2's attention, MLP (`ff.linear_in`) and single-block
  (`to_qkv_mlp_proj`, `to_out`) names, not the shared modulations or the time/guidance embedder.
  `model.diffusion_model.…` matches nothing. Text encoders: `text_encoders.clip_l.transformer.…` (its own names),
  kohya `lora_te1_` (CLIP-L), `lora_te2_` (Flux: T5; SD3: CLIP-G), `lora_te3_` (T5).
- Forge (backend/patcher/lora.py over a 2024 copy of ComfyUI's map): Flux.1 only among these families, with
  `lora_unet_…` and `diffusion_model.…` original names, `transformer.` / `lycoris_` diffusers names and kohya
  `lora_te1_` … `lora_te3_`. A1111 (extensions-builtin/Lora networks.py): kohya `lora_unet_` names, looked up as
  `diffusion_model_…` among its model's modules, so SD3's original names (1.10). Neither runs Wan, Qwen-Image, FLUX.2.
- diffusers 0.42 (`Flux2LoraLoaderMixin.lora_state_dict`): LoKr, for FLUX.2 only among these (and Z-Image):
  `lycoris_` names of block modules, BFL names under `diffusion_model.` (fused qkv: it fuses the model's projections),
  bare diffusers names; alpha baked into w1. `transformer.` names it takes as they are, so `.alpha` keys make it
  raise. No LoHa or other algorithm; it drops dora_scale.
"""
from __future__ import annotations

import re
from typing import FrozenSet, List, Tuple

from .adapter import LoraAdapter
from .archs import dit, flux2

WEBUI_FAMILIES = ("Flux", "SD3")  # the DiT families Forge (Flux.1) or A1111 (SD3, 1.10) runs
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lycoris_", "lora_unet_")
# ComfyUI's diffusers-name prefixes per family ("" bare)
_COMFY = {"Flux": ("transformer.", "lycoris_", ""), "FLUX.2": ("transformer.", "lycoris_", ""),
          "SD3": ("transformer.", "lycoris_"), "Qwen-Image": ("transformer.", "lycoris_", "", "diffusion_model.")}
# FLUX.2's block linears, dots flattened
_FLUX2_BLOCK = (r"(single_)?transformer_blocks_\d+_(attn_(to_[qkv]|add_[qkv]_proj|to_out(_0)?|to_add_out|"
                r"to_qkv_mlp_proj)|ff(_context)?_linear_(in|out))")
# FLUX.2 diffusers modules in ComfyUI's flux_to_diffusers (dots flattened: `lycoris_` names compare alike)
_FLUX2_COMFY = re.compile(_FLUX2_BLOCK + r"|x_embedder|context_embedder|proj_out|norm_out_linear")
# diffusers' `_LYCORIS_FLUX2_SUBPATH_MAP`: the block modules its `lycoris_` FLUX.2 conversion decodes
_FLUX2_LYCORIS = re.compile("lycoris_" + _FLUX2_BLOCK)


def comfy_maps_flux2(local: str) -> bool:
    """Whether ComfyUI's Flux map (current: it has FLUX.2's block names) lists this FLUX.2 diffusers module."""
    return bool(_FLUX2_COMFY.fullmatch(local.replace(".", "_")))


def layout(adapter: LoraAdapter):
    """The DiT family layout of a LyCORIS file whose names these rules judge, else None."""
    if adapter.format != "lycoris" or "file_modules" not in adapter.config:
        return None
    return dit.for_adapter(adapter)


def _form(name: str, lay) -> Tuple[str, FrozenSet[str]]:
    """(prefix, kinds) of a module name as the file has it; kinds: te, original and/or diffusers (SD3's
    `context_embedder`, every Qwen-Image name: both)."""
    if name.startswith(("lora_te", "text_encoders.")):
        return ("lora_te" if name.startswith("lora_te") else "text_encoders."), frozenset({"te"})
    prefix = next((p for p in _PREFIXES if name.startswith(p)), "")
    if prefix in ("lora_unet_", "lycoris_"):  # kohya names are the original checkpoint's, LyCORIS' the model's
        return prefix, frozenset({"original" if prefix == "lora_unet_" else "diffusers"})
    local = name[len(prefix):]
    return prefix, frozenset(k for k, hit in (("original", lay.lookup(local)), ("diffusers", lay.original_of(local)))
                             if hit)


def _skipped(adapter: LoraAdapter, keeps) -> List[str]:
    lay = layout(adapter)
    return [n for n in adapter.config["file_modules"] if not keeps(n, *_form(n, lay))]


def _verdict(adapter: LoraAdapter, skipped: List[str], tool: str, ok: str, to: str) -> Tuple[bool, str]:
    if not skipped:
        return True, ok
    return False, (f"its key map has no name for {len(skipped)} of the file's {len(adapter.config['file_modules'])} "
                   f"module(s) ({skipped[0]} …), which {tool} skips: convert --to {to}")


def comfy(adapter: LoraAdapter) -> Tuple[bool, str]:
    fam = layout(adapter).family

    def keeps(name, prefix, kinds):
        if "te" in kinds or ("original" in kinds and prefix in ("lora_unet_", "diffusion_model.")):
            return True
        flat = name[len(prefix):].replace(".", "_")
        return "diffusers" in kinds and prefix in _COMFY.get(fam, ()) and (
            fam != flux2.LAYOUT.family or comfy_maps_flux2(flat))
    return _verdict(adapter, _skipped(adapter, keeps), "ComfyUI", f"names its {fam} key map lists", "comfyui")


def a1111(adapter: LoraAdapter) -> Tuple[bool, str]:
    fam = layout(adapter).family
    if fam == "Flux":
        def keeps(name, prefix, kinds):
            return (prefix == "lora_te" or "original" in kinds and prefix in ("lora_unet_", "diffusion_model.")
                    or "diffusers" in kinds and prefix in ("transformer.", "lycoris_"))
        return _verdict(adapter, _skipped(adapter, keeps), "Forge", "Forge (A1111 has no Flux): names its map lists",
                        "kohya")
    if fam == "SD3":
        return _verdict(adapter, _skipped(adapter, lambda n, p, k: p == "lora_unet_"), "A1111",
                        "A1111 1.10 (Forge has no SD3): kohya original names", "kohya")
    return False, f"A1111/Forge have no {fam} models"


def forge_flux(adapter: LoraAdapter) -> Tuple[bool, str]:
    """Forge on a Flux.1 LoRA in ComfyUI's or diffusers' names: `diffusion_model.` original and `transformer.`
    diffusers names, CLIP-L as diffusers' `text_encoder.`; not `text_encoders.…` nor diffusers' T5."""
    kept = ("transformer.", "text_encoder.") if adapter.format == "diffusers" else ("transformer.",)
    skipped = [m.name for m in adapter if not m.name.startswith(kept)]
    if skipped:
        return False, (f"Forge's Flux map has no name for {len(skipped)} text-encoder module(s) ({skipped[0]} …) in "
                       f"these names (A1111 has no Flux): convert --to kohya")
    return True, "Forge (A1111 has no Flux): names its Flux map lists"


def diffusers(adapter: LoraAdapter, algos: set) -> Tuple[bool, str]:
    fam = layout(adapter).family
    if fam != flux2.LAYOUT.family:
        return False, f"its {fam} loader converts no LyCORIS (LoKr: FLUX.2 and Z-Image only): convert --to diffusers"
    if algos != {"lokr"}:
        return False, (f"its FLUX.2 loader takes LoKr only, not {'/'.join(sorted(algos - {'lokr'}))}: "
                       "convert --to diffusers")
    if any(m.is_dora for m in adapter):
        return False, "its FLUX.2 loader drops dora_scale (DoRA): merge with loratools instead"
    names = adapter.config["file_modules"]
    forms = [_form(n, layout(adapter)) for n in names]
    if all(p == "lycoris_" for p, _ in forms):
        bad = [n for n in names if not _FLUX2_LYCORIS.fullmatch(n)]
        return (False, f"its lycoris_ conversion decodes block modules only ({bad[0]} …) and raises: convert --to "
                       "diffusers") if bad else (True, "LyCORIS FLUX.2 names, converted on load")
    if all(p == "diffusion_model." and "original" in k for p, k in forms):
        return True, "BFL names under diffusion_model., converted on load (fused qkv onto fused projections)"
    if all(p == "" and "diffusers" in k for p, k in forms):
        return True, "bare diffusers names, alpha baked into w1 on load"
    if all(p == "transformer." for p, _ in forms):
        return False, ("it takes `transformer.` LoKr names unconverted, and their .alpha keys fail its format check: "
                       "convert --to diffusers")
    return False, "its FLUX.2 LoKr loader reads these names in none of its conversions: convert --to diffusers"
