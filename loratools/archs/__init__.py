"""Module names of known architectures, and resolving flattened (kohya) names without `_`-splitting.

kohya writes `lora_unet_down_blocks_0_attentions_0_proj_in`: the real name's dots became `_`,
which cannot be undone by splitting (`to_q`, `proj_in`, `ff.net.0.proj`). Instead we build a
forward map from the real module names (`unet.down_blocks.0.attentions.0.proj_in`) to their
flattened form, from the base model when one is given, else from the shipped manifests.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

from .. import paths
from ..checkpoint import Checkpoint, model_path
from ..errors import FormatError
from .gguf_names import GgufArch
from .ldm import ldm_unet_names, to_ldm

MANIFEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests")
ARCHS = ("sd1", "sd2", "sdxl")
# kohya name prefix -> diffusers pipeline component
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3",
                  "lora_transformer_": "transformer"}  # OneTrainer's DiT LoRAs (diffusers names flattened)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")

Shape = Tuple[int, ...]
# CLIP text-model parts that transformers >= 5 no longer nests under `text_model.` (T5's are `encoder.block…`)
_CLIP_PARTS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def canonical(name: str) -> str:
    """The ecosystem's name of a module: CLIP text encoders keep `text_model.` (kohya, diffusers and
    checkpoints on the Hub use it), also when the installed transformers flattened the model."""
    comp, _, rest = name.partition(".")
    if comp.startswith("text_encoder") and rest.startswith(_CLIP_PARTS):
        return f"{comp}.text_model.{rest}"
    return name


def flat_clip(name: str) -> str:
    """The transformers >= 5 spelling of a canonical CLIP name (no `text_model.`)."""
    comp, _, rest = name.partition(".")
    if comp.startswith("text_encoder") and rest.startswith("text_model."):
        return f"{comp}.{rest[len('text_model.'):]}"
    return name


@functools.lru_cache(maxsize=None)
def load_manifest(arch: str) -> dict:
    path = os.path.join(MANIFEST_DIR, f"{arch}.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


class NameMap:
    """Real module names of one model (`component.module` -> weight shape) and their flattened forms."""

    def __init__(self, source: str, modules: Dict[str, Shape], aliases: Optional[Dict[str, str]] = None):
        self.source = source
        self.shapes = {canonical(n): s for n, s in modules.items()}
        self._flat: Dict[str, List[str]] = {}
        for name in self.shapes:  # both CLIP spellings resolve to the canonical name
            for spelling in {name, flat_clip(name)}:
                comp, _, rest = spelling.partition(".")
                self._add(comp, rest, name)
        for alias, name in (aliases or {}).items():  # alias: `component.ldm_name` -> real name
            comp, _, rest = alias.partition(".")
            self._add(comp, rest, name)

    def _add(self, comp: str, rest: str, name: str) -> None:
        hits = self._flat.setdefault(f"{comp}:{rest.replace('.', '_')}", [])
        if name not in hits:
            hits.append(name)

    def resolve(self, component: str, flat: str) -> List[str]:
        """Real names whose flattened form is `flat` in `component` (more than one means ambiguous)."""
        return self._flat.get(f"{component}:{flat}", [])

    @classmethod
    def from_manifest(cls, arch: str) -> "NameMap":
        return _manifest_map(arch)

    @classmethod
    def for_llm(cls, arch: GgufArch) -> "NameMap":
        """The modules llama.cpp maps for this architecture (a GGUF base, or a config.json alone)."""
        return cls.llm(f"the {arch.arch} GGUF model", dict.fromkeys(arch.name_map()))

    @classmethod
    def llm(cls, source: str, modules: Dict[str, Optional[Shape]]) -> "NameMap":
        """A decoder LLM: one model, no pipeline components, so a kohya-named LLM LoRA
        (`lora_unet_model_layers_0_self_attn_q_proj`, `lora_te_…`) resolves under any kohya prefix."""
        nm = cls(source, {})
        for name, shape in modules.items():
            if shape is not None:
                nm.shapes[name] = shape
            for comp in set(KOHYA_PREFIXES.values()):
                nm._add(comp, name, name)
        return nm

    @classmethod
    def from_base(cls, path: str) -> "NameMap":
        """From a diffusers pipeline or component folder, or a Hugging Face LLM (its folder or config.json)."""
        path = os.path.abspath(model_path(path, COMPONENTS))  # also a Hub reference
        if is_llm_base(path):
            return cls.llm(f"base {path}", _llm_modules(path))
        modules, aliases = base_modules(path)
        return cls(f"base {path}", modules, aliases)


@functools.lru_cache(maxsize=None)
def _manifest_map(arch: str) -> NameMap:
    """Built once per process: a batch or `ls` resolves thousands of files against the same few
    manifests (a NameMap is not changed after it is built)."""
    m = load_manifest(arch)
    modules = {f"{c}.{n}": tuple(s) for c, names in m["components"].items() for n, s in names.items()}
    aliases = {f"{c}.{ldm}": f"{c}.{n}" for c, table in m["ldm"].items() for ldm, n in table.items()}
    return NameMap(f"the {arch} manifest", modules, aliases)


def _weights(folder: str) -> Dict[str, Shape]:
    """Module name -> shape of every weight with two or more dimensions in a model folder."""
    return {n[:-len('.weight')]: tuple(i.shape) for n, i in Checkpoint(folder).infos.items()
            if n.endswith(".weight") and len(i.shape) >= 2}


def _component_weights(folder: str, comp: str) -> Dict[str, Shape]:
    return {f"{comp}.{n}": s for n, s in _weights(folder).items()}


def is_llm_base(path: str) -> bool:
    """A transformers model: its config.json, or a folder with one that is no pipeline (or component) folder."""
    if os.path.isfile(path):
        return os.path.basename(path) == "config.json"
    return (os.path.isfile(os.path.join(path, "config.json")) and os.path.basename(path) not in COMPONENTS
            and not any(os.path.isdir(os.path.join(path, c)) for c in COMPONENTS))


def _llm_modules(path: str) -> Dict[str, Optional[Shape]]:
    """Module names (and shapes) from the model's safetensors headers; from its config.json through
    llama.cpp's name map (the GGUF export's) where there are no weights."""
    folder = path if os.path.isdir(path) else None
    if folder and any(f.endswith(".safetensors") for f in os.listdir(folder)):
        return _weights(folder)
    config = os.path.join(folder, "config.json") if folder else path
    return dict.fromkeys(GgufArch.from_config_file(config).name_map())


def base_modules(path: str) -> Tuple[Dict[str, Shape], Dict[str, str]]:
    """Module names and shapes of a diffusers pipeline folder (`unet/`, `text_encoder/`, …) or of one
    component folder named after its component; plus the UNet's LDM aliases from its config."""
    path = os.path.abspath(model_path(path, COMPONENTS))  # also a Hub reference
    if os.path.isdir(path) and os.path.basename(path) in COMPONENTS:
        folders = {os.path.basename(path): path}
    elif os.path.isdir(path):
        folders = {c: os.path.join(path, c) for c in COMPONENTS if os.path.isdir(os.path.join(path, c))}
    else:
        folders = {}
    if not folders:
        raise FormatError(f"{path}: --base must be a diffusers pipeline folder (with unet/, text_encoder/ …) "
                          "or a component folder named unet, text_encoder, text_encoder_2 or transformer")
    modules: Dict[str, Shape] = {}
    aliases: Dict[str, str] = {}
    for comp, folder in folders.items():
        weights = _component_weights(folder, comp)
        modules.update(weights)
        config = _read_json(os.path.join(folder, "config.json"))
        if comp == "unet" and config and all(k in config for k in ("block_out_channels", "layers_per_block",
                                                                      "down_block_types", "up_block_types")):
            table = ldm_unet_names(config)
            for name in weights:
                try:
                    aliases[f"unet.{to_ldm(name[len('unet.'):], table)}"] = name
                except KeyError:
                    pass
    return modules, aliases


