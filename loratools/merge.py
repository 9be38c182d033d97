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
from .errors import IncompatibleError, NonFiniteError, UsageError
from .formats import read_adapter
from .gguf_base import GgufBase, GgufPlan, is_gguf_base, open_gguf_base
from .hub import existing_path
from .validate import check_adapter, check_base, extra_target, raise_errors

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
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
    types: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # GGUF: tensor -> (base type, output type)
    quant_error: Dict[str, float] = field(default_factory=dict)  # GGUF: relative requantization error

    @property
    def num_modules(self) -> int:
        return sum(len(t) for t in self.terms.values())


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}: use fp32, bf16 or fp16") from None


def output_dtype(src: torch.dtype, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """--dtype converts the floating tensors a merge can handle; everything else keeps its dtype."""
    return out_dtype if (out_dtype is not None and src in ops.FLOAT_DTYPES) else src


def plan_merge(ckpt: Checkpoint, adapters: Sequence[Tuple[LoraAdapter, float]]) -> MergePlan:
    """Match every module to a base weight and run `validate`'s checks; raise before anything is written."""
    plan = MergePlan(adapters=list(adapters))
    for i, (adapter, weight) in enumerate(adapters):
        where = f"adapter {i + 1} of {len(adapters)}" if len(adapters) > 1 else ""
        raise_errors(check_adapter(adapter) + check_base(adapter, ckpt), where)
        for m in adapter:
            plan.terms.setdefault(m.name + ".weight", []).append(make_term(m, weight))
        for name, tensor in adapter.extra.items():
            plan.replace[extra_target(name)] = tensor
    return plan


def make_term(m: LoraModule, weight: float) -> Term:
    if m.is_dora and weight < 0:
        raise UsageError(f"module {m.name}: a DoRA merge cannot be undone with a negative weight "
                         "(its magnitude replaces the row norms); keep the unmerged base instead")
    if m.is_dora and m.kind == "embedding":
        raise IncompatibleError(f"module {m.name}: DoRA on embeddings is not supported")
    term = Term(m, float(weight))
    if abs(term.coeff) > _FP32_MAX:
        raise UsageError(f"module {m.name}: weight {weight:g} times the module's scale {m.scale:g} "
                         "is beyond float32's range")
    return term


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


def _load(adapters: Sequence[AdapterLike], weights: Optional[Sequence[float]],
          gguf_arch=None) -> List[Tuple[LoraAdapter, float]]:
    if not adapters:
        raise UsageError("give at least one adapter")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s): give one --weight per adapter")
    if not all(math.isfinite(float(w)) for w in weights):
        raise UsageError(f"weights must be finite numbers, got {', '.join(map(str, weights))}")
    # plan_merge runs the checks (also on adapters given as objects), so read without them
    # GGUF adapters learn the head counts (llama.cpp's q/k row order) from a GGUF base
    return [(read_adapter(a, check=False, base=gguf_arch if is_gguf_base(a) else None), float(w))
            for a, w in zip(adapters, weights)]


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
    gguf = open_gguf_base(base)
    if gguf is not None:
        return gguf
    from . import merge_diffusion  # late: it builds on this module
    return merge_diffusion.open_diffusion_base(base) or Checkpoint(base)


def merge(base: Union[str, os.PathLike, Checkpoint], adapters: Sequence[AdapterLike], output: Union[str, os.PathLike],
          weights: Optional[Sequence[float]] = None, dtype: Optional[str] = None, overwrite: bool = False,
          check_finite: bool = True, progress: Optional[Callable[[str], None]] = None,
          out_type: Optional[str] = None) -> MergePlan:
    """Merge `adapters` (paths or LoraAdapter objects) with `weights` into the base at `base` (model
    folder, diffusers pipeline folder, single-file SD checkpoint or GGUF model) and write the result
    to `output`. `out_type` (GGUF only): the type of merged tensors (f16, q8_0 …; default: their own).
    Returns the plan that was carried out."""
    out_dtype = parse_dtype(dtype)
    ckpt = open_base(base)
    if isinstance(ckpt, GgufBase):
        plan, types = plan_gguf(ckpt, adapters, weights, out_type or _GGUF_TYPES.get(out_dtype))
        check_output(output, overwrite)

        def merged(name: str, tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
            return merge_tensor(name, tensor, plan.terms[name], None, target, check_finite)

        plan.quant_error = ckpt.rewrite(output, types, merged, overwrite, progress)
        return plan
    if out_type is not None:
        raise UsageError("--out-type applies to GGUF bases only (use --dtype)")
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
    if isinstance(ckpt, GgufBase):
        return ckpt, plan_gguf(ckpt, adapters, weights, None)[0]
    if not isinstance(ckpt, Checkpoint):
        return ckpt, ckpt.plan(_load(adapters, weights))
    return ckpt, plan_merge(ckpt, _load(adapters, weights))


_GGUF_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def plan_gguf(base: GgufBase, adapters: Sequence[AdapterLike], weights: Optional[Sequence[float]],
              out_type: Optional[str]) -> Tuple[MergePlan, GgufPlan]:
    """Terms per GGUF tensor (modules in llama.cpp's names and row order) and output types, all checked."""
    plan = MergePlan(adapters=_load(adapters, weights, gguf_arch=base.arch))
    for i, (adapter, weight) in enumerate(plan.adapters):
        raise_errors(check_adapter(adapter), f"adapter {i + 1} of {len(plan.adapters)}" if len(adapters) > 1 else "")
        for g in base.fit(adapter):
            plan.terms.setdefault(g.name + ".weight", []).append(make_term(g, weight))
    types = base.plan_types(list(plan.terms), out_type)
    plan.types = {n: (types.src[n], types.out[n]) for n in plan.terms}
    return plan, types
