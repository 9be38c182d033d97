"""llama.cpp's names and layouts for decoder LLMs: which Hugging Face module becomes which GGUF tensor.

llama.cpp renames every weight (`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight`) with the
name map of the `gguf` package, and for llama-family models its converter also reorders the rows of
q/k (HF stores RoPE halves as [x0..x63, x64..x127], ggml interleaves pairs). A LoRA on q/k must get
the same row order in B (and in a DoRA magnitude), or llama.cpp adds the update to the wrong rows.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..adapter import LoraModule
from ..errors import FormatError, IncompatibleError, LoraToolsError

INSTALL_HINT = "pip install loratools[gguf]"
# HF model_type -> (gguf MODEL_ARCH member, q/k rows reordered by llama.cpp's converter)
FAMILIES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
            "qwen3": ("QWEN3", False), "gemma": ("GEMMA", False), "gemma2": ("GEMMA2", False),
            "gemma3": ("GEMMA3", False), "gemma3_text": ("GEMMA3", False), "phi3": ("PHI3", False)}
_PERMUTED_ARCHS = {"llama"}  # GGUF architecture names whose q/k rows are reordered
# multimodal wrappers whose text model llama.cpp converts under the plain names
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
# the module names these families use (reverse map: GGUF tensor -> HF module)
_GLOBAL = ("model.embed_tokens", "lm_head")
_PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "self_attn.qkv_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj")


def gguf_package():
    """The optional `gguf` package (llama.cpp's reader/writer), or a one-line error saying how to get it."""
    try:
        import gguf  # optional dependency: only GGUF input/output needs it
    except ImportError:
        raise LoraToolsError(f"GGUF support needs the gguf package: {INSTALL_HINT}") from None
    return gguf


@functools.lru_cache(maxsize=None)
def _tensor_map(member, n_layers: int):
    """llama.cpp's name map, built once per architecture and depth: building it takes milliseconds, and
    `to_gguf` runs once per module of an adapter (hundreds for one LLM)."""
    return gguf_package().get_tensor_name_map(member, n_layers)


@dataclass(frozen=True)
class GgufArch:
    """What naming and layout need to know about a model: GGUF architecture, layers, heads."""

    arch: str  # llama.cpp's name, e.g. "llama", "qwen2"
    n_layers: int
    n_head: int
    n_head_kv: int
    tied: bool = False  # lm_head shares token_embd (no `output.weight` in the GGUF)

    @property
    def permutes(self) -> bool:
        return self.arch in _PERMUTED_ARCHS

    @classmethod
    def from_config(cls, config: dict) -> "GgufArch":
        """From a transformers config.json (multimodal configs: their text_config)."""
        model_type = config.get("model_type")
        text = config.get("text_config") or {}
        merged = {**config, **text} if isinstance(text, dict) else config
        if model_type not in FAMILIES:
            model_type = merged.get("model_type")
        if model_type not in FAMILIES:
            raise IncompatibleError(f"model type {config.get('model_type')!r} has no llama.cpp LoRA name map in "
                                    f"loratools (supported: {', '.join(sorted(FAMILIES))})")
        try:
            n_head = int(merged["num_attention_heads"])
            n_layers = int(merged["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise IncompatibleError("config.json lacks num_attention_heads / num_hidden_layers") from None
        n_kv = int(merged.get("num_key_value_heads") or n_head)
        member = FAMILIES[model_type][0]
        gguf = gguf_package()
        arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, member)]
        tied = bool(config.get("tie_word_embeddings", merged.get("tie_word_embeddings", False)))
        return cls(arch, n_layers, n_head, n_kv, tied)

    @classmethod
    def from_config_file(cls, config_path: str) -> "GgufArch":
        """From a model's config.json (a path to the file)."""
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise FormatError(f"{config_path}: not found (give a model folder, its config.json or a GGUF model)"
                              ) from None
        except (OSError, ValueError) as e:
            raise FormatError(f"{config_path}: cannot be read as JSON ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: expected a JSON object")
        return cls.from_config(config)

    @classmethod
    def from_metadata(cls, kv: Dict[str, object], tensor_names=()) -> "GgufArch":
        """From a GGUF file's key/values (`llama.block_count`, `llama.attention.head_count` …)."""
        arch = str(kv.get("general.architecture", ""))
        n_layers = kv.get(f"{arch}.block_count")
        n_head = kv.get(f"{arch}.attention.head_count")
        if n_layers is None or n_head is None:
            raise IncompatibleError(f"GGUF metadata lacks {arch}.block_count / {arch}.attention.head_count")
        n_kv = kv.get(f"{arch}.attention.head_count_kv", n_head)
        tied = bool(tensor_names) and "output.weight" not in tensor_names
        return cls(arch, int(n_layers), int(n_head), int(n_kv), tied)

    def _member(self):
        gguf = gguf_package()
        for member, name in gguf.MODEL_ARCH_NAMES.items():
            if name == self.arch:
                return member
        raise IncompatibleError(f"GGUF architecture {self.arch!r} is unknown to the installed gguf package")

    def name_map(self) -> Dict[str, str]:
        """HF module name -> GGUF weight name, for every module the families use."""
        tmap = _tensor_map(self._member(), self.n_layers)
        names = list(_GLOBAL) + [f"model.layers.{i}.{p}" for i in range(self.n_layers) for p in _PER_LAYER]
        out = {}
        for n in names:
            mapped = tmap.get_name(n)
            # fused gate+up (phi3) only where the family has no separate gate
            if mapped is not None and not (n.endswith("gate_up_proj") and tmap.get_name(n[:-7] + "proj") is not None):
                out[n] = mapped + ".weight"
        if self.tied:
            out.pop("lm_head", None)
        return out

    def to_gguf(self, module: str) -> Optional[str]:
        """The GGUF weight name of an HF module name, or None when llama.cpp has no such tensor."""
        for old, new in _PREFIXES:
            if module.startswith(old):
                module = new + module[len(old):]
                break
        if self.tied and module == "lm_head":
            return None
        mapped = _tensor_map(self._member(), self.n_layers).get_name(module)
        return None if mapped is None else mapped + ".weight"

    def heads_of(self, gguf_name: str) -> Optional[int]:
        """The head count whose RoPE row order applies to this weight, or None when rows keep their order."""
        if not self.permutes:
            return None
        if gguf_name.endswith(".attn_q.weight"):
            return self.n_head
        if gguf_name.endswith(".attn_k.weight"):
            return self.n_head_kv
        return None


def rope_rows(t: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, rows [a0..a(h/2-1), b0..] become [a0, b0, a1, b1, …]."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise IncompatibleError(f"{rows} rows cannot be split into {n_head} RoPE heads")
    rest = tuple(t.shape[1:])
    half = rows // n_head // 2
    if inverse:
        return t.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(t.shape)
    return t.reshape(n_head, 2, half, *rest).transpose(1, 2).reshape(t.shape)


def to_gguf_module(m: LoraModule, arch: GgufArch) -> LoraModule:
    """The module in llama.cpp's layout: GGUF name (without `.weight`), B rows (and DoRA magnitude) reordered."""
    target = arch.to_gguf(m.name)
    if target is None:
        why = " (tied to the token embeddings in this model)" if m.name.endswith("lm_head") and arch.tied else ""
        raise IncompatibleError(f"module {m.name}: llama.cpp's {arch.arch} models have no such tensor{why}")
    heads = arch.heads_of(target)
    up, mag = m.up, m.magnitude
    if heads is not None:
        up = rope_rows(up, heads)
        mag = None if mag is None else rope_rows(mag, heads)
    return dataclasses.replace(m, name=target[: -len(".weight")], up=up, magnitude=mag)


def from_gguf_module(m: LoraModule, arch: GgufArch, reverse: Dict[str, str]) -> LoraModule:
    """Inverse of `to_gguf_module`: HF module name, B rows back in HF order."""
    gguf_name = m.name + ".weight"
    if gguf_name not in reverse:
        raise IncompatibleError(f"GGUF tensor {gguf_name}: no {arch.arch} module of the known families maps to it")
    heads = arch.heads_of(gguf_name)
    up, mag = m.up, m.magnitude
    if heads is not None:
        up = rope_rows(up, heads, inverse=True)
        mag = None if mag is None else rope_rows(mag, heads, inverse=True)
    return dataclasses.replace(m, name=reverse[gguf_name], up=up, magnitude=mag)

