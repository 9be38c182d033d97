"""The only module that touches torch.ops.loratools.

`merge_` is the public entry: it uses the compiled operator when the extension is built and
falls back to `merge_reference_` (plain torch, warned once) when it is not. The reference is
also the oracle the kernel tests compare against.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator, List, Sequence

import torch

from .dtypes import FLOATS, FP8, MERGE_FLOATS  # what merge_ takes: one home for the dtype sets

try:  # the extension registers torch.ops.loratools.* on import
    from . import _C  # noqa: F401

    HAVE_EXTENSION = hasattr(torch.ops, "loratools") and hasattr(torch.ops.loratools, "merge_")
except ImportError:  # built without the extension (LORATOOLS_NO_EXTENSION=1) or not built yet
    HAVE_EXTENSION = False
HAVE_FINITE = HAVE_EXTENSION and hasattr(torch.ops.loratools, "all_finite")

if HAVE_EXTENSION:
    # Shape-only implementation for FakeTensor / torch.compile tracing: the op mutates `weight` in
    # place and returns nothing, so there is nothing to allocate.
    @torch.library.register_fake("loratools::merge_")
    def _merge_fake(weight: torch.Tensor, ups: list[torch.Tensor], downs: list[torch.Tensor],
                    coeffs: list[float]) -> None:
        return None

_warned = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("loratools._C is not built; using the plain-torch merge (slower, more memory). "
                      "Reinstall with `pip install --no-build-isolation .` to build it.",
                      RuntimeWarning, stacklevel=3)


def check_merge_args(weight: torch.Tensor, ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor],
                     coeffs: Sequence[float], dtypes: Sequence[torch.dtype] = MERGE_FLOATS) -> None:
    if weight.dim() != 2:
        raise ValueError(f"merge_: weight must be 2-D, got {weight.dim()}-D")
    if weight.dtype not in dtypes:
        raise ValueError(f"merge_: weight dtype {weight.dtype} is not fp32/bf16/fp16")
    if not (len(ups) == len(downs) == len(coeffs)):
        raise ValueError("merge_: ups, downs and coeffs must have the same length")
    rows, cols = weight.shape
    for u, d in zip(ups, downs):
        if u.dim() != 2 or d.dim() != 2 or u.shape[0] != rows or d.shape[1] != cols or u.shape[1] != d.shape[0]:
            raise ValueError(f"merge_: factors {tuple(u.shape)} @ {tuple(d.shape)} "
                             f"do not fit weight {tuple(weight.shape)}")
        if u.dtype not in dtypes or d.dtype not in dtypes:
            raise ValueError("merge_: factors must be fp32/bf16/fp16")
        if u.device != weight.device or d.device != weight.device:
            raise ValueError("merge_: factors must be on the weight's device")


def merge_reference_(weight: torch.Tensor, ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor],
                     coeffs: Sequence[float]) -> torch.Tensor:
    """weight += Σ c_i · ups[i] @ downs[i], accumulated in fp32 and rounded once. In place."""
    check_merge_args(weight, ups, downs, coeffs)
    acc = weight.to(torch.float32, copy=True)
    for u, d, c in zip(ups, downs, coeffs):
        acc.addmm_(u.to(torch.float32), d.to(torch.float32), alpha=float(c))
    weight.copy_(acc)
    return weight


def merge_(weight: torch.Tensor, ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor],
           coeffs: Sequence[float]) -> torch.Tensor:
    """weight [rows, cols] += Σ c_i · ups[i] [rows, r_i] @ downs[i] [r_i, cols]. In place.

    fp32 / bf16 / fp16 weights: fp32 accumulation, one rounding per element (fp64 factors are
    rounded to fp32 first). fp64 weights: plain torch in fp64.
    """
    if not ups:
        return weight
    if weight.dtype == torch.float64:
        check_merge_args(weight, ups, downs, coeffs, FLOATS)
        for u, d, c in zip(ups, downs, coeffs):
            weight.addmm_(u.to(torch.float64), d.to(torch.float64), alpha=float(c))
        return weight
    ups = [u.to(torch.float32) if u.dtype == torch.float64 else u for u in ups]
    downs = [d.to(torch.float32) if d.dtype == torch.float64 else d for d in downs]
    if HAVE_EXTENSION:
        check_merge_args(weight, ups, downs, coeffs)
        torch.ops.loratools.merge_(weight, list(ups), list(downs), [float(c) for c in coeffs])
        return weight
    _warn_fallback()
    return merge_reference_(weight, ups, downs, coeffs)


# set by `deferred_checks()`: all_finite then records a flag instead of reading it back
_DEFERRED: contextvars.ContextVar = contextvars.ContextVar("loratools_deferred_checks", default=None)


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on t's device, True when no element is NaN or ±Inf (no host sync).
    aminmax propagates NaN and is several times faster than isfinite().all() on bf16 CPU tensors."""
    if t.numel() == 0 or not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.dtype in FP8:  # no aminmax for fp8 (torch clips an overflow into e4m3fn: bases/core checks it)
        return torch.isfinite(t.float()).all()
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf. Inside `deferred_checks()`, the flag is recorded for
    the caller to read later and this returns True (reading it now would wait for the GPU). On the
    CPU, the extension's single-threaded pass over the exponent bits (aminmax would start OpenMP
    threads even for a small tensor, which on a busy machine waits for a core)."""
    pending = _DEFERRED.get()
    if pending is not None:
        pending.append(finite_flag(t))
        return True
    if HAVE_FINITE and t.device.type == "cpu" and t.dtype in MERGE_FLOATS and t.numel():
        return bool(torch.ops.loratools.all_finite(t))
    return bool(finite_flag(t))


@contextlib.contextmanager
def deferred_checks() -> Iterator[List[torch.Tensor]]:
    """Within it, `all_finite` appends its flag to the yielded list and answers True: the CUDA merge
    pipeline reads the flags back with the merged tensor, so queueing work never waits for the GPU."""
    flags: List[torch.Tensor] = []
    token = _DEFERRED.set(flags)
    try:
        yield flags
    finally:
        _DEFERRED.reset(token)
