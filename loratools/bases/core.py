"""What every base kind shares: the merge plan, the merged tensor.

A `Base` (see `Base` below) is a model to merge into: a Hugging Face model folder, a diffusers
pipeline folder or a single-file SD checkpoint, one class each in this package. `plan_merge`
matches adapter modules to a base's weights through the protocol's `in` / `shape` / `dtype` and
runs `validate`'s checks before anything is written; the base's `write` streams its tensors
through `merge_tensor`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .. import cuda_pipeline, ops
from ..adapter import LoraAdapter, LoraModule, fit_adapter
from ..dtypes import FLOATS, FP8, MERGE_FLOATS, fp8_limit
from ..errors import IncompatibleError, NonFiniteError, UsageError
from ..report import Report
from ..checks import check_adapter, check_base, extra_target, raise_errors

_FP32_MAX = torch.finfo(torch.float32).max
Progress = Optional[Callable[[str], None]]
RowMerge = Callable[[torch.Tensor, int], None]  # (rows of a weight, index of the first), in place


@dataclass
class Term:
    module: LoraModule
    weight: float  # the user's --weight; the module's own scale is applied on top
    bias: bool = False  # a LyCORIS full/diff bias update on `<name>.bias`

    @property
    def coeff(self) -> float:
        return self.weight * self.module.scale


@dataclass(repr=False)
class MergePlan(Report):
    """What a merge will do: per base tensor, the LoRA terms and the replacement (extra) tensor."""

    terms: Dict[str, List[Term]] = field(default_factory=dict)
    replace: Dict[str, torch.Tensor] = field(default_factory=dict)
    adapters: List[Tuple[LoraAdapter, float]] = field(default_factory=list)
    # bases with storage types of their own (GGUF): tensor -> (its type, the type written), and the
    # relative error that quantizing a merged tensor again added (filled in by `write`)
    types: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    quant_error: Dict[str, float] = field(default_factory=dict)
    not_copied: List[str] = field(default_factory=list)  # files of the base left out of the output (why)
    device: str = "cpu"  # where `write` merges: 'cpu' or 'cuda:N' (MergeOptions resolves it)

    @property
    def num_modules(self) -> int:
        return sum(len(t) for t in self.terms.values())

    def summary(self) -> dict:
        return {"adapters": len(self.adapters), "weights": [w for _, w in self.adapters],
                "modules": self.num_modules, "merged": len(self.terms), "replaced": len(self.replace)}


class Base(Protocol):
    """A model to merge into. `in` / `shape` / `dtype` speak of the parameter names adapters use
    (`<module>.weight`); `plan` checks everything before `write` streams the merged model out."""

    kind: str  # "model folder", "diffusers pipeline", "single-file sdxl checkpoint" …
    folder: str  # the folder (or file) it was read from
    num_tensors: int  # tensors `write` goes through (progress totals)

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> Tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str) -> torch.Tensor: ...

    # reader options a merge passes on when it reads adapters for this base (e.g. GGUF head counts)
    adapter_options: Dict[str, object]

    def plan(self, adapters: Sequence[Tuple[LoraAdapter, float]], out_type: Optional[str] = None) -> "MergePlan":
        """`out_type`: a storage type of the base's own for merged tensors (GGUF: q8_0 …); others refuse it."""

    def write(self, plan: "MergePlan", output: str, out_dtype: Optional[torch.dtype], overwrite: bool,
              check_finite: bool, progress: Progress) -> None: ...

    def describe(self) -> str: ...


def refuse_out_type(base: Base, out_type: Optional[str]) -> None:
    if out_type is not None:
        raise UsageError(f"--out-type {out_type}: a {base.kind} has no storage types of its own (use --dtype)")


