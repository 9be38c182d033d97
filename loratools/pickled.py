"""PyTorch pickles (`.bin`, `.pt`, `.ckpt`) loaded safely: only through `weights_only=True`, never
from a FIFO or device, and never a zip archive with compressed records (`torch.save` never
compresses; a DEFLATE record can expand a small file into gigabytes before any check)."""
from __future__ import annotations

import os
import zipfile
from typing import Dict

import torch

from . import paths
from .errors import FormatError


def _check_archive(path: str, f) -> None:
    if not zipfile.is_zipfile(f):
        f.seek(0)
        return  # torch's legacy (pre-1.6) format: a plain pickle stream, nothing to expand
    f.seek(0)
    size = os.fstat(f.fileno()).st_size
    try:
        records = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FormatError(f"{path}: not a valid PyTorch archive ({e})") from None
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise FormatError(f"{path}: holds compressed records ({packed[0]}); torch.save never compresses, so this "
                          "file was not written by PyTorch: refusing to expand it")
    if sum(r.file_size for r in records) > size:
        raise FormatError(f"{path}: its records claim more bytes than the file holds")
    f.seek(0)


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle: a dict of tensors (or a `state_dict` entry holding one)."""
    try:
        with paths.open_input(path, "rb") as f:
            _check_archive(path, f)
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except FormatError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise FormatError(f"{path}: cannot be loaded safely ({e.__class__.__name__}: {msg})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise FormatError(f"{path}: expected a dict of tensors")
    return dict(sd)
