"""Which tools load an adapter file as it is (`inspect`'s "loads in" line), from the naming rules
of their loaders, restated here (not their code):

- PEFT: `PeftModel.from_pretrained` reads a folder with adapter_config.json and lora_A/lora_B
  tensors of one model; a pipeline's components are one such folder each.
- diffusers: `load_lora_weights` takes one file for a pipeline, in its own names or kohya's
  (converted on load); it converts plain LoRA (with DoRA scales), not LyCORIS LoHa/LoKr or others.
  Its kohya conversion looks the alphas of UNet attention projections and text-encoder modules up
  under names it does not write, so those modules get their component's most common alpha.
- ComfyUI (comfy/lora.py key map): kohya names (`lora_unet_…`, `lora_te_…`/`lora_te1_`/`lora_te2_`)
  with LoRA, LoHa, LoKr, GLoRA or full (diff) tensors; diffusers names only where its map lists
  them, which spells UNet attention projections `…attn1.processor.to_q` — a plain
  `…attn1.to_q` key matches nothing and is skipped with a warning, not loaded.
- ComfyUI-form files (original checkpoint names, `diffusion_model.…`): ComfyUI loads them all;
  diffusers reads their Flux transformer and CLIP-L keys and drops T5 ones. diffusers' SD3 loader reads
  its own names only (no kohya or original-names conversion); its Flux and SD3 loaders drop `dora_scale`.
- DoRA `dora_scale` [out, 1] (LyCORIS wd_on_output, PEFT's row norm): ComfyUI (comfy/weight_adapter/base.py)
  divides by the norm of W, not of W + ΔW as LyCORIS does (older versions norm per input column), so it
  does not load such a file exactly; [1, in] (per input column) it applies as LyCORIS does.
- diffusers' Wan converters (0.42): the ComfyUI form raises on an `.alpha` beside a module outside the
  blocks (embedders, head); musubi-tuner's `lora_unet_blocks_N_…` form needs every block 0…N-1 with
  all its linears (10; 12 with I2V's k_img/v_img), each with an alpha, and nothing else.
- diffusers reads XLabs files (ComfyUI's own key map does not) and OneTrainer's Flux names
  (`lora_transformer_…`) for attention, global and CLIP-L (`lora_te1_`) modules only.
- Qwen-Image (diffusers' Qwen loader; ComfyUI's QwenImage key map): diffusers converts kohya/musubi
  (`lora_unet_…`), `diffusion_model.` and unprefixed names itself, folding each module's own alpha, and
  drops DoRA scales and text-encoder modules; a diffusers-named file with `.alpha` keys fails to load there
  (its converter prefixes `transformer.` twice); ComfyUI maps `diffusion_model.`, `lora_unet_`, `transformer.`
  and bare names but takes alphas from `.alpha` keys only (a diffusers file's `lora_adapter_metadata` alphas
  are ignored: scale 1).
- A1111/Forge: kohya/LyCORIS names (`lora_unet_…`, `lora_te_…`) in one .safetensors file; of the DiT families
  Flux.1 (Forge) and SD3 (A1111 1.10) only: no Wan, Qwen-Image or FLUX.2.
- LyCORIS files of the DiT families: `loaders_dit`, by the names the file uses (ComfyUI, A1111/Forge, diffusers).
- llama.cpp's convert_lora_to_gguf.py: a PEFT folder of a language model; it writes one global
  alpha (lora_alpha, each module scaled alpha / its rank) and ignores alpha_pattern and rsLoRA,
  and has no DoRA magnitudes.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Tuple

from .adapter import LoraAdapter
from . import loaders_dit
from .archs import COMPONENTS, dit, flux2, sd3, wan
from .archs.family import FLUX2, QWEN, is_family

LOADERS = ("PEFT", "diffusers", "ComfyUI", "A1111/Forge", "llama.cpp converter")
COMFY_ALGOS = {"lora", "loha", "lokr", "glora", "full"}
# diffusers attention projections ComfyUI's map knows only in the `.processor.to_q` spelling
_DIFFUSERS_ATTN = re.compile(r"^unet\..*\.attn\d+\.to_(q|k|v|out\.0)$")


def _diffusion(adapter: LoraAdapter) -> bool:
    return any(n.split(".", 1)[0] in COMPONENTS for n in list(adapter.modules) + list(adapter.extra))


def _algorithms(adapter: LoraAdapter) -> set:
    return set((adapter.config.get("algorithms") or {}).values()) or {"lora"}


def _one_alpha(adapter: LoraAdapter) -> bool:
    """True when one lora_alpha with scale alpha / rank gives every module its scale."""
    values = {m.scale * m.rank for m in adapter}
    return len(values) <= 1 and not any(m.use_rslora and m.rank != 1 for m in adapter)


def _peft(adapter: LoraAdapter, diffusion: bool) -> Tuple[bool, str]:
    if adapter.format == "peft":
        return True, "a PEFT folder (PeftModel.from_pretrained)"
    if adapter.format == "peft_diffusion":
        return True, "one PEFT folder per component, each loaded into its model"
    return False, "PEFT reads adapter_config.json folders: convert --to " + ("peft_diffusion" if diffusion else "peft")


def _lost_alphas(adapter: LoraAdapter) -> List[str]:
    """Modules whose alpha diffusers' kohya loader replaces by their component's most common one."""
    by_comp: Dict[str, list] = {}
    for m in adapter:
        by_comp.setdefault(m.name.split(".", 1)[0], []).append(m)
    lost = []
    for comp, mods in by_comp.items():
        common = Counter(m.alpha_value for m in mods).most_common(1)[0][0]
        lost += [m.name for m in mods if m.alpha_value != common and (comp != "unet" or _DIFFUSERS_ATTN.match(m.name))]
    return lost


def _wan_diffusers(adapter: LoraAdapter) -> Tuple[bool, str]:
    """diffusers' Wan converters on a file in Wan's original (ComfyUI) or musubi-tuner names."""
    read_alphas = _alphas_read(adapter)
    outside = [m.name for m in adapter if not wan.is_block_module(wan.original_name(m.name) or "")]
    if adapter.format == "comfyui":
        bad = [n for n in outside if n in read_alphas]
        return ((False, f"it raises on the .alpha of {len(bad)} module(s) outside the blocks ({bad[0]} …): "
                        "convert --to diffusers") if bad else (True, "original names, converted on load"))
    counts = Counter(int(m.name.split(".")[2]) for m in adapter if m.name not in outside)  # transformer.blocks.N.…
    i2v = any(n.endswith("add_k_proj") for n in adapter.modules)
    full = (not outside and sorted(counts) == list(range(len(counts)))
            and set(counts.values()) == {12 if i2v else 10} and all(m.name in read_alphas for m in adapter))
    return ((True, "musubi-tuner names, converted on load") if full else
            (False, "its musubi-tuner conversion needs every block's linears, each with an alpha, and nothing "
                    "else: convert --to diffusers (or --to comfyui)"))


def _alphas_read(adapter: LoraAdapter) -> set:
    """The modules of a Wan adapter whose file had an `.alpha` (kohya keys it by kohya name, ComfyUI by original)."""
    dtypes = adapter.config.get("alpha_dtypes", {})
    if adapter.format == "kohya":
        return {n for ln in dtypes for n in adapter.config.get("original_keys", {}).get(ln, [])}
    return {f"transformer.{wan.to_diffusers(k.partition('.')[2])}" for k in dtypes if k.startswith("transformer.")}


def _onetrainer_diffusers(names) -> Tuple[bool, str]:
    """diffusers' reading of OneTrainer's Flux names (`lora_transformer_…`, its "mixture" conversion)."""
    bad = [n for n in names if not (n.startswith("lora_transformer_") and ("_attn_" in n or "blocks_" not in n)
                                    or n.startswith("lora_te1_text_model_encoder_layers_"))]
    return ((False, f"its OneTrainer conversion maps attention, global and CLIP-L modules only ({bad[0]} …): "
                    "convert --to diffusers") if bad else (True, "OneTrainer names, converted on load"))


def _flux2_diffusers(adapter: LoraAdapter, algos: set) -> Tuple[bool, str]:
    """diffusers' FLUX.2 loader on a kohya or original-names file (its conversions, 0.42)."""
    if algos - {"lora"} or any(m.is_dora or m.op is not None for m in adapter):
        return False, "its FLUX.2 conversions take plain LoRA factors: convert --to diffusers"
    if adapter.format == "comfyui" and not adapter.config.get("lora_ab"):
        return False, ("it reads `diffusion_model.` files with lora_A/lora_B keys only (drops these): "
                       "convert --to diffusers")
    if adapter.format == "comfyui" and adapter.config.get("alpha_dtypes"):
        return False, "its original-names conversion refuses .alpha keys: convert --to diffusers"
    if "transformer.norm_out.linear" in adapter.modules:
        return False, ("it reads the final adaLN's LoRA in BFL's [shift; scale] row order unswapped: "
                       "convert --to diffusers")
    if adapter.format == "kohya":
        dropped = [m.name for m in adapter if not flux2.KOHYA_DIFFUSERS.fullmatch(m.name)]
        if dropped:
            return False, (f"its kohya conversion drops {len(dropped)} module(s) ({dropped[0]} …): "
                           "convert --to diffusers")
    return True, "FLUX.2 original names, converted on load"


