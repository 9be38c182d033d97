"""GGUF files through the `gguf` package: key/values, tensors as torch, tensors back to GGUF types.

GGUF stores shapes fastest-dimension first (ggml `ne`); the `gguf` package turns them into numpy
order, which for a weight is torch's `[out, in]`. F32/F16/BF16 are read exactly; block-quantized
types are dequantized to fp32 (and can be quantized again only where the package implements it).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .archs.gguf_names import gguf_package
from .errors import FormatError, UsageError

MAGIC = b"GGUF"
FLOATS = ("F32", "F16", "BF16")
# types whose blocks the gguf package can write again (K-quants and i-quants it can only read)
REQUANTIZABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_reader(path: str):
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise FormatError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200]})") from None


def metadata(reader) -> Dict[str, object]:
    """Every key/value of the file (scalars as Python values, arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def type_name(tensor) -> str:
    return tensor.tensor_type.name


def parse_type(name: str) -> str:
    """A user's --out-type (f16, q8_0 …) as the GGML type name, or a usage error."""
    up = name.upper()
    if up in ("FP32", "FLOAT32"):
        up = "F32"
    if up in ("FP16", "FLOAT16"):
        up = "F16"
    if up not in FLOATS + REQUANTIZABLE:
        raise UsageError(f"--out-type {name}: use one of {', '.join(t.lower() for t in FLOATS + REQUANTIZABLE)}")
    return up


def can_read(type_: str) -> bool:
    if type_ in FLOATS:
        return True
    gguf = gguf_package()
    member = getattr(gguf.GGMLQuantizationType, type_, None)
    return member is not None and member in gguf.quants._type_traits


def to_torch(tensor) -> torch.Tensor:
    """The tensor's values: F32/F16/BF16 in their own dtype (exact), quantized types dequantized to fp32."""
    t = type_name(tensor)
    data = np.array(tensor.data)  # copy out of the memory map
    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    if t in ("F32", "F16"):
        return torch.from_numpy(data).reshape(shape)
    if t == "BF16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
    if not can_read(t):
        raise FormatError(f"GGUF tensor {tensor.name} has type {t}, which the gguf package cannot dequantize")
    gguf = gguf_package()
    return torch.from_numpy(gguf.quants.dequantize(data, tensor.tensor_type)).reshape(shape)


def from_torch(t: torch.Tensor, type_: Optional[str] = None) -> Tuple[np.ndarray, object]:
    """(array, raw GGML type) to hand the gguf writer: float tensors in `type_` (default: their own
    dtype), quantized types packed from fp32 values."""
    gguf = gguf_package()
    qt = gguf.GGMLQuantizationType
    if type_ is None:
        type_ = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(t.dtype)
        if type_ is None:
            raise FormatError(f"tensor dtype {t.dtype} cannot be written to GGUF (use fp32, fp16 or bf16)")
    t = t.contiguous()
    if type_ == "F32":
        return t.to(torch.float32).numpy(), qt.F32
    if type_ == "F16":
        return t.to(torch.float16).numpy(), qt.F16
    if type_ == "BF16":
        return t.to(torch.bfloat16).view(torch.uint8).numpy(), qt.BF16  # raw bytes: numpy has no bfloat16
    member = getattr(qt, type_)
    return gguf.quants.quantize(t.to(torch.float32).numpy(), member), member


def block_size(type_: str) -> int:
    gguf = gguf_package()
    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_)][0]


def new_writer(path: str, arch: str):
    return gguf_package().GGUFWriter(path, arch)


def copy_metadata(reader, writer) -> None:
    """Every key/value of `reader`, in order, with its own value type (the writer adds general.architecture)."""
    gguf = gguf_package()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
