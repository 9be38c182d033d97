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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..adapter import LoraAdapter
from ..archs.gguf_names import GgufArch, gguf_package, rope_rows, to_gguf_module
from ..atomic import atomic_output
from ..errors import FormatError, IncompatibleError, UsageError
from ..gguf_io import (FLOATS, REQUANTIZABLE, block_size, can_read, copy_metadata, from_torch, is_gguf, metadata,
                       new_writer, open_reader, parse_type, to_torch, type_name)
from .core import MergePlan, Progress, Term, merge_tensor, plan_merge

TORCH_OF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# transform(name, tensor, dtype) -> merged tensor in dtype
Transform = Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]


def is_gguf_base(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(path) and is_gguf(os.fspath(path))


class GgufBase:
    """A GGUF model file, read lazily (memory-mapped). `in` / `shape` / `dtype` / `read` speak of the
    Hugging Face parameter names adapters use (`model.layers.0.self_attn.q_proj.weight`), in HF row
    order; the GGUF tensor behind each is `self.names[name]`."""

    kind = "GGUF model"
    noun = "model"

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        self.folder = self.path  # what the CLI prints as "base"
        self.reader = open_reader(self.path)
        self.kv = metadata(self.reader)
        if self.kv.get("general.type") == "adapter":
            raise UsageError(f"{self.path}: a GGUF LoRA adapter, not a model; give the model first, then adapters")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.num_tensors = len(self.tensors)
        self.arch = GgufArch.from_metadata(self.kv, set(self.tensors))
        self.names = {hf + ".weight": g for hf, g in self.arch.name_map().items() if g in self.tensors}
        # adapters read for this base learn its names and head counts (GGUF: q/k row order; kohya: module names)
        self.adapter_options = {"base": self.arch}

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def gguf_shape(self, tensor: str) -> Tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.tensors[tensor].shape.tolist()))

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.gguf_shape(self.names[name])

    def dtype(self, name: str) -> torch.dtype:
        """Float types as they are; quantized ones read (dequantized) as fp32."""
        return TORCH_OF.get(type_name(self.tensors[self.names[name]]), torch.float32)

    def read(self, name: str) -> torch.Tensor:
        target = self.names[name]
        t = to_torch(self.tensors[target])
        heads = self.arch.heads_of(target)
        return t if heads is None else rope_rows(t, heads, inverse=True)

    def describe(self) -> str:
        return f"{self.folder} ({self.kind}, {self.arch.arch}, {self.num_tensors} tensors)"

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]], out_type: Optional[str] = None) -> MergePlan:
        """Every check of `plan_merge`, then the GGUF types: each merged tensor's own type, or `out_type`;
        types that cannot be written again are refused here, before anything is written."""
        for adapter, _ in adapters:
            if adapter.extra:
                raise IncompatibleError(f"full tensors ({next(iter(adapter.extra))}, modules_to_save) cannot be "
                                        "merged into a GGUF model by name; merge into the Hugging Face model instead")
            for m in adapter:
                if m.kind not in ("linear", "embedding") or m.fan_in_fan_out:
                    raise IncompatibleError(f"module {m.name}: a {m.kind} module has no llama.cpp weight to merge "
                                            "into")
        plan = plan_merge(self, adapters)
        want = parse_type(out_type) if out_type else None
        for name in plan.terms:
            target = self.names[name]
            t = type_name(self.tensors[target])
            o = want or t
            if not can_read(t):
                raise IncompatibleError(f"{target} is {t}, which the gguf package cannot dequantize; nothing was "
                                        "written")
            if o not in FLOATS + REQUANTIZABLE:
                choices = ", ".join(x.lower() for x in FLOATS + REQUANTIZABLE)
                raise IncompatibleError(f"{target} is {t}, which the gguf package cannot quantize again: pass "
                                        f"--out-type ({choices}); nothing was written")
            if o in REQUANTIZABLE and self.gguf_shape(target)[-1] % block_size(o):
                raise IncompatibleError(f"{target}: rows of {self.gguf_shape(target)[-1]} cannot be split into {o} "
                                        f"blocks of {block_size(o)}; choose another --out-type")
            plan.types[target] = (t, o)
        return plan

    def write(self, plan: MergePlan, output: str, out_dtype: Optional[torch.dtype], overwrite: bool,
              check_finite: bool, progress: Progress) -> None:
        """Write the merged model to `output` (atomically); `plan.quant_error` gets, per requantized tensor,
        the relative Frobenius error ||Q(W') - W'|| / ||W'|| that the requantization added."""
        if out_dtype is not None:
            raise UsageError("a GGUF model keeps its tensor types: choose the merged tensors' type with "
                             "--out-type (f32, f16, bf16, q8_0 …), not --dtype")
        terms: Dict[str, List[Term]] = {}
        for name, ts in plan.terms.items():  # into llama.cpp's names and row order
            terms[self.names[name]] = [Term(to_gguf_module(t.module, self.arch), t.weight) for t in ts]

        def transform(name: str, tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
            return merge_tensor(name, tensor, terms[name], None, target, check_finite, plan.device)

        plan.quant_error = self.rewrite(output, {n: o for n, (_, o) in plan.types.items()}, transform, overwrite,
                                        progress)

    def rewrite(self, output: str, out: Dict[str, str], transform: Transform, overwrite: bool = False,
                progress: Progress = None) -> Dict[str, float]:
        """Stream the file to `output` (atomically), tensors named in `out` through `transform` and
        written as their type there, the rest byte for byte. Returns the requantization errors."""
        errors: Dict[str, float] = {}
        with atomic_output(output, overwrite=overwrite, directory=False) as tmp:
            writer = new_writer(tmp, self.arch.arch)
            copy_metadata(self.reader, writer)
            for name, t in self.tensors.items():
                if name in out:
                    shape, dtype, nbytes, raw = _layout(self.gguf_shape(name), out[name])
                    writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
                else:
                    writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, t in self.tensors.items():
                if name not in out:
                    writer.write_tensor_data(t.data)  # the stored bytes, unchanged
                else:
                    writer.write_tensor_data(self._merged(name, out[name], transform, errors))
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
