"""What an adapter holds: format, ranks, alphas, scales, dtypes, sizes, targets and ‖ΔW‖ per module.

Named `inspection` so it does not shadow the standard library's `inspect`.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Dict, List, Optional

import torch

from .adapter import LoraAdapter, LoraModule
from .linalg import gram_dot
from .archs.family import adapter_family


def delta_norm(m: LoraModule) -> float:
    """‖ΔW‖_F without the dense matrix: ‖s·U D‖² = s²·Σ (UᵀU) ⊙ (D Dᵀ), two r×r products."""
    u, d = (t.to(torch.float64) for t in m.factors_2d(fold_dtype=torch.float64))
    sq = gram_dot(u, d, u, d)
    return abs(m.scale) * math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else float("nan")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_bytes(m: LoraModule) -> int:
    parts = [m.down, m.up, m.magnitude, m.mid]
    return sum(tensor_bytes(t) for t in parts if t is not None)


def target_kind(name: str) -> str:
    """The last component of a module name (q_proj, to_k, conv1 …): what a target_modules list names."""
    return name.rsplit(".", 1)[-1]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


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
    """One row per module. LyCORIS LoHa/LoKr modules show the rank (`dim`) and alpha of the file,
    not those of the exact LoRA they were factored into (which `factored_rank` gives)."""
    native = adapter.config.get("native", {}) if adapter.format == "lycoris" else {}
    rows = []
    for m in adapter:
        own = native.get(m.name, {})
        rank, alpha = own.get("rank", m.rank), own.get("alpha", m.alpha_value)
        rows.append({
            "name": m.name, "kind": m.kind, "weight_shape": list(m.weight_shape), "rank": rank,
            "alpha": _number(alpha), "scale": alpha / rank if own else m.scale, "dtype": _dtype(m.down),
            "algorithm": own.get("algorithm", "lora"), "factored_rank": m.rank,
            "dora": m.is_dora, "tucker": m.mid is not None, "parameters": m.down.numel() + m.up.numel()
            + sum(t.numel() for t in (m.magnitude, m.mid) if t is not None),
            "bytes": module_bytes(m), "delta_norm": delta_norm(m) if norms else None,
        })
    return rows


def _json_value(text: Optional[str]):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _tags(metadata: Dict[str, str]) -> Optional[dict]:
    """kohya's `ss_tag_frequency` ({dataset folder: {tag: count}}) summed over folders."""
    freq = _json_value(metadata.get("ss_tag_frequency"))
    if not isinstance(freq, dict):
        return None
    counts: Counter = Counter()
    for tags in freq.values():
        if isinstance(tags, dict):
            counts.update({str(k).strip(): v for k, v in tags.items() if isinstance(v, (int, float))})
    return {"datasets": len(freq), "distinct": len(counts), "top": counts.most_common(10)}


# summary field -> the metadata keys that hold it (kohya sd-scripts ss_*, then the modelspec standard)
TRAINING_KEYS = {
    "base_model_version": ("ss_base_model_version", "modelspec.architecture"),
    "base_model": ("ss_sd_model_name",), "network_module": ("ss_network_module",),
    "network_dim": ("ss_network_dim",), "network_alpha": ("ss_network_alpha",), "network_args": ("ss_network_args",),
    "resolution": ("ss_resolution", "modelspec.resolution"), "epoch": ("ss_epoch",), "epochs": ("ss_num_epochs",),
    "steps": ("ss_steps", "ss_max_train_steps"), "images": ("ss_num_train_images",),
    "learning_rate": ("ss_learning_rate",), "optimizer": ("ss_optimizer",), "title": ("modelspec.title",),
}


def training_summary(metadata: Dict[str, str]) -> Optional[dict]:
    """What kohya/A1111/Civitai users look for first in a LoRA's training metadata; None if it has none."""
    out = {}
    for field, keys in TRAINING_KEYS.items():
        value = next((metadata[k] for k in keys if metadata.get(k) not in (None, "", "None")), None)
        if value is not None:
            out[field] = value
    tags = _tags(metadata)
    if tags:
        out["tags"] = tags
    return out or None


def disk_bytes(path: Optional[str]) -> Optional[int]:
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def report(adapter: LoraAdapter, path: Optional[str] = None, norms: bool = True) -> dict:
    """Everything `loratools inspect` shows, as plain JSON-able data."""
    rows = module_rows(adapter, norms)
    family = adapter_family(adapter)
    dtypes = Counter(r["dtype"] for r in rows)
    dtypes.update(_dtype(t) for t in adapter.extra.values())
    module_params = sum(r["parameters"] for r in rows)
    extra_params = sum(t.numel() for t in adapter.extra.values())
    return {
        "path": path, "format": adapter.format, "base_model": adapter.base_model,
        "family": dict(zip(("name", "evidence"), family)) if family else None,
        "training": training_summary(adapter.metadata),
        "algorithms": dict(Counter(r["algorithm"] for r in rows)),
        "unresolved": list(adapter.config.get("unresolved", [])),
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
