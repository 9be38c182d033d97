"""Merge adapters into a base checkpoint: W' = W + Σ w_i s_i B_i A_i, streamed tensor by tensor.

Everything that can fail is checked against the shard headers before anything is written:
modules that match no base weight, shapes that do not fit, dtypes. The output is written to a
temporary folder beside the target and renamed into place only when complete.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union


from . import paths
from .adapter import LoraAdapter
from .atomic import check_output
from .bases import Base, MergePlan, QuantizedBase, open_base
from .checkpoint import Checkpoint
from .dtypes import parse_dtype
from .errors import UsageError
from .formats import read_adapter

AdapterLike = Union[str, os.PathLike, LoraAdapter]


def _load(adapters: Sequence[AdapterLike], weights: Optional[Sequence[float]],
          options: Optional[dict] = None) -> List[Tuple[LoraAdapter, float]]:
    if not adapters:
        raise UsageError("give at least one adapter")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s): give one --weight per adapter")
    if not all(math.isfinite(float(w)) for w in weights):
        raise UsageError(f"weights must be finite numbers, got {', '.join(map(str, weights))}")
    # plan_merge runs the checks (also on adapters given as objects), so read without them
    # the base lends readers what it knows (a GGUF model: its names and head counts)
    return [(read_adapter(a, check=False, **(options or {})), float(w)) for a, w in zip(adapters, weights)]


@paths.guarded
def merge(base: Union[str, os.PathLike, Base, Checkpoint], adapters: Sequence[AdapterLike],
          output: Union[str, os.PathLike], weights: Optional[Sequence[float]] = None, dtype: Optional[str] = None,
          overwrite: bool = False, check_finite: bool = True,
          progress: Optional[Callable[[str], None]] = None, out_type: Optional[str] = None,
          requantize: bool = False) -> MergePlan:
    """Merge `adapters` (paths or LoraAdapter objects) with `weights` into the base at `base` (model
    folder, diffusers pipeline folder, single-file SD checkpoint or GGUF model) and write the result to
    `output`. `out_type`: a storage type of the base's own for merged tensors (GGUF: f16, q8_0 …).
    A quantized base (bitsandbytes, FP8) is written dequantized (default bf16), or with `requantize`
    in its own format. Returns the plan that was carried out."""
    out_dtype = parse_dtype(dtype)
    model = _open(base, requantize)
    check_output(output, overwrite)
    plan = model.plan(_load(adapters, weights, model.adapter_options), out_type)  # every check before writing
    model.write(plan, output, out_dtype, overwrite, check_finite, progress)
    return plan


def describe(base: Union[str, os.PathLike, Base, Checkpoint], adapters: Sequence[AdapterLike],
             weights: Optional[Sequence[float]] = None, out_type: Optional[str] = None,
             requantize: bool = False) -> Tuple[Base, MergePlan]:
    """Plan a merge without writing anything (for --dry-run). Returns (base, plan)."""
    model = _open(base, requantize)
    return model, model.plan(_load(adapters, weights, model.adapter_options), out_type)


def _open(base, requantize: bool) -> Base:
    model = open_base(base)
    if requantize:
        if not isinstance(model, QuantizedBase):
            raise UsageError(f"--requantize needs a quantized base; {model.describe()} is not quantized")
        model.requantize = True
    return model