def _diffusers(adapter: LoraAdapter, diffusion: bool, algos: set) -> Tuple[bool, str]:
    if adapter.format in ("kohya", "comfyui") and wan.is_wan(adapter):
        return _wan_diffusers(adapter)
    if adapter.format == "xlabs":
        return True, "XLabs names, converted on load"
    flux_names = adapter.config.get("original_keys") or {}
    if adapter.format == "kohya" and any(n.startswith("lora_transformer_") for n in flux_names):
        return _onetrainer_diffusers(flux_names)
    if not diffusion:
        return False, "load_lora_weights is for diffusion pipelines"
    if adapter.format == "peft_diffusion":
        return False, "load_lora_weights takes one file: convert --to diffusers"
    if adapter.format == "diffusers":
        return True, "its own names"
    layout = dit.for_adapter(adapter) if adapter.format in ("kohya", "comfyui") else None
    if layout is flux2.LAYOUT:
        return _flux2_diffusers(adapter, algos)
    if layout is sd3.LAYOUT:
        return False, "its SD3 loader reads its own names only: convert --to diffusers"
    if layout is not None and any(m.is_dora or m.op is not None for m in adapter):
        return False, "its Flux loader drops dora_scale (DoRA): convert --to diffusers"
    if adapter.format == "comfyui":
        t5 = [n for n in adapter.modules if n.startswith("text_encoder_2.")]
        return (False, f"it drops the {len(t5)} T5 module(s)") if t5 else (True, "original names, converted on load")
    if adapter.format in ("kohya", "lycoris") and algos <= {"lora"}:
        lost = _lost_alphas(adapter)
        if lost:
            return False, (f"its kohya conversion loses the own alpha of {len(lost)} attention/text-encoder "
                           f"module(s) ({lost[0]} …): convert --to diffusers")
        return True, "kohya names, converted on load"
    if algos - {"lora"}:
        return False, f"no {'/'.join(sorted(algos - {'lora'}))} conversion: convert --to diffusers --rank K"
    return False, "convert --to diffusers"


