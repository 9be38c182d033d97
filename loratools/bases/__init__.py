"""Models to merge into, one class per kind behind the `Base` protocol (`core.Base`):
`ModelFolderBase` (Hugging Face model folder), `PipelineBase` (diffusers pipeline folder),
`SingleFileBase` (single-file SD 1.x/2.x/SDXL checkpoint), `DitFileBase` (single-file Flux.1 / SD3 / Wan 2.x),
`GgufBase` (a llama.cpp / Ollama GGUF model), `QuantizedBase` (bitsandbytes 4-bit/8-bit or FP8 model
folder). `open_base` picks the kind.
A new base kind is one module here plus one line in `open_base`."""
from __future__ import annotations

import os

from ..archs import COMPONENTS, dit
from ..archs.ldm import is_ldm_checkpoint
from ..checkpoint import Checkpoint, model_path
from ..safetensors_io import SafetensorsFile
from .core import Base, MergePlan, Term, merge_tensor, plan_merge
from .dit_file import DitFileBase
from .folder import ModelFolderBase
from .gguf import GgufBase, open_gguf_base
from .pipeline import PipelineBase
from .quantized import QuantizedBase, is_quantized, read_config
from .single_file import SingleFileBase

__all__ = ["Base", "MergePlan", "Term", "merge_tensor", "plan_merge", "open_base",
           "ModelFolderBase", "PipelineBase", "SingleFileBase", "DitFileBase", "GgufBase", "QuantizedBase"]


def open_base(base) -> Base:
    """The Base for a path or Hub reference (a Checkpoint or a Base is used as it is)."""
    if isinstance(base, Checkpoint):
        return ModelFolderBase(base)
    if not isinstance(base, (str, os.PathLike)):
        return base
    path = model_path(base, COMPONENTS)  # also a Hub reference
    gguf = open_gguf_base(path)
    if gguf is not None:
        return gguf
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        return PipelineBase(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        with SafetensorsFile(path) as f:
            if dit.for_checkpoint(f.tensors) is not None:  # before LDM: ComfyUI uses its prefix too
                return DitFileBase(path)
            if is_ldm_checkpoint(f.tensors):
                return SingleFileBase(path)
    ckpt = Checkpoint(path)
    config = read_config(path) if os.path.isdir(path) else None
    if is_quantized(ckpt, config):
        return QuantizedBase(ckpt, config)
    return ModelFolderBase(ckpt)
