"""A collection of adapters: find them under folders, globs and Hub references, describe each
from its header (no tensor data but scalars), find duplicates by tensor content, and say which fit
a base model. What `loratools ls` and `loratools compat` show, and how batch commands find inputs."""
from __future__ import annotations

import glob
import hashlib
import os
import re
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from . import refs, safetensors_io
from .adapter import LoraAdapter
from .archs.family import adapter_family
from .errors import LoraToolsError, UsageError
from .formats import FORMATS, adapter_files, detect, fetch_adapter, read_adapter
from .inspection import disk_bytes, module_rows, target_kind
from .loaders import compatibility
from .checks import check_base

MAX_ENTRIES = 200_000  # folder entries one walk may visit before it stops with a message
_GLOB = re.compile(r"[*?\[]")
_CHUNK = 1 << 20


@dataclass
class Entry:
    """One input found: the path as the user can read it, or why nothing could be found there."""
    path: str
    error: Optional[str] = None


def is_adapter_folder(path: str) -> bool:
    """A folder format's folder, or one that holds one of its files (even a broken one: it is one
    adapter with a problem, not a collection)."""
    if not os.path.isdir(path):
        return False
    folders = [f for f in FORMATS.values() if f.folder]
    return any(f.detect(path) for f in folders) or any(
        os.path.lexists(os.path.join(path, d, name)) for f in folders for group in f.files for name in group
        for d in ("",) + tuple(f.subfolders))


def walk(root: str, max_entries: int = MAX_ENTRIES) -> List[str]:
    """Adapters under `root`, in path order: adapter folders (not descended into) and .safetensors
    files. Symlinked and hidden folders are not entered (nothing outside the tree is walked)."""
    found: List[str] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        seen += len(dirnames) + len(filenames)
        if seen > max_entries:
            raise UsageError(f"{root}: more than {max_entries:,} folder entries; name a smaller folder "
                             "or raise --max-entries")
        if dirpath != root and is_adapter_folder(dirpath):
            found.append(dirpath)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d)))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".safetensors")]
    return found


def _through_link(pattern: str, match: str) -> bool:
    """Does `match` lie in a symlinked folder below the pattern's fixed part (`**` follows links)?"""
    fixed = pattern[:_GLOB.search(pattern).start()]
    root = os.path.dirname(fixed) if not fixed.endswith(os.sep) else fixed.rstrip(os.sep)
    rel = os.path.relpath(os.path.dirname(match) or ".", root or ".")  # `lora*` matches `lora`
    parts = [] if rel == "." else rel.split(os.sep)
    return any(os.path.islink(os.path.join(root, *parts[:i + 1])) for i in range(len(parts)))


def expand(paths: Iterable[str], max_entries: int = MAX_ENTRIES) -> List[Entry]:
    """Every adapter the arguments name: a file or adapter folder as it is, other folders searched
    recursively, globs expanded (also `**`), Hub references kept for the reader to fetch.
    A name that matches nothing becomes an Entry with its reason; duplicates are listed once."""
    out: List[Entry] = []
    for arg in paths:
        arg = os.fspath(arg)
        if os.path.exists(arg):
            matches = [arg]
        elif _GLOB.search(arg):
            matches = [m for m in sorted(glob.glob(arg, recursive=True)) if not _through_link(arg, m)]
            if not matches:
                out.append(Entry(arg, "no file or folder matches this pattern"))
        elif refs.parse_ref(arg) is not None:
            out.append(Entry(arg))
            continue
        else:
            out.append(Entry(arg, "no such file or folder"))
            continue
        for m in matches:
            if os.path.isdir(m) and not is_adapter_folder(m):
                out += [Entry(p) for p in walk(m, max_entries)]
            else:
                out.append(Entry(m))
    unique: Dict[str, Entry] = {}
    for e in out:
        key = e.path if e.error or not os.path.exists(e.path) else os.path.realpath(e.path)
        unique.setdefault(key, e)
    return list(unique.values())


def collection_inputs(paths: Iterable[str]) -> Optional[List[Entry]]:
    """The inputs of a batch command, or None when the arguments are one adapter (a file, an
    adapter folder or a Hub reference): that keeps its single-input behaviour."""
    paths = list(paths)
    if len(paths) == 1:
        p = paths[0]
        # anything but a folder (a file, a device, a FIFO: the command says what is wrong with it)
        # a model or pipeline folder (config.json / model_index.json) is one input too: the command
        # says it is a base model, not a collection of adapters
        model = os.path.isdir(p) and any(os.path.isfile(os.path.join(p, f))
                                         for f in ("config.json", "model_index.json"))
        single = (os.path.lexists(p) and not os.path.isdir(p)) or is_adapter_folder(p) or model or (
            not os.path.exists(p) and not _GLOB.search(p))
        if single:
            return None
    return expand(paths)


def header_adapter(path: str) -> LoraAdapter:
    """The adapter at `path` from its headers, config and scalar tensors: factors are meta tensors
    (shapes and dtypes only). LyCORIS LoHa/LoKr need their data to be factored, so read in full."""
    if detect(path) == "lycoris":
        return read_adapter(path, check=False, keep_unmatched=True)
    with safetensors_io.headers_only():
        return read_adapter(path, check=False, keep_unmatched=True)


def one_line(e: BaseException, path: str = "") -> str:
    """What went wrong with one input, on one line, without repeating its path."""
    if isinstance(e, OSError) and not isinstance(e, LoraToolsError) and e.strerror:
        text = f"{e.filename + ': ' if e.filename else ''}{e.strerror}"
    else:
        text = (str(e).splitlines() or [""])[0]
        text = text if isinstance(e, LoraToolsError) else f"{e.__class__.__name__}: {text}"
    for p in (path, os.path.abspath(path)) if path else ():
        if text.startswith(p + ": "):
            return text[len(p) + 2:]
    return text


