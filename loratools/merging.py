"""Merge adapters into a base checkpoint: W' = W + Σ w_i s_i B_i A_i, streamed tensor by tensor.

Everything that can fail is checked against the shard headers before anything is written:
modules that match no base weight, shapes that do not fit, dtypes. The output is written to a
temporary folder beside the target and renamed into place only when complete.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .adapter import LoraAdapter, LoraModule
from .atomic import atomic_output, check_output
from .checkpoint import Checkpoint, rewrite
from .dtypes import output_dtype, parse_dtype
from .errors import IncompatibleError, NonFiniteError, UsageError
from .formats import read_adapter
from .hub import existing_path
from .validation import check_adapter, check_base, extra_target, raise_errors

_FP32_MAX = torch.finfo(torch.float32).max

AdapterLike = Union[str, os.PathLike, LoraAdapter]


@dataclass
class Term:
    module: LoraModule
    weight: float  # the user's --weight; the module's own scale is applied on top

    @property
    def coeff(self) -> float:
        return self.weight * self.module.scale


@dataclass
class MergePlan:
    """What a merge will do: per base tensor, the LoRA terms and the replacement (extra) tensor."""

    terms: Dict[str, List[Term]] = field(default_factory=dict)
    replace: Dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: List[Tuple[LoraAdapter, float]] = field(default_factory=list)

    @property
    def num_modules(self) -> int:
        return sum(len(t) for t in self.terms.values())


def plan_merge(ckpt: Checkpoint, adapters: Sequence[Tuple[LoraAdapter, float]]) -> MergePlan:
    """Match every module to a base weight and run `validate`'s checks; raise before anything is written."""
    plan = MergePlan(adapters=list(adapters))
    for i, (adapter, weight) in enumerate(adapters):
        where = f"adapter {i + 1} of {len(adapters)}" if len(adapters) > 1 else ""
        raise_errors(check_adapter(adapter) + check_base(adapter, ckpt), where)
        for m in adapter:
            if m.is_dora and weight < 0:
                raise UsageError(f"module {m.name}: a DoRA merge cannot be undone with a negative weight "
                                 "(its magnitude replaces the row norms); keep the unmerged base instead")
            if m.is_dora and m.kind == "embedding":
                raise IncompatibleError(f"module {m.name}: DoRA on embeddings is not supported")
            term = Term(m, float(weight))
            if abs(term.coeff) > _FP32_MAX:
                raise UsageError(f"module {m.name}: weight {weight:g} times the module's scale {m.scale:g} "
                                 "is beyond float32's range")
            plan.terms.setdefault(m.name + ".weight", []).append(term)
        for name, tensor in adapter.extra.items():
            plan.replace[extra_target(name)] = tensor
    return plan


def apply_terms(weight: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """The merged tensor in `weight`'s dtype. Plain LoRA terms go through the fused kernel in one
    pass; DoRA terms (which renormalise rows) are applied after, in order, in fp32."""
    plain = [t for t in terms if not t.module.is_dora]
    dora = [t for t in terms if t.module.is_dora]
    rows = weight.shape[0]
    if not dora:
        w2 = weight.reshape(rows, -1)
        ups, downs = zip(*(t.module.factors_2d() for t in plain)) if plain else ((), ())
        ops.merge_(w2, list(ups), list(downs), [t.coeff for t in plain])
        return weight
    acc = weight.to(torch.float32, copy=True)
    acc2 = acc.reshape(rows, -1)
    for t in plain:
        u, d = t.module.factors_2d()
        ops.merge_(acc2, [u], [d], [t.coeff])
    for t in dora:
        acc = _dora_merge(acc, t)
    return acc.to(weight.dtype)


def _dora_merge(acc: torch.Tensor, term: Term) -> torch.Tensor:
    """W' = m / ||W + ΔW||_row · (W + ΔW), the norm taken over each output channel (PEFT's merge)."""
    m = term.module
    v = acc.clone()
    u, d = m.factors_2d()
    ops.merge_(v.reshape(v.shape[0], -1), [u], [d], [term.coeff])
    if m.fan_in_fan_out:  # stored [in, out]: output channels are columns
        norm = torch.linalg.vector_norm(v, dim=0, keepdim=True)
        return m.magnitude.float().reshape(1, -1) / norm * v
    dims = tuple(range(1, v.dim()))
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return m.magnitude.float().reshape(norm.shape) / norm * v


def _load(adapters: Sequence[AdapterLike], weights: Optional[Sequence[float]]) -> List[Tuple[LoraAdapter, float]]:
    if not adapters:
        raise UsageError("give at least one adapter")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s): give one --weight per adapter")
    if not all(math.isfinite(float(w)) for w in weights):
        raise UsageError(f"weights must be finite numbers, got {', '.join(map(str, weights))}")
    # plan_merge runs the checks (also on adapters given as objects), so read without them
    return [(read_adapter(a, check=False), float(w)) for a, w in zip(adapters, weights)]


