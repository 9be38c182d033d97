"""What an adapter holds: format, ranks, alphas, scales, dtypes, sizes, targets and ‖ΔW‖ per module.

Named `inspection` so it does not shadow the standard library's `inspect`.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from .adapter import LoraAdapter, LoraModule
from .archs.family import adapter_family
from .bases import open_base
from .checks import Finding, check_adapter, check_names
from .dtypes import dtype_name
from .errors import FormatError
from .formats import detect, read_adapter
from .loaders import compatibility
from .report import Report


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
            "bytes": module_bytes(m), "delta_norm": m.delta_norm() if norms and m.op is None else None,
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
    for what, keys in TRAINING_KEYS.items():
        value = next((metadata[k] for k in keys if metadata.get(k) not in (None, "", "None")), None)
        if value is not None:
            out[what] = value
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


@dataclass(repr=False)
class InspectReport(Report):
    data: dict  # what `report` returns, with `problems` (check_adapter's findings)
    warnings: List[Finding] = field(default_factory=list)  # module names no known model has

    def summary(self) -> dict:
        d = self.data
        return {"path": d["path"], "format": d["format"], "modules": d["modules"], "rank": d["rank"]["common"],
                "family": (d["family"] or {}).get("name"), "problems": len(d["problems"])}

    def to_dict(self) -> dict:
        return self.data


def inspect(adapter: Union[str, os.PathLike, LoraAdapter], base: Optional[str] = None,
            norms: bool = True) -> InspectReport:
    """What `adapter` (a path, Hub reference or LoraAdapter) holds; never refuses a broken one: its
    problems are listed in the report. `base` (a diffusers folder) resolves kohya/LyCORIS names."""
    if not isinstance(adapter, LoraAdapter):
        _refuse_model_folder(os.fspath(adapter))
    lora = read_adapter(adapter, check=False, base=base, keep_unmatched=True)
    data = report(lora, path=None if isinstance(adapter, LoraAdapter) else os.fspath(adapter), norms=norms)
    data["problems"] = [f.as_dict() for f in check_adapter(lora)]
    return InspectReport(data, check_names(lora))


def _refuse_model_folder(path: str) -> None:
    """A model folder (config.json + weights, e.g. a quantized base) given as the adapter: say what it is."""
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
        return
    try:
        detect(path)
        return
    except FormatError:
        pass
    raise FormatError(f"{path}: a base model, not an adapter: {open_base(path).describe()}; "
                      "give it as --base to validate or merge")


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
        "loads_in": compatibility(adapter),
        # transforms of the base weight (OFT, IA³ …) have no ΔW of their own
        "delta_norm_total": math.sqrt(sum(r["delta_norm"] ** 2 for r in rows if r["delta_norm"] is not None))
        if norms else None,
        "module_list": rows,
    }
