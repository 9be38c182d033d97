"""Helpers for the single-file formats (kohya, diffusers, LyCORIS): peek at keys, load tensors."""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import pickled, safetensors_io
from ..errors import FormatError, InputNotFoundError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def peek_keys(path: str) -> Optional[List[str]]:
    """Tensor names of a safetensors file from its header alone; None if it is not one.
    Cached per file version: detection asks every format in turn."""
    if not os.path.isfile(path) or path.endswith(PICKLE_SUFFIXES):
        return None
    st = os.stat(path)
    return _peek(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _peek(path: str, mtime_ns: int, size: int) -> Optional[List[str]]:
    try:
        with safetensors_io.SafetensorsFile(path) as f:
            return list(f.tensors)
    except FormatError:
        return None


def load(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of one adapter file. Pickles only through `weights_only=True`."""
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a folder, expected an adapter file")
    if not os.path.exists(path):
        raise InputNotFoundError(f"{path}: no such file")
    if path.endswith(PICKLE_SUFFIXES):
        return pickled.load_state_dict(path), {}
    return safetensors_io.load(path)


def scalar(t: torch.Tensor, what: str) -> float:
    if t.numel() != 1:
        raise FormatError(f"{what} must be a scalar, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:  # True would read as 1: a number was meant, or the key is not an alpha
        raise FormatError(f"{what} must be a number, got a {t.dtype} tensor")
    return float(t.reshape(()).item())


def alpha_tensor(alpha: float, dtype_name: Optional[str], like: torch.dtype) -> torch.Tensor:
    """A scalar alpha tensor: in the dtype it was read with if known, else the factors' dtype when
    that holds the value exactly, else float32 (never round an alpha silently)."""
    if dtype_name in safetensors_io.DTYPES:
        return torch.tensor(alpha, dtype=safetensors_io.DTYPES[dtype_name])
    for dtype in (like, torch.float32):
        if dtype.is_floating_point and float(torch.tensor(alpha, dtype=dtype)) == alpha:
            return torch.tensor(alpha, dtype=dtype)
    return torch.tensor(alpha, dtype=torch.float64)
