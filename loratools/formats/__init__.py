"""Adapter formats: detect, read and write. One module per format, each with
`detect(path) -> bool`, `read(path, **options) -> LoraAdapter` and `write(adapter, tmp_path)`.
Reader options (passed only to readers that take them): `base` (a model folder whose module
names resolve flattened kohya names), `allow_unmatched`, `rank` (LyCORIS factoring rank)."""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Dict, Optional

from .. import safetensors_io
from ..adapter import LoraAdapter
from ..atomic import atomic_output
from ..hub import existing_path
from ..errors import FormatError, LoraToolsError, UsageError
from . import diffusers, gguf, kohya, lycoris, peft, peft_diffusion

# name -> module; order is detection order. Single-file formats write a file, peft a folder.
FORMATS: Dict[str, object] = {"gguf": gguf, "peft": peft, "peft_diffusion": peft_diffusion,
                              "diffusers": diffusers, "lycoris": lycoris, "kohya": kohya}
FOLDER_FORMATS = {"peft", "peft_diffusion"}
WRITABLE = ("peft", "peft_diffusion", "diffusers", "kohya", "gguf")


def detect(path: str) -> str:
    path = existing_path(path, kind="adapter")  # also a Hub reference
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    if os.path.isfile(path) and path.endswith(".safetensors"):
        safetensors_io.SafetensorsFile(path).close()  # a broken file: say what is broken in it
    raise FormatError(f"{path}: not a LoRA adapter loratools recognises (formats: {', '.join(FORMATS)})")


def read_adapter(path, format: Optional[str] = None, check: bool = True, **options) -> LoraAdapter:
    """Read an adapter from a path; the format is detected unless given. `options` not None go to
    readers that accept them (see the module docstring). With `check`, refuse an adapter that
    `validate.check_adapter` finds errors in (NaN/Inf, broken factors, no modules)."""
    if isinstance(path, LoraAdapter):
        return path
    path = existing_path(path, kind="adapter")
    fmt = format or detect(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    reader = FORMATS[fmt].read
    accepted = inspect.signature(reader).parameters
    try:
        adapter = reader(path, **{k: v for k, v in options.items() if v is not None and k in accepted})
    except LoraToolsError as e:  # say which input a module-level error is about
        if path in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    if check:
        from ..validate import check_adapter, raise_errors

        raise_errors(check_adapter(adapter), path)
    return adapter


def write_adapter(adapter: LoraAdapter, path, format: Optional[str] = None, overwrite: bool = False,
                  metadata: Optional[Dict[str, str]] = None, base=None) -> str:
    """Write atomically: the output appears complete or not at all. Returns the path written.
    `base` goes to writers that take it (GGUF: the model whose names and layout to use)."""
    fmt = format or adapter.format
    if fmt not in WRITABLE:
        raise UsageError(f"cannot write format {fmt!r}: use one of {', '.join(WRITABLE)}")
    if fmt != adapter.format:  # a format's own config (key maps, patterns) means nothing to another
        adapter = dataclasses.replace(adapter, config={})
    with atomic_output(path, overwrite=overwrite, directory=fmt in FOLDER_FORMATS) as tmp:
        writer = FORMATS[fmt].write
        extra = {"base": base} if "base" in inspect.signature(writer).parameters else {}
        writer(adapter, tmp, metadata=metadata, **extra)
    return os.path.abspath(os.fspath(path))