def plan_merge(ckpt: Base, adapters: Sequence[Tuple[LoraAdapter, float]]) -> MergePlan:
    """Match every module to a base weight and run `validate`'s checks; raise before anything is written."""
    adapters = [(fit_adapter(adapter, ckpt), w) for adapter, w in adapters]
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
            plan.terms.setdefault(m.target, []).append(term)
            if m.op is not None and m.op.bias is not None:
                if m.name + ".bias" not in ckpt:
                    raise IncompatibleError(f"module {m.name}: the update changes the bias, which the base lacks")
                plan.terms.setdefault(m.name + ".bias", []).append(Term(m, float(weight), bias=True))
        for name, tensor in adapter.extra.items():
            plan.replace[extra_target(name)] = tensor
    return plan


def apply_terms(weight: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """The merged tensor in `weight`'s dtype. Plain LoRA terms go through the fused kernel in one
    pass; DoRA terms (which renormalise rows) and LyCORIS transforms (which act on W) are applied
    after, in order, in fp32."""
    for t in terms:  # one expert of a 3-D stack each: its 2-D slice, a view, merged in place
        if t.module.expert is not None:
            u, d = t.module.to(weight.device).factors_2d()
            ops.merge_(weight[t.module.expert], [u], [d], [t.coeff])
    terms = [t for t in terms if t.module.expert is None]
    plain = [t for t in terms if not (t.module.is_dora or t.module.op is not None)]
    dora = [t for t in terms if t.module.is_dora or t.module.op is not None]
    rows = weight.shape[0]
    if not dora:
        w2 = weight.reshape(rows, -1)
        ups, downs = zip(*(t.module.to(weight.device).factors_2d() for t in plain)) if plain else ((), ())
        ops.merge_(w2, list(ups), list(downs), [t.coeff for t in plain])
        return weight
    acc = weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)  # fp64 stays fp64
    acc2 = acc.reshape(rows, -1)
    for t in plain:
        u, d = t.module.to(weight.device).factors_2d()
        ops.merge_(acc2, [u], [d], [t.coeff])
    for t in dora:
        op = t.module.op
        if op is None:
            acc = _dora_merge(acc, t)
        else:
            acc = op.apply_bias(acc, t.weight) if t.bias else op.apply(acc, t.weight).reshape(acc.shape)
    return acc.to(weight.dtype)


def _dora_merge(acc: torch.Tensor, term: Term) -> torch.Tensor:
    """W' = m / ||W + ΔW||_row · (W + ΔW), the norm taken over each output channel (PEFT's merge)."""
    m = term.module.to(acc.device)
    v = acc.clone()
    u, d = m.factors_2d()
    ops.merge_(v.reshape(v.shape[0], -1), [u], [d], [term.coeff])
    if m.fan_in_fan_out:  # stored [in, out]: output channels are columns
        norm = torch.linalg.vector_norm(v, dim=0, keepdim=True)
        return m.magnitude.float().reshape(1, -1) / norm * v
    dims = tuple(range(1, v.dim()))
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return m.magnitude.float().reshape(norm.shape) / norm * v


def merge_tensor(name: str, tensor: torch.Tensor, terms: Optional[Sequence[Term]], replacement: Optional[torch.Tensor],
                 target: torch.dtype, check_finite: bool = True, device: str = "cpu") -> torch.Tensor:
    """One merged tensor in dtype `target`: the replacement (if any) plus the terms, merged on `device`
    and returned on the host (a tensor already on a device is merged and returned there). May modify `tensor`."""
    if terms and device != "cpu" and tensor.device.type == "cpu" and _gpu_ready(terms):
        work = tensor.to(device) if replacement is None else replacement.to(device)
        return merge_tensor(name, work, terms, None, target, check_finite).cpu()
    if replacement is not None:  # never modify the adapter's own tensor in place
        tensor = replacement.clone()
    if terms:
        # merge at the wider of the two dtypes (fp64 if either is, else fp32; fp8 always in fp32), round
        # once into the output dtype
        work = (tensor.dtype if target == tensor.dtype and tensor.dtype in FLOATS
                else torch.float64 if torch.float64 in (tensor.dtype, target) else torch.float32)
        merged = apply_terms(tensor.to(work), terms)
        if check_finite and target in FP8:
            merged = _fp8_overflow_as_nan(merged, target)
        merged = merged.to(target)
        if check_finite and not ops.all_finite(merged):  # after rounding: fp16 overflows to Inf
            raise NonFiniteError.merged(name, target)
        return merged
    if check_finite and target in FP8 and tensor.dtype not in FP8:  # a weight merged in fp32, rounded back
        out = _fp8_overflow_as_nan(tensor, target).to(target)
        if not ops.all_finite(out) and ops.all_finite(tensor):
            raise NonFiniteError.merged(name, target)
        return out
    out = tensor.to(target)
    if check_finite and out.dtype != tensor.dtype and not ops.all_finite(out) and ops.all_finite(tensor):
        raise NonFiniteError(f"converting {name} to {target} overflowed to Inf; nothing was written "
                             "(choose a wider --dtype)")
    return out


