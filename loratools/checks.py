"""Checks an adapter alone and against a base model; `merge` and every reader run the same checks.

A check returns `Finding`s instead of raising, so `loratools validate` can list them all; callers
that must stop (readers, merge) pass the findings to `raise_errors`, which raises the first error
as the matching `LoraToolsError`. Warnings (suspicious but well-formed) never stop a command.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Type

import torch

from .adapter import LoraAdapter, LoraModule, fit_adapter
from .archs.family import mismatch
from .checkpoint import Checkpoint
from .dtypes import BASE_FLOATS, FLOATS
from .errors import (FormatError, IncompatibleError, LoraToolsError, NonFiniteError, ShapeMismatchError)
from .ops import all_finite

MAX_SCALE = 16.0  # alpha/r above this is rare in practice (usual: 0.01 .. 4)
MAX_DELTA_RATIO = 1.0  # an update larger than the weight it changes is almost always a mistake


@dataclass
class Finding:
    code: str  # non-finite, structure, dtype, empty, absent, shape, base-dtype, scale, delta-norm, family,
    # unresolved, pattern
    message: str  # one line, names the module
    severity: str = "error"  # or "warning"
    module: Optional[str] = None
    exc: Type[LoraToolsError] = FormatError

    def as_dict(self) -> dict:
        return {"severity": self.severity, "code": self.code, "module": self.module, "message": self.message}


def _non_finite(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements (0 fast for the common clean case)."""
    return 0 if all_finite(t) else int((~torch.isfinite(t)).sum())


def _tensor_findings(where: str, role: str, t: torch.Tensor, module: Optional[str]) -> List[Finding]:
    if t.dtype not in FLOATS:
        return [Finding("dtype", f"{where}: {role} has dtype {t.dtype}; LoRA factors must be floating point",
                        module=module)]
    bad = _non_finite(t)
    if bad:
        return [Finding("non-finite", f"{where}: {role} contains NaN or Inf ({bad} of {t.numel()} values)",
                        module=module, exc=NonFiniteError)]
    return []


def check_module(m: LoraModule) -> List[Finding]:
    where = f"module {m.name}"
    out: List[Finding] = []
    try:
        m.check()
    except ShapeMismatchError as e:  # factors changed after construction
        return [Finding("structure", str(e), module=m.name, exc=ShapeMismatchError)]
    for role, t in (("down (lora_A)", m.down), ("up (lora_B)", m.up), ("magnitude", m.magnitude), ("mid", m.mid)):
        if t is not None:
            out += _tensor_findings(where, role, t, m.name)
    if m.magnitude is not None and m.kind != "embedding" and m.magnitude.numel() != m.up.shape[0]:
        out.append(Finding("structure", f"{where}: DoRA magnitude has {m.magnitude.numel()} values for "
                           f"{m.up.shape[0]} output channels", module=m.name, exc=ShapeMismatchError))
    alpha = m.alpha_value
    if not math.isfinite(alpha):
        out.append(Finding("scale", f"{where}: alpha is {alpha}", module=m.name, exc=NonFiniteError))
    elif m.scale == 0:
        out.append(Finding("scale", f"{where}: alpha is 0, so the update is zero", "warning", m.name))
    elif m.scale < 0:
        out.append(Finding("scale", f"{where}: negative alpha {alpha:g} flips the update's sign", "warning", m.name))
    elif m.scale > MAX_SCALE:
        out.append(Finding("scale", f"{where}: scale alpha/{'sqrt(r)' if m.use_rslora else 'r'} = {m.scale:g} "
                           f"(alpha {alpha:g}, rank {m.rank}) is unusually large", "warning", m.name))
    return out


