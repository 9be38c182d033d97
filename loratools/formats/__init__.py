"""Adapter formats: detect, read and write. One module per format, each ending in a `FORMAT`
record (`record.Format`: name, detect, read, write or None, file or folder, its file names, its
reader options); `FORMATS` below is the one registry that the CLI choices, the Hub download
patterns (`fetch_adapter`) and push's file lists (`adapter_files`) read.
Reader options (passed only to readers that take them): `base` (a model folder whose module
names resolve flattened kohya names), `allow_unmatched`, `rank` (LyCORIS factoring rank)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

from .. import paths, refs, safetensors_io
from ..adapter import LoraAdapter, fold_scales
from ..atomic import atomic_output
from ..errors import FormatError, HubError, IncompatibleError, LoraToolsError, UsageError
from ..checks import check_adapter, raise_errors
from . import comfyui, diffusers, gguf, kohya, lycoris, peft, peft_diffusion, xlabs
from .record import Format

# name -> record; order is detection order
FORMATS: Dict[str, Format] = {f.name: f for f in (gguf.FORMAT, peft.FORMAT, peft_diffusion.FORMAT, comfyui.FORMAT,
                                                  diffusers.FORMAT, lycoris.FORMAT, kohya.FORMAT, xlabs.FORMAT)}
WRITABLE = tuple(name for name, f in FORMATS.items() if f.write is not None)
# what can be written without a base model (GGUF needs one for llama.cpp's names and layout)
DORA_IN_FORMATS = ("kohya", "comfyui")
WRITABLE_ALONE = tuple(name for name in WRITABLE if "base" not in FORMATS[name].write_options)


def output_is_folder(path, fmt: str) -> bool:
    """What `-o` asks for: a `.safetensors` suffix is one file, a trailing `/` or no suffix a
    folder. Raises UsageError, with the reason, when format `fmt` cannot be written that way
    (a one-file format with named files, e.g. diffusers, also writes a folder holding that file)."""
    text = os.fspath(path)
    record = FORMATS[fmt]
    if text.endswith(("/", os.sep)) or not os.path.splitext(os.path.basename(text))[1]:
        if record.folder or record.files:
            return True
        raise UsageError(f"{text}: {fmt} is one .safetensors file, not a folder: give -o NAME.safetensors")
    if record.folder:
        raise UsageError(f"{text}: {fmt} is a folder (adapter_config.json + adapter_model.safetensors), not one "
                         f"file: give -o without the {os.path.splitext(text)[1]} suffix")
    return False


def _hub_layout(pre: str):
    """(folder formats, named single files, folders to look in) for a Hub reference to folder `pre`."""
    folder_formats = [f for f in FORMATS.values() if f.folder and f.files]
    named_files = [f.files[0][0] for f in FORMATS.values() if not f.folder and f.files]
    dirs = list(dict.fromkeys(pre + d for f in folder_formats for d in [""] + [s + "/" for s in f.subfolders]))
    return folder_formats, named_files, dirs


def hub_adapter_files(ref: refs.HubRef, exists: Callable[[str], bool],
                      listing: Callable[[], List[str]]) -> Tuple[str, List[str]]:
    """(the adapter's folder or file, its files), as paths in the repository, for the Hub reference
    `ref` to a folder: a folder format's files, a named single file, else the folder's one
    .safetensors (or .gguf) file. `exists(path)` says whether a file is there (fetch_adapter: in its
    snapshot; a dry run: in the listing); `listing()` lists the repository's files."""
    pre = ref.subfolder + "/" if ref.subfolder else ""
    folder_formats, named_files, dirs = _hub_layout(pre)
    files = [next((d + n for n in group if exists(d + n)), d + group[-1])  # e.g. an older PEFT .bin
             for f in folder_formats for d in dirs if exists(d + f.marker) for group in f.files]
    if files:
        return ref.subfolder, files
    for name in named_files:
        if exists(pre + name):
            return pre + name, [pre + name]
    listed = [f for f in listing() if f.startswith(pre) and "/" not in f[len(pre):]]
    for suffix in dict.fromkeys(f.suffix for f in FORMATS.values() if not f.folder):  # .safetensors, .gguf
        found = [f for f in listed if f.endswith(suffix)]
        if len(found) == 1:
            return found[0], found
        if found:
            shown = ", ".join(f"{ref.repo_id}/{f}" for f in sorted(found)[:4])
            raise HubError(f"{ref}: several {suffix} files; name one, e.g. {shown}")
    looked = ", ".join(dict.fromkeys([f.marker for f in folder_formats] + named_files))
    raise HubError(f"{ref}: no LoRA adapter found (looked for {looked} or a single .safetensors or .gguf file)")


def fetch_adapter(ref: refs.HubRef) -> str:
    """Download only the adapter files a Hub reference names (the patterns come from the format
    records, the choice from hub_adapter_files). Returns the local folder or file."""
    pre = ref.subfolder + "/" if ref.subfolder else ""
    folder_formats, named_files, dirs = _hub_layout(pre)
    allow = [d + group[0] for f in folder_formats for d in dirs for group in f.files] + [pre + n for n in named_files]
    snap = refs.snapshot(ref, list(dict.fromkeys(allow)))

    def local(path: str) -> str:
        return os.path.join(snap, *path.split("/"))

    where, files = hub_adapter_files(ref, lambda p: os.path.isfile(local(p)), lambda: refs.repo_files(ref, snap))
    for path in files:
        if not os.path.isfile(local(path)):
            fetched = refs.fetch_file(ref, path)
            if path == where:
                return fetched
    return local(where)


def adapter_files(path: str, adapter: LoraAdapter) -> Dict[str, str]:
    """The files that make up the adapter read from `path`, keyed by their name in the repository."""
    if os.path.isfile(path):
        return {os.path.basename(path): path}
    fmt = FORMATS.get(adapter.format)
    if fmt is not None and fmt.files:
        out: Dict[str, str] = {}
        for d in [""] + [s + "/" for s in fmt.subfolders]:
            if not any(os.path.isfile(os.path.join(path, d, n)) for n in fmt.files[0]):
                continue
            for group in fmt.files:
                name = next((n for n in group if os.path.isfile(os.path.join(path, d, n))), group[-1])
                out[d + name] = os.path.join(path, d, name)
        return out
    return {f: os.path.join(path, f) for f in sorted(os.listdir(path))
            if not f.startswith(".") and f != "README.md" and os.path.isfile(os.path.join(path, f))}


def detect(path: str) -> str:
    path = refs.existing_path(path, fetch_adapter)  # also a Hub reference
    for name, fmt in FORMATS.items():
        if fmt.detect(path):
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
    path = refs.existing_path(path, fetch_adapter)
    fmt = format or detect(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    record = FORMATS[fmt]
    try:
        adapter = record.read(path, **{k: v for k, v in options.items() if v is not None and k in record.options})
    except LoraToolsError as e:  # say which input a module-level error is about
        if path in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    if check:
        raise_errors(check_adapter(adapter), path)
    return adapter

# formats whose loaders scale every module by one alpha / rank (GGUF always folds the rest into B)
ONE_ALPHA = ("peft", "peft_diffusion", "gguf")


def check_uniform_scale(fmt: str) -> None:
    if fmt not in ONE_ALPHA:
        raise UsageError(f"--uniform-scale applies to PEFT output (--to peft / peft_diffusion); {fmt} files "
                         "store each module's own alpha")


def uniform(adapter: LoraAdapter, fmt: str, on: bool) -> LoraAdapter:
    """`adapter` with every module's scale folded into B under one alpha when `on` (`--uniform-scale`)."""
    if not on:
        return adapter
    check_uniform_scale(fmt)
    return fold_scales(adapter)


@paths.guarded
def write_adapter(adapter: LoraAdapter, path, format: Optional[str] = None, overwrite: bool = False,
                  metadata: Optional[Dict[str, str]] = None, **options) -> str:
    """Write atomically: the output appears complete or not at all. Returns the path written.
    `options` not None go to writers that take them (`Format.write_options`; GGUF: `base`)."""
    fmt = writable_format(adapter, format)
    folder = output_is_folder(path, fmt)
    with atomic_output(path, overwrite=overwrite, directory=folder) as tmp:
        write_into(adapter, tmp, fmt, metadata, folder, **options)
    return os.path.abspath(os.fspath(path))


def check_writable_alone(fmt: str, command: str) -> None:
    """Refuse a format `command` cannot write without a base model (GGUF), saying how to get it."""
    if fmt not in WRITABLE_ALONE:
        hint = (f"; {command} to peft, then `loratools convert --to {fmt} --base MODEL`" if fmt in WRITABLE else "")
        raise UsageError(f"cannot write format {fmt!r} here: use one of {', '.join(WRITABLE_ALONE)}{hint}")


def writable_format(adapter: LoraAdapter, format: Optional[str]) -> str:
    fmt = format or adapter.format
    # kohya and ComfyUI files hold a LoRA with a DoRA normed per input column as it was read (`dora_scale`)
    ops = [m for m in adapter if m.op is not None and not (m.op.algo == "dora" and fmt in DORA_IN_FORMATS)]
    if ops:
        raise IncompatibleError(
            f"module {ops[0].name}: a LyCORIS {ops[0].op.label} update is no LoRA ({len(ops)} such module(s)); "
            "factor it with `convert --base BASE --rank K` (retained energy reported), or merge it")
    flat = adapter.config.get("flat") or {}
    if flat:  # a LyCORIS conv update whose kernel no name list knew
        name = sorted(flat)[0]
        raise IncompatibleError(f"module {name}: {flat[name]}")
    if fmt not in WRITABLE:
        raise UsageError(f"cannot write format {fmt!r}: use one of {', '.join(WRITABLE)}")
    return fmt


def write_into(adapter: LoraAdapter, tmp: str, format: str, metadata: Optional[Dict[str, str]] = None,
               folder: Optional[bool] = None, **options) -> None:
    """Write `adapter` to the temporary path `tmp` (a folder when `folder`, by default for folder
    formats), not atomically."""
    folder = FORMATS[format].folder if folder is None else folder
    stacks = [m.param for m in adapter if m.expert is not None]
    if stacks and format != "peft":  # no other format has a key for one expert of a fused stack
        raise IncompatibleError(f"{stacks[0]}: LoRAs on fused expert stacks (PEFT target_parameters) are written "
                                f"as PEFT only, not {format}")
    if format != adapter.format:  # a format's own config (key maps, patterns) means nothing to another
        adapter = dataclasses.replace(adapter, config={})
    record = FORMATS[format]
    # a one-file format asked for as a folder writes its file under the name its loaders look for
    target = os.path.join(tmp, record.marker) if folder and not record.folder else tmp
    record.write(adapter, target, metadata=metadata,
                 **{k: v for k, v in options.items() if v is not None and k in record.write_options})