# ---------------------------------------------------------------- ls rows

@dataclass
class Row:
    path: str
    format: Optional[str] = None
    family: Optional[str] = None
    base: Optional[str] = None
    modules: int = 0
    targets: List[str] = field(default_factory=list)
    ranks: List[int] = field(default_factory=list)
    alphas: List[float] = field(default_factory=list)
    dora: bool = False
    dtype: Optional[str] = None
    size: Optional[int] = None
    hash: Optional[str] = None
    loads_in: List[str] = field(default_factory=list)  # loaders.LOADERS that load the file as it is
    error: Optional[str] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def describe(entry: Entry, content_hash: bool = False) -> Row:
    """The row `ls` shows for one input; an unreadable one gets its one-line reason, never raises
    (except on an interrupt)."""
    if entry.error:
        return Row(entry.path, error=entry.error)
    try:
        local = refs.existing_path(entry.path, fetch_adapter)
        adapter = header_adapter(local)
        rows = module_rows(adapter, norms=False)
        fam = adapter_family(adapter)
        base = adapter.base_model or adapter.metadata.get("ss_sd_model_name") or None
        row = Row(entry.path, adapter.format, fam[0] if fam else None, base, len(adapter),
                  sorted(Counter(target_kind(m.name) for m in adapter)),
                  sorted({int(r["rank"]) for r in rows}), sorted({_number(r["alpha"]) for r in rows}),
                  adapter.is_dora, sorted({r["dtype"] for r in rows})[0] if rows else None, disk_bytes(local))
        row.loads_in = [name for name, r in compatibility(adapter).items() if r["ok"]]
        if content_hash:
            row.hash = tensor_hash(local, adapter)
        return row
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a listing shows every file's problem and goes on
        return Row(entry.path, error=one_line(e, entry.path))


def norm_family(name: str) -> str:
    """'SD 1.x' / 'sd1' / 'SD1.x' -> 'sd1'; 'SDXL' -> 'sdxl': how --family compares names."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace(".x", ""))


def select(rows: List[Row], family: Optional[str] = None, base: Optional[str] = None) -> List[Row]:
    """Rows whose family is `family` and whose base model name contains `base` (case-insensitive);
    unreadable rows stay so their problem is seen."""
    def keep(r: Row) -> bool:
        if r.error:
            return True
        if family and norm_family(r.family or "") != norm_family(family):
            return False
        return not base or base.lower() in (r.base or "").lower()
    return [r for r in rows if keep(r)]


SORTS = {
    "path": lambda r: (r.path,),
    "size": lambda r: (r.size or 0, r.path),
    "rank": lambda r: (max(r.ranks, default=0), r.path),
    "family": lambda r: (r.family or "~", r.path),
}


# ---------------------------------------------------------------- duplicates

def data_hash(path: str) -> str:
    """sha256 of a safetensors file's tensor bytes (everything after the header), as sd-scripts'
    `addnet_hash_safetensors` computes `sshs_model_hash`; of the whole file for anything else."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_hash(path: str, adapter: LoraAdapter) -> str:
    """Content hash of an adapter's tensors. One safetensors file: its sshs_model_hash (equal to
    that metadata key in a file sd-scripts wrote). A folder: its tensor files' hashes and the
    per-module alpha and rsLoRA from its config (where PEFT keeps the scale)."""
    files = adapter_files(path, adapter)
    if os.path.isfile(path):
        return data_hash(path)
    h = hashlib.sha256()
    for name in sorted(files):
        if name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{data_hash(files[name])}\n".encode())
    for m in sorted(adapter, key=lambda m: m.name):
        h.update(f"{m.name}:{m.alpha_value!r}:{m.use_rslora}\n".encode())
    return h.hexdigest()


def duplicates(rows: List[Row]) -> List[List[Row]]:
    """Groups (two or more) of rows with the same tensor hash, largest group first."""
    groups: Dict[str, List[Row]] = {}
    for r in rows:
        if r.hash:
            groups.setdefault(r.hash, []).append(r)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0].path))


# ---------------------------------------------------------------- compat

@dataclass
class Fit:
    path: str
    fits: bool
    matched: int = 0
    modules: int = 0
    problem: Optional[str] = None

    def as_dict(self) -> dict:
        return asdict(self)


def compat(entry: Entry, base) -> Fit:
    """Does the adapter fit `base` (a Base from `bases.open_base`): every module names a weight of
    the base with the shape its update has? Headers only, on both sides."""
    if entry.error:
        return Fit(entry.path, False, problem=entry.error)
    try:
        adapter = header_adapter(refs.existing_path(entry.path, fetch_adapter))
        if hasattr(base, "fit"):  # a diffusion base takes linear factors on 1x1 convs, as merge does
            adapter = base.fit(adapter)
        errs = [f for f in check_base(adapter, base) if f.severity == "error"]
        bad = {f.module for f in errs}
        matched = sum(m.name not in bad for m in adapter)
        problem = None
        if errs:
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            problem = errs[0].message + more
        return Fit(entry.path, not errs and len(adapter) > 0, matched, len(adapter), problem)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one adapter's problem never stops the others
        return Fit(entry.path, False, problem=one_line(e, entry.path))


def summary(rows: List[Row]) -> Tuple[int, int]:
    """(readable, unreadable)."""
    bad = sum(r.error is not None for r in rows)
    return len(rows) - bad, bad