def _read_json(path: str) -> Optional[dict]:
    try:
        with paths.open_input(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def split_kohya(lora_name: str) -> Tuple[Optional[str], str]:
    """`lora_te2_text_model_…` -> ("text_encoder_2", "text_model_…"); (None, name) if no known prefix."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if lora_name.startswith(prefix):
            return KOHYA_PREFIXES[prefix], lora_name[len(prefix):]
    return None, lora_name


def resolve_kohya(lora_names: Iterable[str], base: Optional[str] = None
                  ) -> Tuple[Dict[str, str], List[str], "NameMap"]:
    """Map kohya module names to real `component.module` names.

    Returns (mapping, unmatched, the NameMap used). With a base, only its names count; else the
    first manifest that resolves every name wins (else the one resolving the most).
    Ambiguous names (two real modules flatten alike) raise FormatError.
    """
    names = list(lora_names)
    if isinstance(base, GgufArch):  # merging into a GGUF model: its module names
        maps = [NameMap.for_llm(base)]
    else:
        maps = [NameMap.from_base(base)] if base else [NameMap.from_manifest(a) for a in ARCHS]
    best = None
    for nm in maps:
        mapping, unmatched, ambiguous = {}, [], []
        for ln in names:
            comp, flat = split_kohya(ln)
            hits = nm.resolve(comp, flat) if comp else []
            if len(hits) == 1:
                mapping[ln] = hits[0]
            elif hits:
                ambiguous.append(f"{ln} ({' or '.join(hits)})")
            else:
                unmatched.append(ln)
        if ambiguous:
            raise FormatError(f"ambiguous module names in {nm.source}: {', '.join(ambiguous[:5])}")
        if best is None or len(unmatched) < len(best[1]):
            best = (mapping, unmatched, nm)
        if not unmatched:
            break
    return best