def _fp8_overflow_as_nan(t: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """torch rounds into fp8 by clipping to ±max (e4m3fn has no Inf), which would hide an overflow:
    values that would round past the largest fp8 number become NaN, which the finite check sees
    (on the device too, without a sync)."""
    return t.masked_fill(t.abs() >= fp8_limit(target), float("nan"))


def _gpu_ready(terms: Sequence[Term]) -> bool:
    """LyCORIS transforms (OFT, IA³ …) keep their tensors on the host: such a weight merges there."""
    return all(t.module.op is None for t in terms)


def streamable(plan: MergePlan, name: str) -> bool:
    """Whether `name` goes through the GPU pipeline: LoRA terms only, no replacement tensor."""
    return name in plan.terms and name not in plan.replace and _gpu_ready(plan.terms[name])


def device_pipeline(plan: MergePlan, check_finite: bool,
                    wanted: Callable[[str], bool]) -> Optional[cuda_pipeline.DevicePipeline]:
    """The streaming pipeline for a merge planned on a GPU (None on the CPU): `checkpoint.rewrite`
    sends it the tensors for which `wanted(name)` holds. The plan's factors move to the device once
    here, so queueing a tensor never waits for a small host-to-device copy."""
    if plan.device == "cpu":
        return None
    pipe = cuda_pipeline.DevicePipeline(cuda_pipeline.backend_for(plan.device), wanted, check_finite)
    for name, terms in plan.terms.items():
        for t in terms if streamable(plan, name) else ():
            t.module = t.module.to(pipe.device)
    return pipe


def row_merge(name: str, dtype: torch.dtype, terms: Optional[Sequence[Term]], replacement: Optional[torch.Tensor],
              target: torch.dtype, check_finite: bool = True, device: str = "cpu") -> Optional[RowMerge]:
    """For a merge that acts on each row of the weight alone and keeps its dtype (plain LoRA terms
    on the CPU, the fused kernel's case), a function that merges a range of rows in place, bit for
    bit as `merge_tensor` merges the whole: a writer can then stream the weight in pieces small
    enough to stay in the CPU's cache. None for everything else (merged whole by `merge_tensor`)."""
    if (device != "cpu" or replacement is not None or not terms or target != dtype or dtype not in MERGE_FLOATS
            or any(t.bias or t.module.expert is not None or t.module.is_dora or t.module.op is not None
                   for t in terms)):
        return None
    factors = [t.module.factors_2d() for t in terms]
    ups, downs, coeffs = [u for u, _ in factors], [d for _, d in factors], [t.coeff for t in terms]

    def merge_rows(rows: torch.Tensor, start: int) -> None:
        stop = start + rows.shape[0]
        ops.merge_(rows.reshape(rows.shape[0], -1), [u[start:stop] for u in ups], downs, coeffs)
        if check_finite and not ops.all_finite(rows):
            raise NonFiniteError.merged(name, target)
    return merge_rows
