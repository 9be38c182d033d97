"""A checked, streaming safetensors reader and writer.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the raw tensor bytes.
The reader validates the whole header (length, JSON, dtypes, shapes against byte counts,
offsets inside the file, no overlaps) before it allocates anything, and reads one tensor at a
time (or a range of its rows) with positional reads (no mmap, so memory stays near what is read).
The writer takes all names, dtypes and shapes up front, writes the header, then accepts each
tensor's bytes at its fixed place, in pieces and from any thread.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import math
import os
import struct
import sys
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from . import paths
from .errors import FormatError, InputNotFoundError

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
# set by `headers_only()`: `load` then reads no tensor data beyond scalars
_HEADERS_ONLY = contextvars.ContextVar("loratools_headers_only", default=False)
# entries a header may list: each non-empty tensor needs at least one byte of data, and real files
# hold few empty ones; the largest real shards list ~10^5 tensors. Checked before the JSON is parsed.
MAX_TENSORS, MAX_EMPTY = 500_000, 4096


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * dtype.itemsize


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: torch.dtype, shape: Tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


class SafetensorsFile:
    """Read-only view of one .safetensors file; use as a context manager."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise FormatError(f"{self.path}: is a directory, expected a .safetensors file")
        try:
            self._f = paths.open_input(self.path, "rb")
        except FileNotFoundError:
            raise InputNotFoundError(f"{self.path}: no such file") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot be read ({e.strerror})") from None
        try:
            self.metadata, self.tensors, self.data_start = self._parse()
        except Exception:
            self._f.close()
            raise

    def _bad(self, why: str) -> FormatError:
        return FormatError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse(self):
        size = os.fstat(self._f.fileno()).st_size
        if size < 8:
            raise self._bad(f"file is {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", self._f.read(8))
        if n > min(size - 8, MAX_HEADER):
            raise self._bad(f"header length {n} exceeds the file ({size} bytes)")
        raw = self._f.read(n)
        listed, data_size = raw.count(b'"data_offsets"'), size - 8 - n
        if listed > min(MAX_TENSORS, data_size + MAX_EMPTY):
            raise self._bad(f"the header lists {listed:,} tensors for {data_size:,} bytes of data")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, absurd numbers or nesting
            raise self._bad(f"header is not JSON ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._bad("__metadata__ must map strings to strings")
        tensors: Dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._entry(name, entry, data_size)
        spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
        for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._bad(f"tensors {n0} and {n1} overlap")
        return meta, tensors, 8 + n

    def _entry(self, name: str, entry, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._bad(f"entry {name!r} is not an object")
        dt = entry.get("dtype")
        if dt not in DTYPES:
            raise self._bad(f"tensor {name!r} has unknown dtype {dt!r}")
        shape, offs = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in shape):
            raise self._bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if math.prod(x for x in shape if x) >= 1 << 62:  # torch's sizes are int64, even with a 0 dim
            raise self._bad(f"tensor {name!r} has an impossible shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in offs)):
            raise self._bad(f"tensor {name!r} has invalid data_offsets {offs!r}")
        b, e = offs
        if not 0 <= b <= e <= data_size:
            raise self._bad(f"tensor {name!r} lies outside the file (offsets {b}..{e}, data {data_size} bytes)")
        dtype = DTYPES[dt]
        if e - b != nbytes(dtype, shape):
            raise self._bad(f"tensor {name!r}: {e - b} bytes do not match shape {shape} of {dt}")
        return TensorInfo(name, dtype, tuple(shape), b, e)

    def keys(self) -> List[str]:
        """Names in file order (by offset), the order that reads fastest."""
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: (t.begin, t.name))]

    def read(self, name: str, scratch: Optional["ScratchBuffer"] = None) -> torch.Tensor:
        """The tensor `name`. With `scratch`, the bytes land in a reused buffer (valid until the
        next read into it): fresh memory costs a page fault per 4 KiB, which dominates big copies."""
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1, scratch)

    def row_bytes(self, name: str) -> int:
        """Bytes per row (first dimension) of tensor `name`; a scalar is one row."""
        info = self.tensors[name]
        return nbytes(info.dtype, info.shape[1:])

    def read_rows(self, name: str, start: int, stop: int, scratch: Optional["ScratchBuffer"] = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (see `read` for `scratch`). Positional reads only
        (no seek), so several threads may read one file."""
        info = self.tensors[name]
        row = self.row_bytes(name)
        size = (stop - start) * row
        buf = scratch.get(size) if scratch is not None else torch.empty(size, dtype=torch.uint8)
        pos, got = self.data_start + info.begin + start * row, 0
        while got < size:  # a read may return less than asked (signals, huge requests)
            n = os.preadv(self._f.fileno(), [buf[got:].numpy()], pos + got)
            if n <= 0:
                raise self._bad(f"tensor {name!r} is truncated")
            got += n
        shape = ((stop - start),) + tuple(info.shape[1:]) if info.shape else ()
        return buf.view(info.dtype).reshape(shape)

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ScratchBuffer:
    """A grow-only byte buffer reused across reads."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def get(self, size: int) -> torch.Tensor:
        if self._buf.numel() < size:
            self._buf = torch.empty(size, dtype=torch.uint8)
        return self._buf[:size]


@contextlib.contextmanager
def headers_only():
    """Within it, `load` returns tensors on the meta device (shape and dtype from the header, no
    data) except scalars (alphas), which it reads: a format reader then builds an adapter whose
    names, shapes, ranks, alphas and dtypes are real, from the header and a few bytes."""
    token = _HEADERS_ONLY.set(True)
    try:
        yield
    finally:
        _HEADERS_ONLY.reset(token)


def load(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors and the metadata of a (small) safetensors file, read with one system call into
    one buffer that the tensors are views of (thousands of small reads and allocations were most
    of the time spent reading a large kohya file). Under `headers_only()`: see there."""
    with SafetensorsFile(path) as f:
        if _HEADERS_ONLY.get():
            return {name: f.read(name) if math.prod(t.shape) <= 1
                    else torch.empty(t.shape, dtype=t.dtype, device="meta")
                    for name, t in ((n, f.tensors[n]) for n in f.keys())}, dict(f.metadata)
        size = max((t.end for t in f.tensors.values()), default=0)
        buf = torch.empty(size, dtype=torch.uint8)
        f._f.seek(f.data_start)
        if size and f._f.readinto(buf.numpy()) != size:
            raise f._bad("the tensor data is truncated")
        out = {}
        for name in f.keys():
            t = f.tensors[name]
            raw = buf[t.begin:t.end]
            if t.begin % t.dtype.itemsize:  # unaligned (other writers need not pad): copy it
                raw = raw.clone()
            out[name] = raw.view(t.dtype).reshape(t.shape)
        return out, dict(f.metadata)


class StreamingWriter:
    """Writes a safetensors file whose entries are known up front. The header is written first and
    each tensor has a fixed place, so its bytes may arrive in any order and from another thread:
    `claim` takes the next entry (in order, checked), `pwrite` / `copy_range` fill it. `write` and
    `copy_from` do both for a whole tensor."""

    def __init__(self, path: str, entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = path
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._order: List[Tuple[str, torch.dtype, Tuple[int, ...], int, int]] = []
        for name, dtype, shape in entries:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape), offset, size))
            offset += size
        self.data_size = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned
        self._f = open(path, "wb", buffering=0)  # unbuffered: large writes go straight through
        self.data_start = 8 + len(raw)
        self._written, self._lock = 0, threading.Lock()  # tensor bytes written, from any thread
        self._pwrite_all(0, struct.pack("<Q", len(raw)) + raw)
        preallocate(self._f.fileno(), self.data_start + self.data_size)
        self._next = 0

    def claim(self, name: str, dtype: torch.dtype, shape) -> int:
        """Take the next entry, which must be `name` with this dtype and shape; its file position."""
        if self._next >= len(self._order):
            raise ValueError(f"writer got {name} after its {len(self._order)} tensors")
        want_name, want_dtype, want_shape, offset, _ = self._order[self._next]
        if name != want_name or dtype != want_dtype or tuple(shape) != want_shape:
            raise ValueError(f"writer expected {want_name} {want_dtype} {want_shape}, "
                             f"got {name} {dtype} {tuple(shape)}")
        self._next += 1
        return self.data_start + offset

    def pwrite(self, pos: int, data) -> None:
        """Write all of `data` (bytes-like or a CPU tensor) at file position `pos`."""
        if isinstance(data, torch.Tensor):
            data = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        n = self._pwrite_all(pos, data)
        with self._lock:
            self._written += n

    def _pwrite_all(self, pos: int, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            view = view[os.pwrite(self._f.fileno(), view, pos + n - len(view)):]
        return n

    def copy_range(self, src_fd: int, src_pos: int, pos: int, size: int) -> None:
        """Copy `size` bytes from another file, in the kernel where possible (no user-space copy)."""
        fast, left = True, size
        while left > 0:
            n = 0
            if fast:
                try:
                    n = os.copy_file_range(src_fd, self._f.fileno(), left, src_pos, pos)
                except OSError:  # e.g. across file systems on old kernels: plain reads and writes
                    n = 0
                fast = n > 0
            if not fast:
                chunk = os.pread(src_fd, min(left, 64 << 20), src_pos)
                if not chunk:
                    raise FormatError(f"copying into {self.path}: the source is truncated")
                n = self._pwrite_all(pos, chunk)
            src_pos, pos, left = src_pos + n, pos + n, left - n
        with self._lock:
            self._written += size

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.pwrite(self.claim(name, tensor.dtype, tensor.shape), tensor.detach().to("cpu"))

    def copy_from(self, name: str, src: "SafetensorsFile") -> None:
        """Copy a tensor's bytes unchanged from another file (see `copy_range`)."""
        info = src.tensors[name]
        pos = self.claim(name, info.dtype, info.shape)
        self.copy_range(src.fileno(), src.data_start + info.begin, pos, info.end - info.begin)

    def close(self) -> None:
        # no fsync: like save_pretrained we rely on the OS for durability; atomicity comes from
        # the rename of a complete temporary output
        self._f.close()
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if self._written != self.data_size:
            raise ValueError(f"writer closed after {self._written} of {self.data_size} bytes")

    def abort(self) -> None:
        self._f.close()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Closed (and checked complete) when the block ends, aborted when it raises."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_FALLOCATE = getattr(_LIBC, "fallocate", None)
if _FALLOCATE is not None:
    _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front (Linux fallocate): writes into reserved blocks cost the file
    system less (ext4: ~1.5x faster page-cache writes), and a full disk fails here, before any data
    is written. Not os.posix_fallocate: where the file system cannot, glibc would write zeros."""
    if _FALLOCATE is None or size <= 0:
        return
    if _FALLOCATE(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))
        # EOPNOTSUPP and the like: the file system cannot; it is only an optimisation


def save(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None,
         order: Optional[List[str]] = None) -> None:
    """Write a whole dict of tensors, in `order` (default: sorted by name, as safetensors does)."""
    names = sorted(tensors) if order is None else list(order)
    with StreamingWriter(path, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names], metadata) as w:
        for n in names:
            w.write(n, tensors[n])