def merge_tensor(name: str, tensor: torch.Tensor, terms: Optional[Sequence[Term]], replacement: Optional[torch.Tensor],
                 target: torch.dtype, check_finite: bool = True) -> torch.Tensor:
    """One merged tensor in dtype `target`: the replacement (if any) plus the terms. May modify `tensor`."""
    if replacement is not None:  # never modify the adapter's own tensor in place
        tensor = replacement.clone()
    if terms:
        # merge at the wider of the two dtypes, round once into the output dtype
        work = torch.float32 if target != tensor.dtype else tensor.dtype
        merged = apply_terms(tensor.to(work), terms).to(target)
        if check_finite and not ops.all_finite(merged):  # after rounding: fp16 overflows to Inf
            raise NonFiniteError(f"merging into {name} produced NaN or Inf in {target}; nothing was "
                                 "written (check the adapter and the weights)")
        return merged
    out = tensor.to(target)
    if check_finite and out.dtype != tensor.dtype and not ops.all_finite(out) and ops.all_finite(tensor):
        raise NonFiniteError(f"converting {name} to {target} overflowed to Inf; nothing was written "
                             "(choose a wider --dtype)")
    return out


def open_base(base):
    """A Checkpoint for model folders, or a diffusion base (pipeline folder / single-file SD checkpoint)."""
    if isinstance(base, Checkpoint) or not isinstance(base, (str, os.PathLike)):
        return base
    base = existing_path(base, kind="model")  # also a Hub reference
    from . import merge_diffusion  # late: it builds on this module
    return merge_diffusion.open_diffusion_base(base) or Checkpoint(base)


def merge(base: Union[str, os.PathLike, Checkpoint], adapters: Sequence[AdapterLike], output: Union[str, os.PathLike],
          weights: Optional[Sequence[float]] = None, dtype: Optional[str] = None, overwrite: bool = False,
          check_finite: bool = True, progress: Optional[Callable[[str], None]] = None) -> MergePlan:
    """Merge `adapters` (paths or LoraAdapter objects) with `weights` into the base at `base` (model
    folder, diffusers pipeline folder or single-file SD checkpoint) and write the result to `output`.
    Returns the plan that was carried out."""
    out_dtype = parse_dtype(dtype)
    ckpt = open_base(base)
    if not isinstance(ckpt, Checkpoint):
        from . import merge_diffusion
        return merge_diffusion.merge_diffusion(ckpt, _load(adapters, weights), output, out_dtype, overwrite,
                                               check_finite, progress)
    check_output(output, overwrite)
    if os.path.abspath(output) == ckpt.folder:
        raise UsageError("the output must not be the base folder itself")
    plan = plan_merge(ckpt, _load(adapters, weights))

    def dtype_of(name: str) -> torch.dtype:
        return output_dtype(ckpt.dtype(name), out_dtype)

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return merge_tensor(name, tensor, plan.terms.get(name), plan.replace.get(name), dtype_of(name), check_finite)

    with atomic_output(output, overwrite=overwrite, directory=True) as tmp:
        rewrite(ckpt, tmp, transform, dtype_of, on_tensor=progress,
                unchanged=lambda n: n not in plan.terms and n not in plan.replace)
    return plan


def describe(base: Union[str, os.PathLike], adapters: Sequence[AdapterLike],
             weights: Optional[Sequence[float]] = None):
    """Plan a merge without writing anything (for --dry-run). Returns (base, plan)."""
    ckpt = open_base(base)
    if not isinstance(ckpt, Checkpoint):
        return ckpt, ckpt.plan(_load(adapters, weights))
    return ckpt, plan_merge(ckpt, _load(adapters, weights))
