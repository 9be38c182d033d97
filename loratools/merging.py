"""Merge adapters into a base checkpoint: W' = W + Σ w_i s_i B_i A_i, streamed tensor by tensor.

Everything that can fail is checked against the shard headers before anything is written:
modules that match no base weight, shapes that do not fit, dtypes. The output is written to a
temporary folder beside the target and renamed into place only when complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import paths
from .adapter import LoraAdapter
from .atomic import check_output
from .bases import Base, MergePlan, QuantizedBase, open_base
from .checkpoint import Checkpoint
from .dtypes import parse_dtype
from .errors import UsageError
from .formats import read_adapter
from .options import build, check_weights, resolve_device, weights_for

AdapterLike = Union[str, os.PathLike, LoraAdapter]


@dataclass(frozen=True)
class MergeOptions:
    """What `merge` does, checked once on creation (the CLI and the API build the same object).
    `dtype` becomes a torch dtype (None: keep each tensor's), `device` 'cpu' or 'cuda:N'."""

    weights: Optional[Tuple[float, ...]] = None  # one per adapter (None: 1 each)
    dtype: Optional[Union[str, torch.dtype]] = None
    out_type: Optional[str] = None  # a storage type of the base's own (GGUF: f16, q8_0 …)
    check_finite: bool = True
    device: str = "auto"
    requantize: bool = False  # a quantized base written back in its own format (else dequantized)

    def __post_init__(self):
        object.__setattr__(self, "weights", check_weights(self.weights))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "device", resolve_device(self.device))


def _load(adapters: Sequence[AdapterLike], opts: MergeOptions,
          options: Optional[dict] = None) -> List[Tuple[LoraAdapter, float]]:
    weights = weights_for(opts.weights, len(adapters))
    # plan_merge runs the checks (also on adapters given as objects), so read without them
    # the base lends readers what it knows (a GGUF model: its names and head counts)
    return [(read_adapter(a, check=False, **(options or {})), w) for a, w in zip(adapters, weights)]


@paths.guarded
def merge(base: Union[str, os.PathLike, Base, Checkpoint], adapters: Sequence[AdapterLike],
          output: Union[str, os.PathLike], weights: Optional[Sequence[float]] = None, dtype: Optional[str] = None,
          overwrite: bool = False, check_finite: bool = True,
          progress: Optional[Callable[[str], None]] = None, out_type: Optional[str] = None, device: str = "auto",
          requantize: bool = False, options: Optional[MergeOptions] = None) -> MergePlan:
    """Merge `adapters` (paths or LoraAdapter objects) with `weights` into the base at `base` (model
    folder, diffusers pipeline folder, single-file SD checkpoint or GGUF model) and write the result to
    `output`. `out_type`: a storage type of the base's own for merged tensors (GGUF: f16, q8_0 …).
    A quantized base (bitsandbytes, FP8) is written dequantized (default bf16), or with `requantize`
    in its own format. `device`: auto, cpu, cuda or cuda:N. `options`: a MergeOptions instead of the
    keyword options.
    Returns the plan that was carried out."""
    opts = build(MergeOptions, options, weights=weights, dtype=dtype, out_type=out_type,
                 check_finite=check_finite, device=device, requantize=requantize)
    weights_for(opts.weights, len(adapters))
    model = _open(base, opts.requantize)
    check_output(output, overwrite)
    plan = model.plan(_load(adapters, opts, model.adapter_options), opts.out_type)  # every check before writing
    plan.device = opts.device
    model.write(plan, output, opts.dtype, overwrite, opts.check_finite, progress)
    return plan


def describe(base: Union[str, os.PathLike, Base, Checkpoint], adapters: Sequence[AdapterLike],
             weights: Optional[Sequence[float]] = None, out_type: Optional[str] = None,
             requantize: bool = False, options: Optional[MergeOptions] = None) -> Tuple[Base, MergePlan]:
    """Plan a merge without writing anything (for --dry-run). Returns (base, plan)."""
    opts = build(MergeOptions, options, weights=weights, out_type=out_type, requantize=requantize)
    weights_for(opts.weights, len(adapters))
    model = _open(base, opts.requantize)
    plan = model.plan(_load(adapters, opts, model.adapter_options), opts.out_type)
    plan.device = opts.device
    return model, plan


def _open(base, requantize: bool) -> Base:
    model = open_base(base)
    if requantize:
        if not isinstance(model, QuantizedBase):
            raise UsageError(f"--requantize needs a quantized base; {model.describe()} is not quantized")
        model.requantize = True
    return model

