"""Push adapters and merged models to the Hugging Face Hub, with a model card.

The files go up exactly as they are on disk (a pushed adapter pulls back bit for bit), plus a
README.md model card whose metadata says what the repository is: `base_model`, `library_name`
(`peft` for PEFT adapters), tags `lora` and `base_model:adapter:<base>`, and how it was made.

How an adapter was made is read from its safetensors metadata key `loratools` (PROVENANCE_KEY): a
JSON object that blend / resize / extract write, e.g. {"operation": "blend", "method": "svd",
"inputs": [...], "weights": [...], "rank": 16}; merged models get theirs from `merge --push`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import hub
from . import paths
from . import provenance as provenance_record
from .adapter import LoraAdapter
from .errors import InputNotFoundError, NonFiniteError, UsageError

PROVENANCE_KEY = provenance_record.KEY


@dataclass
class PushPlan:
    repo_id: str
    files: Dict[str, str]  # path in repo -> local file
    card: str
    kind: str  # "adapter" or "model"
    revision: Optional[str] = None
    summary: Dict[str, object] = field(default_factory=dict)

    def rows(self) -> List[List[object]]:
        return [[p, os.path.getsize(src), src] for p, src in sorted(self.files.items())] + \
               [["README.md", len(self.card.encode("utf-8")), "(model card, generated)"]]


def provenance(adapter: LoraAdapter) -> Optional[dict]:
    return provenance_record.read(adapter.metadata)


def check_adapter(adapter: LoraAdapter, where: str) -> None:
    """The checks a push needs beyond what reading did (shapes): something to push, all finite."""
    if len(adapter) == 0 and not adapter.extra:
        raise UsageError(f"{where}: the adapter has no modules; nothing to push")
    for m in adapter:
        for t in (m.down, m.up, m.magnitude, m.mid):
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"{where}: module {m.name} has NaN or Inf values; refusing to push it")


def adapter_files(path: str, adapter: LoraAdapter) -> Dict[str, str]:
    """The files that make up the adapter at `path`, keyed by their name in the repository."""
    from .formats import diffusers, peft

    def peft_files(prefix: str) -> Dict[str, str]:
        weights = peft.WEIGHTS if os.path.isfile(os.path.join(path, prefix, peft.WEIGHTS)) else peft.WEIGHTS_BIN
        return {prefix + name: os.path.join(path, prefix, name) for name in (peft.CONFIG, weights)}

    if os.path.isfile(path):
        return {os.path.basename(path): path}
    if adapter.format == "peft":
        return peft_files("")
    if adapter.format == "peft_diffusion":  # one PEFT folder per pipeline component
        return {k: v for comp in adapter.config.get("components", {}) for k, v in peft_files(comp + "/").items()}
    if adapter.format == "diffusers":
        name = diffusers.WEIGHTS if os.path.isfile(os.path.join(path, diffusers.WEIGHTS)) else diffusers.WEIGHTS_BIN
        return {name: os.path.join(path, name)}
    return {f: os.path.join(path, f) for f in sorted(os.listdir(path))
            if not f.startswith(".") and f != "README.md" and os.path.isfile(os.path.join(path, f))}


def _yaml_card(data, body: str) -> str:
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def _made_with(info: Optional[dict]) -> str:
    if not info:
        return ""
    lines = ["## How it was made", ""]
    for key, value in info.items():
        shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        lines.append(f"- **{key}**: {shown}")
    return "\n".join(lines) + "\n"


def adapter_card(adapter: LoraAdapter, repo_id: str, base_model: Optional[str] = None) -> str:
    from huggingface_hub import ModelCardData

    base = base_model or hub.hub_id(adapter.base_model)
    info = provenance(adapter)
    tags = ["lora", "loratools"] + ([f"base_model:adapter:{base}"] if base else [])
    if info and info.get("operation"):
        tags.append(str(info["operation"]))
    data = ModelCardData(base_model=base, library_name="peft" if adapter.format == "peft" else None, tags=tags)
    ranks = adapter.ranks
    rank = "-" if not ranks else (str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}")
    usage = (f"```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"{repo_id}\")\n```"
             if adapter.format == "peft" else f"```bash\nloratools pull {repo_id} -o adapter\n```")
    body = f"""
# {repo_id.split('/')[-1]}

A LoRA adapter{f' for [{base}](https://huggingface.co/{base})' if base else ''}, in {adapter.format} format.

| modules | rank | parameters | dtype | DoRA |
|---|---|---|---|---|
| {len(adapter)} | {rank} | {adapter.num_parameters():,} | {str(adapter.dtype()).replace('torch.', '')} | {'yes' if adapter.is_dora else 'no'} |

{_made_with(info)}
## Use

{usage}

Uploaded with [loratools](https://github.com/loratools/loratools).
"""
    return _yaml_card(data, body)


def _shown(ref: str) -> str:
    """Hub references as given; local paths by their last component (a card should not leak local paths)."""
    ref = os.fspath(ref)
    return ref if not os.path.exists(ref) else os.path.basename(os.path.normpath(ref))


def merged_card(repo_id: str, base: str, adapters: Sequence[str], weights: Sequence[float],
                folder: str) -> str:
    from huggingface_hub import ModelCardData

    base_id = hub.hub_id(base)
    library = None
    try:
        with paths.open_input(os.path.join(folder, "config.json"), "r", encoding="utf-8") as f:
            library = "transformers" if json.load(f).get("architectures") else None
    except (OSError, ValueError):
        pass
    data = ModelCardData(base_model=base_id, library_name=library, tags=["loratools", "lora", "merge"])
    info = {"operation": "merge (W' = W + Σ w·s·B·A, accumulated in fp32)", "base": _shown(base),
            "adapters": [f"{_shown(a)} (weight {w:g})" for a, w in zip(adapters, weights)]}
    body = f"""
# {repo_id.split('/')[-1]}

{base_id or _shown(base)} with {len(adapters)} LoRA adapter(s) merged into its weights.

{_made_with(info)}
Merged with [loratools](https://github.com/loratools/loratools).
"""
    return _yaml_card(data, body)


def plan_adapter_push(adapter_ref: str, repo_id: str, revision: Optional[str] = None,
                      base_model: Optional[str] = None) -> PushPlan:
    """Read and check the adapter (local or on the Hub), list its files, write its card. No network
    unless the adapter itself is a Hub reference."""
    from .formats import read_adapter

    path = hub.local_path(adapter_ref, kind="adapter")
    adapter = read_adapter(path)
    check_adapter(adapter, adapter_ref)
    files = adapter_files(path, adapter)
    summary = {"format": adapter.format, "modules": len(adapter), "ranks": sorted(set(adapter.ranks))}
    return PushPlan(repo_id, files, adapter_card(adapter, repo_id, base_model), "adapter", revision, summary)


def plan_folder_push(folder: str, repo_id: str, card: str, revision: Optional[str] = None) -> PushPlan:
    """Every file in a model folder (recursively, hidden files and an old README.md excepted)."""
    if not os.path.isdir(folder):
        raise InputNotFoundError(f"{folder}: no such folder")
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not name.startswith(".") and rel != "README.md":
                files[rel] = os.path.join(root, name)
    return PushPlan(repo_id, files, card, "model", revision)


def execute(plan: PushPlan, private: bool = False, commit_message: Optional[str] = None, create_pr: bool = False):
    """Upload the plan in one commit; returns huggingface_hub's CommitInfo."""
    message = commit_message or f"Upload {plan.kind} with loratools"
    return hub.upload(plan.files, plan.repo_id, plan.card, private=private, revision=plan.revision,
                      commit_message=message, create_pr=create_pr)
