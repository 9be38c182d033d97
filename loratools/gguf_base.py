"""A GGUF model (llama.cpp / Ollama) as a merge base: tensor names, types and shapes from the header,
adapter modules moved into llama.cpp's names and layout, and a streamed rewrite.

The rewrite keeps every key/value and the tensor order. Tensors no adapter touches are copied byte
for byte. Merged tensors keep their type unless `out_type` says otherwise: F32/F16/BF16 are merged
exactly (fp32 accumulation, one rounding); Q8_0/Q5_x/Q4_x are dequantized, merged in fp32 and
quantized again, and the relative error of that requantization is reported per tensor. Types the
`gguf` package cannot quantize (K-quants, i-quants) need an `out_type`; that is checked, like every
name and shape, before anything is written. Memory stays near one tensor (the file is memory-mapped).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .adapter import LoraAdapter, LoraModule
from .archs.gguf_names import GgufArch, gguf_package, to_gguf_module
from .atomic import atomic_output, check_output
from .errors import FormatError, IncompatibleError, ShapeMismatchError, UsageError
from .gguf_io import (FLOATS, REQUANTIZABLE, block_size, can_read, copy_metadata, from_torch, is_gguf, metadata,
                      new_writer, open_reader, parse_type, to_torch, type_name)

TORCH_OF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# transform(name, tensor, dtype) -> merged tensor in dtype
Transform = Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]


def is_gguf_base(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and is_gguf(os.fspath(path))


@dataclass
class GgufPlan:
    """Per merged tensor: its source and output GGML types."""

    src: Dict[str, str]
    out: Dict[str, str]


class GgufBase:
    """A GGUF model file, read lazily (memory-mapped)."""

    kind = "GGUF model"

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        self.folder = self.path  # what the CLI prints as "base"
        self.reader = open_reader(self.path)
        self.kv = metadata(self.reader)
        if self.kv.get("general.type") == "adapter":
            raise UsageError(f"{self.path}: a GGUF LoRA adapter, not a model; give the model first, then adapters")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = GgufArch.from_metadata(self.kv, set(self.tensors))
        self.shards = [os.path.basename(self.path)]
        self.infos = self.tensors

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.tensors[name].shape.tolist()))

    def fit(self, adapter: LoraAdapter) -> List[LoraModule]:
        """The adapter's modules in llama.cpp's names (`blk.0.attn_q`) and row order, checked against the file."""
        if adapter.extra:
            raise IncompatibleError(f"full tensors ({next(iter(adapter.extra))}, modules_to_save) cannot be merged "
                                    "into a GGUF model by name; merge into the Hugging Face model instead")
        out = []
        for m in adapter:
            if m.kind not in ("linear", "embedding") or m.fan_in_fan_out:
                raise IncompatibleError(f"module {m.name}: a {m.kind} module has no llama.cpp weight to merge into")
            g = to_gguf_module(m, self.arch)
            target = g.name + ".weight"
            if target not in self.tensors:
                raise IncompatibleError(f"module {m.name}: {self.path} has no tensor {target} (adapter for another "
                                        "model?)")
            if tuple(g.weight_shape) != self.shape(target):
                raise ShapeMismatchError(f"module {m.name}: update {tuple(g.weight_shape)} does not fit {target} "
                                         f"{self.shape(target)}")
            out.append(g)
        return out

    def plan_types(self, targets: Sequence[str], out_type: Optional[str]) -> GgufPlan:
        """Source and output type of every merged tensor; refuses what cannot be written, before any writing."""
        want = parse_type(out_type) if out_type else None
        src, out = {}, {}
        for name in targets:
            t = type_name(self.tensors[name])
            o = want or t
            if not can_read(t):
                raise IncompatibleError(f"{name} is {t}, which the gguf package cannot dequantize; nothing was written")
            if o not in FLOATS + REQUANTIZABLE:
                choices = ", ".join(x.lower() for x in FLOATS + REQUANTIZABLE)
                raise IncompatibleError(f"{name} is {t}, which the gguf package cannot quantize again: pass "
                                        f"--out-type ({choices}); nothing was written")
            if o in REQUANTIZABLE and self.shape(name)[-1] % block_size(o):
                raise IncompatibleError(f"{name}: rows of {self.shape(name)[-1]} cannot be split into {o} blocks of "
                                        f"{block_size(o)}; choose another --out-type")
            src[name], out[name] = t, o
        return GgufPlan(src, out)

    def rewrite(self, output: str, plan: GgufPlan, transform: Transform, overwrite: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
        """Write the merged model to `output` (atomically). Returns, per requantized tensor, the relative
        Frobenius error ||Q(W') - W'|| / ||W'|| that the requantization added."""
        output = check_output(output, overwrite)
        if os.path.exists(output) and os.path.samefile(output, self.path):
            raise UsageError("the output must not be the base file itself")
        errors: Dict[str, float] = {}
        with atomic_output(output, overwrite=overwrite, directory=False) as tmp:
            writer = new_writer(tmp, self.arch.arch)
            copy_metadata(self.reader, writer)
            for name, t in self.tensors.items():
                if name in plan.out:
                    shape, dtype, nbytes, raw = _layout(self.shape(name), plan.out[name])
                    writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
                else:
                    writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, t in self.tensors.items():
                if name not in plan.out:
                    writer.write_tensor_data(t.data)  # the stored bytes, unchanged
                else:
                    writer.write_tensor_data(self._merged(name, plan.out[name], transform, errors))
                if progress:
                    progress(name)
            writer.close()
        return errors

    def _merged(self, name: str, out_type: str, transform: Transform, errors: Dict[str, float]) -> np.ndarray:
        tensor = to_torch(self.tensors[name])
        if out_type in FLOATS:
            return from_torch(transform(name, tensor, TORCH_OF[out_type]), out_type)[0]
        merged = transform(name, tensor.to(torch.float32), torch.float32)
        packed, raw = from_torch(merged, out_type)
        back = torch.from_numpy(gguf_package().quants.dequantize(packed, raw)).reshape(merged.shape)
        errors[name] = float((back - merged).norm() / merged.norm().clamp_min(1e-30))
        return packed


def _layout(shape: Tuple[int, ...], type_: str):
    """(numpy shape, numpy dtype, bytes, raw type) of a tensor of `shape` elements stored as `type_`."""
    gguf = gguf_package()
    raw = getattr(gguf.GGMLQuantizationType, type_)
    if type_ in ("F32", "F16"):
        dtype = np.float32 if type_ == "F32" else np.float16
        return shape, dtype, int(np.prod(shape)) * np.dtype(dtype).itemsize, raw
    byte_shape = gguf.quant_shape_to_byte_shape(shape, raw)
    return byte_shape, np.uint8, int(np.prod(byte_shape)), raw


def open_gguf_base(path) -> Optional[GgufBase]:
    """A GgufBase when `path` is a GGUF file, else None."""
    if not is_gguf_base(path):
        return None
    try:
        return GgufBase(path)
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: unreadable GGUF header ({e})") from None
