"""Dtype names and rules shared by every operation: the names users type, the floating dtypes a
merge or an SVD handles, and how `--dtype` applies to a tensor."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .errors import UsageError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CHOICES = ("fp32", "bf16", "fp16")  # what the CLI offers
MERGE_FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # what the merge kernel takes
FLOATS = MERGE_FLOATS + (torch.float64,)  # what a LoRA factor or a difference may be
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # unscaled fp8 weights merge in fp32, rounded once back; scaled
# ones (weight_scale_inv …) are dequantized by quant.py first
BASE_FLOATS = FLOATS + FP8  # what a base weight may be to merge into


def fp8_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds past the largest `dtype` number: an overflow, which torch's
    cast into fp8 hides by clipping to ±max (e4m3fn has no Inf)."""
    fi = torch.finfo(dtype)
    return fi.max + fi.eps * 2.0 ** math.floor(math.log2(fi.max)) / 2  # max + half its ulp


def parse_dtype(name: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    """A dtype from its name (fp32/bf16/fp16 or the long names); None and torch dtypes pass through."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}: use {', '.join(CHOICES)}") from None


def output_dtype(src: torch.dtype, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """--dtype converts the floating tensors a merge can handle; everything else keeps its dtype."""
    return out_dtype if (out_dtype is not None and src in MERGE_FLOATS) else src


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """'bfloat16' for torch.bfloat16 (what reports print)."""
    return str(dtype).replace("torch.", "")
