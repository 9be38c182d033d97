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
from . import diffusers, kohya, lycoris, peft, peft_diffusion

# name -> module; order is detection order. Single-file formats write a file, peft a folder.
FORMATS: Dict[str, object] = {"peft": peft, "peft_diffusion": peft_diffusion, "diffusers": diffusers,
                              "lycoris": lycoris, "kohya": kohya}
FOLDER_FORMATS = {"peft", "peft_diffusion"}
WRITABLE = ("peft", "peft_diffusion", "diffusers", "kohya")
# one-file formats that also have a folder form (and the file's name in it)
FOLDER_FILE_NAMES = {"diffusers": diffusers.WEIGHTS}


def output_is_folder(path, fmt: str) -> bool:
    """What `-o` asks for: a `.safetensors` suffix is one file, a trailing `/` or no suffix a
    folder. Raises UsageError, with the reason, when format `fmt` cannot be written that way."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or not os.path.splitext(os.path.basename(text))[1]:
        if fmt in FOLDER_FORMATS or fmt in FOLDER_FILE_NAMES:
            return True
        raise UsageError(f"{text}: {fmt} is one .safetensors file, not a folder: give -o NAME.safetensors")
    if fmt in FOLDER_FORMATS:
        raise UsageError(f"{text}: {fmt} is a folder (adapter_config.json + adapter_model.safetensors), not one "
                         f"file: give -o without the {os.path.splitext(text)[1]} suffix")
    return False


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
        from ..validation import check_adapter, raise_errors

        raise_errors(check_adapter(adapter), path)
    return adapter


def write_adapter(adapter: LoraAdapter, path, format: Optional[str] = None, overwrite: bool = False,
                  metadata: Optional[Dict[str, str]] = None) -> str:
    """Write atomically: the output appears complete or not at all. Returns the path written."""
    fmt = format or adapter.format
    if fmt not in WRITABLE:
        raise UsageError(f"cannot write format {fmt!r}: use one of {', '.join(WRITABLE)}")
    if fmt != adapter.format:  # a format's own config (key maps, patterns) means nothing to another
        adapter = dataclasses.replace(adapter, config={})
    folder = output_is_folder(path, fmt)
    with atomic_output(path, overwrite=overwrite, directory=folder) as tmp:
        # a one-file format asked for as a folder writes its file under the name its loaders look for
        target = tmp if fmt in FOLDER_FORMATS or not folder else os.path.join(tmp, FOLDER_FILE_NAMES[fmt])
        FORMATS[fmt].write(adapter, target, metadata=metadata)
    return os.path.abspath(os.fspath(path))