def check_adapter(adapter: LoraAdapter) -> List[Finding]:
    """Checks that need nothing but the adapter: structure, dtypes, NaN/Inf, scales."""
    if not adapter.extra and not len(adapter):
        return [Finding("empty", "the adapter holds no LoRA modules and no other tensors")]
    out: List[Finding] = []
    if not len(adapter):  # only unrelated tensors: not a LoRA adapter of anything
        out.append(Finding("empty", f"the adapter holds no LoRA modules (only {len(adapter.extra)} other tensor(s), "
                           f"e.g. {next(iter(adapter.extra))})"))
    for m in adapter:
        out += check_module(m)
    for name, t in adapter.extra.items():
        if t.is_floating_point():
            out += _tensor_findings(f"tensor {name}", "it", t, name)
    return out


def check_names(adapter: LoraAdapter) -> List[Finding]:
    """One warning for kohya/LyCORIS names that no known module has (kept as they are in the file)."""
    names = adapter.config.get("unresolved") or []
    if not names:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [Finding("unresolved", f"{len(names)} module name(s) match no module of {adapter.config.get('names_from')} "
                    f"and are shown as they are in the file: {shown}", "warning")]


def check_patterns(adapter: LoraAdapter) -> List[Finding]:
    """PEFT's alpha_pattern/rank_pattern: GGUF converters (llama.cpp's convert_lora_to_gguf.py) write
    one lora_alpha for every module and never read them, so per-module scales convert wrongly."""
    configs = [adapter.config] + [c for c in (adapter.config.get("components") or {}).values() if isinstance(c, dict)]
    out: List[Finding] = []
    for key, what in (("alpha_pattern", "alpha"), ("rank_pattern", "rank")):
        patterns = sorted({p for c in configs for p in (c.get(key) or {})})
        if patterns:
            out.append(Finding("pattern", f"{key} gives module(s) matching {', '.join(patterns[:4])} their own {what}; "
                               "GGUF converters (llama.cpp convert_lora_to_gguf.py) ignore it and use one lora_alpha",
                               "warning"))
    return out


def extra_target(name: str) -> str:
    """PEFT saves a resized embedding as `<module>.base_layer.weight`: it replaces `<module>.weight`."""
    return name.replace(".base_layer.", ".")


def check_base(adapter: LoraAdapter, ckpt) -> List[Finding]:
    """Does every module and extra tensor fit a weight of the base (a `Checkpoint` or a diffusion
    base: anything with `in`, `shape` and `dtype`; headers only)? Where modules do not fit and the
    adapter's family differs from the base's, the first finding names both."""
    out = _fit_findings(adapter, ckpt)
    if out:
        named = mismatch(adapter, getattr(ckpt, "family", None), getattr(ckpt, "noun", "model"))
        if named:
            out.insert(0, Finding("family", named, exc=IncompatibleError))
    return out


def target_shape(ckpt, m) -> Optional[Tuple[int, ...]]:
    """The shape the module's update must have in the base: one expert's slice of a 3-D stack."""
    shape = tuple(ckpt.shape(m.target))
    if m.expert is None:
        return shape
    return shape[1:] if len(shape) == 3 and m.expert < shape[0] else None


def _fit_findings(adapter: LoraAdapter, ckpt) -> List[Finding]:
    out: List[Finding] = []
    for m in adapter:
        target = m.target
        if target not in ckpt:
            out.append(Finding("absent", f"module {m.name}: the base has no weight {target}", module=m.name,
                               exc=IncompatibleError))
        elif target_shape(ckpt, m) != tuple(m.weight_shape):
            out.append(Finding("shape", f"module {m.name}: the adapter's update has shape {tuple(m.weight_shape)} "
                               f"but the base weight {target} has shape {tuple(ckpt.shape(target))} "
                               "(adapter for another model?)", module=m.name, exc=ShapeMismatchError))
        elif ckpt.dtype(target) not in BASE_FLOATS:
            out.append(Finding("base-dtype", f"module {m.name}: base weight dtype {ckpt.dtype(target)} cannot be "
                               "merged into", module=m.name, exc=IncompatibleError))
    for name, tensor in adapter.extra.items():
        target = extra_target(name)
        if target not in ckpt:
            out.append(Finding("absent", f"tensor {name}: the base has no {target} for it to replace", module=name,
                               exc=IncompatibleError))
        elif tuple(ckpt.shape(target)) != tuple(tensor.shape):
            out.append(Finding("shape", f"{name}: the adapter's tensor has shape {tuple(tensor.shape)} but the base "
                               f"has {tuple(ckpt.shape(target))}", module=name, exc=ShapeMismatchError))
    return out


