"""What an adapter holds: format, ranks, alphas, scales, dtypes, sizes, targets and ‖ΔW‖ per module.

Named `inspection` so it does not shadow the standard library's `inspect`.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Dict, List, Optional

import torch

from .adapter import LoraAdapter, LoraModule
from .dtypes import dtype_name


def delta_norm(m: LoraModule) -> float:
    """‖ΔW‖_F without the dense matrix: ‖s·U D‖² = s²·Σ (UᵀU) ⊙ (D Dᵀ), two r×r products."""
    if m.mid is not None:  # Tucker cores are small; the dense update is the simple, exact route
        return float(torch.linalg.vector_norm(m.dense_delta(torch.float64)))
    u, d = m.factors_2d()
    u, d = u.to(torch.float64), d.to(torch.float64)
    sq = float((u.T @ u).mul_(d @ d.T).sum())
    return abs(m.scale) * math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else float("nan")


def rank_range(ranks) -> str:
    """'8', '4-16', or '-' for no modules: how reports print a set of ranks."""
    ranks = list(ranks)
    if not ranks:
        return "-"
    lo, hi = min(ranks), max(ranks)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_bytes(m: LoraModule) -> int:
    parts = [m.down, m.up, m.magnitude, m.mid]
    return sum(tensor_bytes(t) for t in parts if t is not None)


def adapter_bytes(adapter: LoraAdapter) -> int:
    """Bytes of every tensor the adapter holds (its size on disk, less headers)."""
    return sum(module_bytes(m) for m in adapter) + sum(tensor_bytes(t) for t in adapter.extra.values())


def target_kind(name: str) -> str:
    """The last component of a module name (q_proj, to_k, conv1 …): what a target_modules list names."""
    return name.rsplit(".", 1)[-1]


def _dtype(t: torch.Tensor) -> str:
    return dtype_name(t.dtype)


def _spread(values: Dict[str, float]) -> dict:
    """The most common value and the modules that differ from it."""
    if not values:
        return {"common": None, "min": None, "max": None, "differs": {}}
    common = Counter(values.values()).most_common(1)[0][0]
    return {"common": common, "min": min(values.values()), "max": max(values.values()),
            "differs": {k: v for k, v in values.items() if v != common}}


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def module_rows(adapter: LoraAdapter, norms: bool = True) -> List[dict]:
    rows = []
    for m in adapter:
        rows.append({
            "name": m.name, "kind": m.kind, "weight_shape": list(m.weight_shape), "rank": m.rank,
            "alpha": _number(m.alpha_value), "scale": m.scale, "dtype": _dtype(m.down),
            "dora": m.is_dora, "tucker": m.mid is not None, "parameters": m.down.numel() + m.up.numel()
            + sum(t.numel() for t in (m.magnitude, m.mid) if t is not None),
            "bytes": module_bytes(m), "delta_norm": delta_norm(m) if norms else None,
        })
    return rows


def disk_bytes(path: Optional[str]) -> Optional[int]:
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def report(adapter: LoraAdapter, path: Optional[str] = None, norms: bool = True) -> dict:
    """Everything `loratools inspect` shows, as plain JSON-able data."""
    rows = module_rows(adapter, norms)
    dtypes = Counter(r["dtype"] for r in rows)
    dtypes.update(_dtype(t) for t in adapter.extra.values())
    module_params = sum(r["parameters"] for r in rows)
    extra_params = sum(t.numel() for t in adapter.extra.values())
    return {
        "path": path, "format": adapter.format, "base_model": adapter.base_model,
        "modules": len(rows),
        "rank": _spread({r["name"]: r["rank"] for r in rows}),
        "alpha": _spread({r["name"]: r["alpha"] for r in rows}),
        "scale": _spread({r["name"]: r["scale"] for r in rows}),
        "use_rslora": sorted({m.use_rslora for m in adapter}),
        "dora": adapter.is_dora,
        "dtypes": dict(dtypes),
        "parameters": module_params + extra_params,
        "lora_parameters": module_params,
        "bytes": sum(r["bytes"] for r in rows) + sum(tensor_bytes(t) for t in adapter.extra.values()),
        "disk_bytes": disk_bytes(path),
        "kinds": dict(Counter(r["kind"] for r in rows)),
        "targets": dict(sorted(Counter(target_kind(r["name"]) for r in rows).items())),
        "extra": {k: list(t.shape) for k, t in adapter.extra.items()},
        "delta_norm_total": math.sqrt(sum(r["delta_norm"] ** 2 for r in rows)) if norms else None,
        "module_list": rows,
    }
