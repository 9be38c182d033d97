"""What `extract` would do, from the two checkpoints' safetensors headers alone (`--dry-run`).

No tensor data is read, so which weights really changed is unknown: every candidate weight (2-D or
conv, not filtered out) is planned, and the sizes are upper bounds (an unchanged weight is skipped
when the extraction runs). The peak-memory estimate follows `extraction._one`: one pair of tensors,
their fp32 copies and difference, the SVD's workspace, plus the adapter built so far (all of it,
at the end).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from .checkpoint import Checkpoint
from .extraction import OVERSAMPLE, ExtractOptions, module_kind, open_pair, skip_reason, uses_exact_svd
from .formats import output_is_folder
from .options import build
from .report import Report

_FP32 = 4


@dataclass
class PlannedModule:
    name: str
    kind: str
    shape: tuple  # the weight's shape
    rank: int  # the rank it gets (with --dynamic: at most this)
    svd: str  # "exact" | "randomized"
    bytes: int  # of its two factors in the output dtype

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
                "svd": self.svd, "bytes": self.bytes}


@dataclass(repr=False)
class ExtractPlan(Report):
    format: str
    output: Optional[str]
    modules: List[PlannedModule]
    work_bytes: int  # the largest tensor pair with its fp32 difference and SVD workspace
    skipped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> tensor names

    @property
    def out_bytes(self) -> int:
        return sum(m.bytes for m in self.modules)

    @property
    def peak_bytes(self) -> int:
        return self.work_bytes + self.out_bytes

    def summary(self) -> dict:
        return {"format": self.format, "output": self.output, "modules": len(self.modules),
                "out_bytes": self.out_bytes, "peak_bytes": self.peak_bytes, "dry_run": True}

    def to_dict(self) -> dict:
        return dict(self.summary(), modules=[m.as_dict() for m in self.modules], skipped=self.skipped)


def _work_bytes(rows: int, cols: int, itemsize: int, cap: Optional[int], exact: bool) -> int:
    """Memory of one tensor pair's step: both tensors, their fp32 copies (unless already fp32), the
    difference and, for a candidate (`cap` given), the SVD's workspace."""
    numel = rows * cols
    pair = 2 * numel * itemsize + (2 * numel * _FP32 if itemsize != _FP32 else 0)
    if cap is None:
        return pair
    n = min(rows, cols)
    if exact:  # LAPACK's copy of the matrix, U [rows, n], Vh [n, cols], S
        svd = _FP32 * (numel + n * (rows + cols) + n)
    else:  # the fp64 norm of the whole difference, then a few [rows|cols, cap + oversample] blocks
        k = min(cap + OVERSAMPLE, n)
        svd = 2 * _FP32 * numel + 3 * _FP32 * k * (rows + cols)
    return pair + numel * _FP32 + svd


def plan_extract(base: Union[str, os.PathLike, Checkpoint], tuned: Union[str, os.PathLike, Checkpoint],
                 output: Optional[Union[str, os.PathLike]] = None, rank: int = 16, conv_rank: Optional[int] = None,
                 dynamic: Optional[str] = None, param: Optional[float] = None, min_diff: float = 0.0,
                 include=None, exclude=None, embeddings: bool = False, to: str = "peft", dtype: str = "fp32",
                 svd: str = "auto", power_iters: int = 4, component: Optional[str] = None,
                 options: Optional[ExtractOptions] = None) -> ExtractPlan:
    """Plan `extraction.extract` with the same options (keywords or an ExtractOptions, checked by
    ExtractOptions as the real run is), reading headers only; writes nothing. Refuses what `extract`
    would refuse before reading data (options, -o's kind, mismatched checkpoints)."""
    opts = build(ExtractOptions, options, rank=rank, conv_rank=conv_rank, dynamic=dynamic, param=param,
                 min_diff=min_diff, include=tuple(include or ()), exclude=tuple(exclude or ()), embeddings=embeddings,
                 to=to, dtype=dtype, svd=svd, power_iters=power_iters, component=component)
    if output is not None:
        output_is_folder(output, opts.to)
    out_item = opts.dtype.itemsize
    inc, exc = opts.patterns
    cb, _ = open_pair(base, tuned)
    plan = ExtractPlan(opts.to, None if output is None else os.fspath(output), [], 0)
    for name, info in cb.infos.items():
        shape = tuple(info.shape)
        rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
        why = skip_reason(cb, name, inc, exc, opts.embeddings)
        if why in ("excluded", "not included"):
            plan.skipped.setdefault(why, []).append(name)
            continue
        cap = None
        if why is None:
            module = name[: -len(".weight")]
            kind = module_kind(module, len(shape))
            cap = min(opts.rank_for(kind == "conv"), rows, cols)
            exact = uses_exact_svd(min(rows, cols), cap, opts.dynamic, opts.svd)
            plan.modules.append(PlannedModule(opts.prefix + module, kind, shape, cap,
                                              "exact" if exact else "randomized", cap * (rows + cols) * out_item))
        plan.work_bytes = max(plan.work_bytes, _work_bytes(rows, cols, info.dtype.itemsize, cap,
                                                           cap is not None and plan.modules[-1].svd == "exact"))
    return plan
