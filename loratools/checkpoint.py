"""Streaming access to model checkpoints: a folder with one or more .safetensors shards.

`Checkpoint` indexes every tensor's name, dtype and shape from the shard headers alone.
`rewrite` produces a copy of a checkpoint tensor by tensor (one shard open, one tensor in
memory at a time), keeping the shard layout and index and copying the folder's other files.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import safetensors_io
from .errors import FormatError, InputNotFoundError
from .safetensors_io import SafetensorsFile, TensorInfo

INDEX_SUFFIX = ".safetensors.index.json"


class Checkpoint:
    """A model folder (or a single .safetensors file), read lazily."""

    def __init__(self, path: str):
        if not os.path.exists(os.fspath(path)):  # a Hub reference (user/repo[@rev][/sub], hf://…)
            from .hub import local_path
            path = local_path(path, kind="model")
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):
            raise InputNotFoundError(f"{path}: no such file or folder")
        self.index_file: Optional[str] = None
        self.index: Optional[dict] = None
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise FormatError(f"{path}: expected a .safetensors file or a model folder")
            self.folder, self.shards = os.path.dirname(path), [os.path.basename(path)]
        else:
            self.folder = path
            self.shards = self._find_shards()
        self.infos: Dict[str, TensorInfo] = {}
        self.shard_of: Dict[str, str] = {}
        for shard in self.shards:
            with SafetensorsFile(os.path.join(self.folder, shard)) as f:
                for name, info in f.tensors.items():
                    if name in self.infos:
                        raise FormatError(f"{self.folder}: tensor {name} appears in two shards")
                    self.infos[name], self.shard_of[name] = info, shard
        if self.index is not None:
            mapped = self.index.get("weight_map", {})
            if set(mapped) != set(self.infos) or any(self.shard_of[k] != v for k, v in mapped.items()):
                raise FormatError(f"{self.index_file}: weight_map disagrees with the shard files")

    def _find_shards(self) -> List[str]:
        indexes = sorted(glob.glob(os.path.join(self.folder, "*" + INDEX_SUFFIX)))
        if len(indexes) > 1:
            raise FormatError(f"{self.folder}: several shard indexes ({', '.join(map(os.path.basename, indexes))})")
        if indexes:
            self.index_file = indexes[0]
            try:
                with open(self.index_file, encoding="utf-8") as f:
                    self.index = json.load(f)
                shards = sorted(set(self.index["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(f"{self.index_file}: not a valid shard index ({e.__class__.__name__})") from None
            for s in shards:
                if os.path.basename(s) != s or not os.path.isfile(os.path.join(self.folder, s)):
                    raise FormatError(f"{self.index_file}: shard {s!r} is missing")
            return shards
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.folder, "*.safetensors")))
        if len(files) == 1:
            return files
        if not files:
            if glob.glob(os.path.join(self.folder, "*.bin")):
                raise FormatError(f"{self.folder}: only .bin weights found; loratools reads safetensors checkpoints "
                                  "(convert with `save_pretrained(..., safe_serialization=True)`)")
            raise FormatError(f"{self.folder}: no .safetensors weights found (expected model.safetensors or shards + index)")
        raise FormatError(f"{self.folder}: several .safetensors files and no index: {', '.join(files)}")

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.infos[name].dtype

    @property
    def weight_files(self) -> List[str]:
        files = list(self.shards)
        if self.index_file:
            files.append(os.path.basename(self.index_file))
        return files

    def iter_shard(self, shard: str) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) in file order; one tensor in memory at a time."""
        with SafetensorsFile(os.path.join(self.folder, shard)) as f:
            for name in f.keys():
                yield name, f.read(name)

    def read(self, name: str) -> torch.Tensor:
        with SafetensorsFile(os.path.join(self.folder, self.shard_of[name])) as f:
            return f.read(name)

    def metadata(self, shard: str) -> Dict[str, str]:
        with SafetensorsFile(os.path.join(self.folder, shard)) as f:
            return dict(f.metadata)


def copy_other_files(src_folder: str, dst_folder: str, skip: List[str]) -> None:
    """Copy config, tokenizer and everything else that is not a weight file."""
    for entry in sorted(os.listdir(src_folder)):
        if entry in skip or entry.startswith("."):
            continue
        s, d = os.path.join(src_folder, entry), os.path.join(dst_folder, entry)
        if os.path.isdir(s):
            shutil.copytree(s, d, symlinks=False)
        else:
            shutil.copy2(s, d)


def rewrite_file(src: str, dst: str, transform: Callable[[str, torch.Tensor], torch.Tensor],
                 out_dtype: Callable[[str], torch.dtype], on_tensor: Optional[Callable[[str], None]] = None,
                 unchanged: Optional[Callable[[str], bool]] = None,
                 scratch: Optional[safetensors_io.ScratchBuffer] = None) -> int:
    """Stream one safetensors file through `transform` into `dst` (same names, order and metadata);
    see `rewrite`. Returns the bytes of tensor data written."""
    scratch = scratch if scratch is not None else safetensors_io.ScratchBuffer()
    with SafetensorsFile(src) as f:
        names = f.keys()
        entries = [(n, out_dtype(n), f.tensors[n].shape) for n in names]
        writer = safetensors_io.StreamingWriter(dst, entries, f.metadata or None)
        try:
            for name in names:
                if unchanged is not None and unchanged(name) and out_dtype(name) == f.tensors[name].dtype:
                    writer.copy_from(name, f)
                else:
                    writer.write(name, transform(name, f.read(name, scratch)))
                if on_tensor:
                    on_tensor(name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return writer.data_size


def rewrite(ckpt: Checkpoint, dst_folder: str,
            transform: Callable[[str, torch.Tensor], torch.Tensor],
            out_dtype: Callable[[str], torch.dtype],
            on_tensor: Optional[Callable[[str], None]] = None,
            copy_others: bool = True,
            unchanged: Optional[Callable[[str], bool]] = None) -> None:
    """Write `transform(name, tensor)` for every tensor into `dst_folder`, shard by shard.

    `out_dtype(name)` must say up front what dtype each output tensor will have, so the
    header can be written before the data. `on_tensor` is called after each tensor (progress).
    Tensors for which `unchanged(name)` is true (and whose dtype stays) are copied byte for byte
    without being read into memory. The tensor handed to `transform` lives in a reused buffer:
    it is valid only until `transform` returns (copy it to keep it).
    """
    total = 0
    scratch = safetensors_io.ScratchBuffer()
    for shard in ckpt.shards:
        total += rewrite_file(os.path.join(ckpt.folder, shard), os.path.join(dst_folder, shard),
                              transform, out_dtype, on_tensor, unchanged, scratch)
    if ckpt.index is not None:
        index = dict(ckpt.index)
        index["metadata"] = dict(index.get("metadata") or {}, total_size=total)
        with open(os.path.join(dst_folder, os.path.basename(ckpt.index_file)), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
            fh.write("\n")
    if copy_others:
        copy_other_files(ckpt.folder, dst_folder, ckpt.weight_files)