def _comfy(adapter: LoraAdapter, diffusion: bool, algos: set) -> Tuple[bool, str]:
    if not diffusion:
        return False, "ComfyUI loads diffusion-model LoRAs"
    rows = [m.name for m in adapter if m.is_dora]
    if adapter.format in ("kohya", "lycoris", "comfyui") and rows:
        return False, (f"it norms an [out, 1] dora_scale with W, not W + ΔW ({len(rows)} DoRA module(s), {rows[0]} …): "
                       "merge it with loratools instead")
    if adapter.format in ("kohya", "lycoris"):
        bad = algos - COMFY_ALGOS
        if bad:
            return False, f"no key rule for {'/'.join(sorted(bad))} tensors: convert --to kohya --base BASE --rank K"
        if loaders_dit.layout(adapter) is not None:  # a DiT family's LyCORIS file: which of its names are mapped
            return loaders_dit.comfy(adapter)
        return True, "kohya names"
    if adapter.format == "diffusers" and is_family(adapter, FLUX2):
        skipped = [n for n in adapter.modules if not loaders_dit.comfy_maps_flux2(n.partition(".")[2])]
        return (False, f"its FLUX.2 diffusers names (Flux's map) skip {len(skipped)} module(s) ({skipped[0]} …: the "
                       "shared modulations, time/guidance embedder, text encoders): convert --to comfyui") if skipped \
            else (True, "FLUX.2 diffusers names its Flux map lists")
    if adapter.format == "diffusers":
        skipped = sum(1 for n in adapter.modules if _DIFFUSERS_ATTN.match(n))
        if skipped:
            return False, (f"{skipped} of {len(adapter)} modules (UNet attention to_q/k/v/out) are skipped: its map "
                           "spells them .processor.to_q; convert --to kohya")
        return True, "diffusers names its map lists"
    if adapter.format == "comfyui":
        return True, "original checkpoint names"
    if adapter.format == "xlabs":
        return False, "its key map has no XLabs names (XLabs' own nodes read them): convert --to comfyui"
    return False, "ComfyUI loads one file: convert --to kohya"