def check_delta_norms(adapter: LoraAdapter, ckpt, max_ratio: float = MAX_DELTA_RATIO) -> List[Finding]:
    """Warn where ‖ΔW‖ exceeds `max_ratio`·‖W‖ (reads each targeted base weight, one at a time)."""
    fits = [m for m in adapter if m.op is None and m.target in ckpt and target_shape(ckpt, m) == tuple(m.weight_shape)
            and ckpt.dtype(m.target) in FLOATS]  # the rest are check_base's findings
    norms = _weight_norms(ckpt, {m.target for m in fits}, {m.target for m in fits if m.expert is not None})
    out: List[Finding] = []
    for m in fits:
        w = norms[m.target]
        w = float(w if m.expert is None else w[m.expert])
        d = m.delta_norm()
        if d > max_ratio * w:
            ratio = f"{d / w:.3g}x" if w > 0 else "infinitely"
            out.append(Finding("delta-norm", f"module {m.name}: the update's norm {d:.4g} is {ratio} the base "
                               f"weight's {w:.4g}", "warning", m.name))
    return out


def _norm(t: torch.Tensor, per_expert: bool):
    """‖W‖, or one per expert of a 3-D expert stack; fp32 accumulation is plenty for a 1x threshold."""
    return torch.linalg.vector_norm(t, dim=(1, 2) if per_expert else None, dtype=torch.float32)


def _weight_norms(ckpt, targets, stacks=frozenset()) -> dict:
    """‖W‖ of each target (a tensor of per-expert norms for the expert stacks among them); bases that
    read in bulk (one shard open at a time) do so, others read their (virtual) weights one by one."""
    many = getattr(ckpt, "read_many", None)
    pairs = many(targets) if many else ((t, ckpt.read(t)) for t in targets)
    return {name: _norm(t, name in stacks) for name, t in pairs}


def check_all(adapter: LoraAdapter, base=None, norms: bool = True) -> List[Finding]:
    """All findings for `adapter`, and against `base` when given: a model folder path or any base
    object `bases.open_base` returns (Checkpoint, diffusers pipeline, single-file SD checkpoint)."""
    findings = check_adapter(adapter)
    if base is not None:
        ckpt = Checkpoint(base) if isinstance(base, (str, os.PathLike)) else base
        if hasattr(ckpt, "fit"):  # the base's own layout hook (diffusion names, unfused experts), as merge does
            adapter = ckpt.fit(adapter)
        adapter = fit_adapter(adapter, ckpt)  # factor layouts fitted to the base, as plan_merge does
        findings += check_base(adapter, ckpt)
        if norms:
            findings += check_delta_norms(adapter, ckpt)
    return findings


def errors(findings: Sequence[Finding]) -> List[Finding]:
    return [f for f in findings if f.severity == "error"]


def absent_message(names: Sequence[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(names)} adapter module(s) match no weight in the base: {shown}"


def raise_errors(findings: Sequence[Finding], where: str = "") -> None:
    """Raise the first error (modules absent from the base are reported together); ignore warnings."""
    errs = errors(findings)
    if not errs:
        return
    prefix = f"{where}: " if where else ""
    first = next((f for f in errs if f.code != "absent"), None)
    if first is not None:
        more = f" (and {len(errs) - 1} more problem(s); run `loratools validate`)" if len(errs) > 1 else ""
        raise first.exc(prefix + first.message + more)
    raise IncompatibleError(prefix + absent_message([f.module for f in errs]))
