"""PEFT `target_parameters` LoRAs (lora.ParamWrapper): LoRA on 3-D fused expert stacks such as
`mlp.experts.gate_up_proj` [E, d1, d2] (gpt-oss, Qwen3-MoE, Mixtral and the other transformers 5 MoE
models), read as one 2-D module per expert and written back in PEFT's layout.

PEFT keeps one lora_A [E·r, a] (rows expert-major) and one lora_B [b, r·E] (columns rank-major) per
parameter: expert e's factors are A.view(E, r, a)[e] and B.view(b, r, E)[:, :, e], its update is
s·B_e A_e [b, a] where the model stores experts as [E, out, in] (the transformers default) and the
transpose where it stores [E, in, out] (`is_transposed` experts: gpt-oss, Aria), which a base's
config.json tells (`transposed_experts`). Several parameters of one module are nested wrappers, keyed
`<module>[.base_layer]*.lora_A.weight`: the module's first parameter is the innermost.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..adapter import LoraModule
from ..errors import FormatError, IncompatibleError

WRAPPED = ".base_layer"
# model types whose expert stacks are [E, in, out] (transformers' `use_experts_implementation(is_transposed=True)`)
TRANSPOSED = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})
# parameter order inside the transformers expert modules (nesting follows it); others sort after, by name
ORDER = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3", "down_proj", "w2")


def transposed_for(config: Optional[dict]) -> Optional[bool]:
    """From a base's config.json: are its expert stacks [E, in, out]? None when it has none we know."""
    if not isinstance(config, dict):
        return None
    return config.get("model_type") in TRANSPOSED


def _order(param: str) -> Tuple[int, str]:
    return (ORDER.index(param) if param in ORDER else len(ORDER), param)


def _params_of(module: str, targets: List[str]) -> List[str]:
    """The targeted parameters of `module`, innermost wrapper first (PEFT's suffix rule)."""
    found = set()
    for t in targets:
        param = t.rpartition(".")[2]
        key = f"{module}.{param}"
        if key == t or key.endswith("." + t):
            found.add(param)
    return sorted(found, key=_order)


def split(folder: str, config: dict, parts: Dict[str, Dict[str, torch.Tensor]],
          transposed: Optional[bool], pattern: Callable) -> List[LoraModule]:
    """Take the target_parameters entries out of `parts` (module -> {down, up}) and return them as
    per-expert modules. `pattern(patterns, name, default)`: PEFT's rank/alpha pattern lookup."""
    targets = config.get("target_parameters") or []
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise FormatError(f"{folder}: target_parameters must be a list of parameter names")
    if not targets:
        return []
    default_r = config.get("r", 8)
    default_alpha = float(config.get("lora_alpha", default_r))
    rslora = bool(config.get("use_rslora", False))
    out: List[LoraModule] = []
    for key in sorted(parts):
        module, depth = key, 0
        while module.endswith(WRAPPED):
            module, depth = module[: -len(WRAPPED)], depth + 1
        params = _params_of(module, targets)
        if not params:
            if depth:
                raise FormatError(f"{folder}: {key} is a wrapped layer but target_parameters names none of its "
                                  "parameters")
            continue
        if depth >= len(params):
            raise FormatError(f"{folder}: {key}: {depth + 1} nested LoRA(s) on {module} but target_parameters "
                              f"names {len(params)} of its parameters ({', '.join(params)})")
        param = f"{module}.{params[len(params) - 1 - depth]}"  # the outermost wrapper is the last parameter
        p = parts.pop(key)
        if "down" not in p or "up" not in p or p["down"].dim() != 2 or p["up"].dim() != 2:
            raise FormatError(f"{folder}: {param}: needs 2-D lora_A and lora_B tensors")
        r = int(pattern(config.get("rank_pattern") or {}, param, default_r))
        alpha = float(pattern(config.get("alpha_pattern") or {}, param, default_alpha))
        down, up = p["down"], p["up"]
        rows = down.shape[0]
        if rows % r or up.shape[1] != rows:
            raise FormatError(f"{folder}: {param}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not "
                              f"hold rank-{r} factors for a whole number of experts")
        experts = rows // r
        a3, b3 = down.reshape(experts, r, -1), up.reshape(up.shape[0], r, experts)
        for e in range(experts):
            out.append(LoraModule(f"{param}.{e}", a3[e].contiguous(), b3[:, :, e].contiguous(), alpha=alpha,
                                  use_rslora=rslora, fan_in_fan_out=bool(transposed), param=param, expert=e))
    return out


def join(mods: List[LoraModule], rslora: bool) -> Tuple[Dict[str, torch.Tensor], List[LoraModule]]:
    """PEFT tensors (keys without the `base_model.model.` prefix) for the per-expert modules, and one
    stand-in module per parameter (name, rank, alpha) for the config's patterns. Experts of one
    parameter share PEFT's one rank and alpha: lower ranks are padded with zeros and a different
    scale is folded into lora_B, both exact; an expert without a module gets zero factors."""
    by_param: Dict[str, Dict[int, LoraModule]] = {}
    for m in mods:
        by_param.setdefault(m.param, {})[m.expert] = m
    tensors: Dict[str, torch.Tensor] = {}
    stand_ins: List[LoraModule] = []
    modules: Dict[str, List[str]] = {}
    for param in by_param:
        module, _, name = param.rpartition(".")
        modules.setdefault(module, []).append(name)
    for param, experts in sorted(by_param.items()):
        ms = list(experts.values())
        if len({m.fan_in_fan_out for m in ms}) > 1:
            raise IncompatibleError(f"{param}: experts in two layouts")
        r = max(m.rank for m in ms)
        first = max(ms, key=lambda m: m.rank)
        alpha = first.alpha_value * (math.sqrt(r) if first.use_rslora and not rslora else 1.0)
        scale = alpha / (math.sqrt(r) if rslora else r)
        count = max(experts) + 1
        a_in, b_out = first.down.shape[1], first.up.shape[0]
        dtype = first.down.dtype
        a3 = torch.zeros(count, r, a_in, dtype=dtype)
        b3 = torch.zeros(b_out, r, count, dtype=first.up.dtype)
        for e, m in experts.items():
            if (m.down.shape[1], m.up.shape[0]) != (a_in, b_out):
                raise IncompatibleError(f"{param}: experts {first.expert} and {e} have different shapes")
            a3[e, : m.rank] = m.down
            fold = m.scale / scale
            b3[:, : m.rank, e] = m.up if fold == 1.0 else (m.up.float() * fold).to(b3.dtype)
        module, _, name = param.rpartition(".")
        order = sorted(modules[module], key=_order)
        key = module + WRAPPED * (len(order) - 1 - order.index(name))
        tensors[key + ".lora_A.weight"] = a3.reshape(count * r, a_in)
        tensors[key + ".lora_B.weight"] = b3.reshape(b_out, r * count)
        stand_ins.append(LoraModule(param, torch.zeros(r, 1), torch.zeros(1, r), alpha=alpha, use_rslora=rslora))
    return tensors, stand_ins