def _qwen_diffusers(adapter: LoraAdapter, algos: set) -> Tuple[bool, str]:
    if adapter.format == "peft_diffusion":
        return False, "load_lora_weights takes one file: convert --to diffusers"
    if algos - {"lora"}:
        return False, f"no {'/'.join(sorted(algos - {'lora'}))} conversion: convert --to diffusers --rank K"
    if adapter.is_dora:
        return False, "its Qwen-Image loader drops DoRA scales: merge with loratools instead"
    others = [m.name for m in adapter if m.name.split(".", 1)[0] != "transformer"]
    if others:
        return False, (f"its Qwen-Image loader loads the transformer only ({len(others)} module(s) dropped: "
                       f"{others[0]} …)")
    if adapter.format == "diffusers" and "lora_adapter_metadata" not in adapter.metadata and \
            any(m.alpha is not None for m in adapter):  # alphas from `.alpha` keys
        return False, ("its Qwen converter renames `transformer.…` modules with .alpha keys to "
                       "`transformer.transformer.…` and fails: convert --to diffusers (alphas go to its metadata)")
    return True, "Qwen-Image names, each module's alpha folded on load"


def _qwen_comfy(adapter: LoraAdapter, algos: set) -> Tuple[bool, str]:
    if adapter.format not in ("kohya", "lycoris", "comfyui", "diffusers"):
        return False, "ComfyUI loads one file: convert --to comfyui"
    if algos - COMFY_ALGOS:
        return False, f"no key rule for {'/'.join(sorted(algos - COMFY_ALGOS))} tensors: convert --to comfyui --rank K"
    lost = [m.name for m in adapter if m.scale != 1] if "lora_adapter_metadata" in adapter.metadata else []
    if lost:
        return False, (f"it ignores lora_adapter_metadata, so {len(lost)} module(s) ({lost[0]} …) get scale 1 "
                       "instead of alpha/rank: convert --to comfyui")
    return True, "Qwen-Image names"


def _a1111(adapter: LoraAdapter, diffusion: bool, algos: set) -> Tuple[bool, str]:
    if not diffusion:
        return False, "A1111/Forge load diffusion-model LoRAs"
    if wan.is_wan(adapter):
        return False, "A1111/Forge have no Wan (video) models"
    if loaders_dit.layout(adapter) is not None and algos <= COMFY_ALGOS:
        return loaders_dit.a1111(adapter)
    family = dit.for_adapter(adapter)
    if family is not None and family.family not in loaders_dit.WEBUI_FAMILIES:
        return False, f"A1111/Forge have no {family.family} models"
    if adapter.format in ("kohya", "lycoris") and algos <= COMFY_ALGOS:
        return True, "kohya names"
    if family is not None and family.family == "Flux" and adapter.format in ("comfyui", "diffusers"):
        return loaders_dit.forge_flux(adapter)
    return False, "A1111/Forge read kohya names (lora_unet_…, lora_te_…): convert --to kohya"


def _llama_cpp(adapter: LoraAdapter, diffusion: bool) -> Tuple[bool, str]:
    if diffusion:
        return False, "llama.cpp is for language models"
    if adapter.format == "gguf":
        return True, "already GGUF (llama.cpp --lora loads it)"
    if adapter.format != "peft":
        return False, "convert_lora_to_gguf.py reads PEFT folders: convert --to peft (or --to gguf)"
    if adapter.is_dora:
        return False, "DoRA magnitudes are not converted"
    if not _one_alpha(adapter):
        return False, ("it writes one alpha and ignores alpha_pattern/rsLoRA, so some scales come out wrong: "
                       "rewrite with --uniform-scale (or convert --to gguf)")
    return True, "one lora_alpha holds for every module"


def compatibility(adapter: LoraAdapter) -> Dict[str, Dict[str, object]]:
    """{loader: {"ok": bool, "why": str}} for the file `adapter` was read from, in LOADERS order."""
    diffusion, algos = _diffusion(adapter), _algorithms(adapter)
    lycodit = diffusion and loaders_dit.layout(adapter) is not None  # judged by the names the file uses
    qwen_image = diffusion and is_family(adapter, QWEN) and not lycodit  # its loaders take every layout of its names
    results = (_peft(adapter, diffusion),
               loaders_dit.diffusers(adapter, algos) if lycodit else
               _qwen_diffusers(adapter, algos) if qwen_image else _diffusers(adapter, diffusion, algos),
               _qwen_comfy(adapter, algos) if qwen_image else _comfy(adapter, diffusion, algos),
               _a1111(adapter, diffusion, algos), _llama_cpp(adapter, diffusion))
    return {name: {"ok": ok, "why": why} for name, (ok, why) in zip(LOADERS, results)}
