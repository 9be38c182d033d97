"""Expert-stack LoRAs (PEFT target_parameters on `<mlp>.experts.gate_up_proj` / `down_proj`) for bases
that store their experts unfused, one linear per expert, as Qwen-MoE, Mixtral and most MoE checkpoints
on the Hub do (transformers fuses them when loading): expert e's update moves onto
`experts.e.gate_proj` + `up_proj` (gate_up rows split, gate first, as transformers concatenates them)
or `experts.e.down_proj`; Mixtral's w1/w3/w2 under `block_sparse_moe` likewise. Exact: only the rows
of lora_B are split."""
from __future__ import annotations

import dataclasses
from typing import List

from ..adapter import LoraAdapter, LoraModule
from ..errors import IncompatibleError

UNFUSED = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
RENAMED = ((".mlp.experts", ".block_sparse_moe.experts"),)  # transformers' Mixtral renaming


def unfuse(adapter: LoraAdapter, base) -> LoraAdapter:
    """The adapter with each expert module whose stack the base lacks moved onto the base's
    per-expert linears (where it has them); everything else as it is."""
    if not any(m.expert is not None for m in adapter):
        return adapter
    modules = {}
    for m in adapter:
        for new in _unfused(m, base):
            modules[new.name] = new
    return dataclasses.replace(adapter, modules=modules)


def _unfused(m: LoraModule, base) -> List[LoraModule]:
    if m.expert is None or m.target in base:
        return [m]
    module, _, param = m.param.rpartition(".")
    prefixes = [module] + [module.replace(a, b) for a, b in RENAMED if a in module]
    for prefix in prefixes:
        for names in UNFUSED.get(param, ()):
            targets = [f"{prefix}.{m.expert}.{n}.weight" for n in names]
            if not all(t in base for t in targets):
                continue
            if m.fan_in_fan_out:
                raise IncompatibleError(f"module {m.name}: an [experts, in, out] stack's LoRA cannot go onto the "
                                        f"base's per-expert linears {', '.join(targets)}")
            rows = [base.shape(t)[0] for t in targets]
            if sum(rows) != m.up.shape[0]:
                return [m]  # the shape check says what does not fit
            ups = m.up.split(rows)
            return [LoraModule(t[: -len(".weight")], m.down, u, alpha=m.alpha_value, use_rslora=m.use_rslora)
                    for t, u in zip(targets, ups)]
    return [m]
