"""PEFT LoRA adapters: a folder with adapter_config.json + adapter_model.safetensors (or .bin).

Keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, embeddings
`<module>.lora_embedding_A` / `_B`, DoRA `<module>.lora_magnitude_vector`; any other key
(modules_to_save, `…base_layer.weight` of resized embeddings) is carried as an extra tensor.
Per-module rank and alpha come from `rank_pattern` / `alpha_pattern`, whose keys PEFT treats as
regexes matched as `(.*\\.)?(key)$` against the module name.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

from .. import safetensors_io
from .. import paths, pickled
from .. import patterns as patterns_
from ..adapter import LoraAdapter, LoraModule
from ..errors import FormatError, IncompatibleError, InputNotFoundError
from . import peft_experts
from .record import Format

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
_SUFFIXES = {  # key suffix -> (role, kind)
    ".lora_A.weight": ("down", None), ".lora_B.weight": ("up", None),
    ".lora_embedding_A": ("down", "embedding"), ".lora_embedding_B": ("up", "embedding"),
    ".lora_magnitude_vector": ("magnitude", None), ".lora_magnitude_vector.weight": ("magnitude", None),
}


def detect(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def pattern_value(patterns: Dict[str, object], name: str, default):
    """PEFT's get_pattern_key: the first pattern key that matches the module name wins."""
    for key, value in patterns.items():
        if patterns_.key_matches(key, name):
            return value
    return default


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with paths.open_input(path, "r", encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise InputNotFoundError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd numbers or nesting
        raise FormatError(f"{path}: invalid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FormatError(f"{path}: peft_type {peft_type} is not LoRA; loratools handles LoRA adapters only")
    check_config(config, path)
    return config


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer beyond float's range (10**400)
        return False


def check_config(config: dict, path: str) -> None:
    """The fields `read` uses have the types PEFT gives them; anything else is a broken config."""
    def bad(field, why):
        return FormatError(f"{path}: {field} {why}")

    if "r" in config and not (isinstance(config["r"], int) and not isinstance(config["r"], bool)
                              and 0 < config["r"] < 1 << 31):
        raise bad("r", f"must be a positive integer, got {config['r']!r}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise bad("lora_alpha", f"must be a finite number, got {config['lora_alpha']!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise bad(field, "must be an object mapping module patterns to numbers")
        for key, value in patterns.items():
            if not _is_number(value) or (field == "rank_pattern" and (value != int(value) or value <= 0)):
                raise bad(field, f"has an invalid value {value!r} for {key!r}")
            if not isinstance(key, str):
                raise bad(field, f"has a key that is not a string: {key!r}")
            patterns_.peft_key(key, f"{CONFIG}: {field}")  # refuses an invalid pattern
    if isinstance(config.get("target_modules"), str):
        patterns_.UserPattern(config["target_modules"], f"{CONFIG}: target_modules")  # refuses an invalid one
    for field in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise bad(field, f"must be true or false, got {config[field]!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", f"must be a string, got {base!r}")


def read_tensors(folder: str) -> tuple:
    st, binp = os.path.join(folder, WEIGHTS), os.path.join(folder, WEIGHTS_BIN)
    if os.path.lexists(st):
        return safetensors_io.load(st)
    if os.path.lexists(binp):
        if os.path.isdir(binp):
            raise FormatError(f"{binp}: is a directory, expected a file")
        return pickled.load_state_dict(binp), {}
    raise InputNotFoundError(f"{folder}: no {WEIGHTS} or {WEIGHTS_BIN}")


def read(folder: str, transposed_experts: Optional[bool] = None) -> LoraAdapter:
    """`transposed_experts`: the base stores expert stacks [E, in, out] (see `peft_experts`)."""
    config = read_config(folder)
    tensors, metadata = read_tensors(folder)
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    kinds: Dict[str, str] = {}
    extra: Dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, (role, kind) in _SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                parts.setdefault(module, {})[role] = tensor
                if kind:
                    kinds[module] = kind
                break
        else:
            if ".lora_" in name:  # a LoRA tensor we do not understand (lora_bias, lora_C …): never drop it
                raise FormatError(f"{folder}: unknown LoRA tensor {key} (loratools reads lora_A/lora_B, "
                                  "lora_embedding_A/B and lora_magnitude_vector)")
            extra[name] = tensor
    default_alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    adapter = LoraAdapter(extra=extra, base_model=config.get("base_model_name_or_path"), format="peft",
                          config=config, metadata=metadata)
    for m in peft_experts.split(folder, config, parts, transposed_experts, pattern_value):
        adapter.add(m)
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            missing = "lora_A" if "down" not in p else "lora_B"
            raise FormatError(f"{folder}: module {module} has no {missing} tensor")
        kind = kinds.get(module) or ("conv" if p["down"].dim() == 4 else "linear")
        adapter.add(LoraModule(
            name=module, down=p["down"], up=p["up"],
            alpha=float(pattern_value(alpha_pattern, module, default_alpha)),
            kind=kind, use_rslora=rslora, magnitude=p.get("magnitude"),
            fan_in_fan_out=fifo and kind == "linear"))
    rank_pattern = config.get("rank_pattern") or {}
    for m in adapter:  # a config that disagrees with the tensors is a broken adapter
        if m.expert is not None:
            continue  # split checked them
        want = int(pattern_value(rank_pattern, m.name, config.get("r", m.rank)))
        if want != m.rank:
            raise FormatError(f"{folder}: module {m.name} has rank {m.rank} but the config says {want}")
    return adapter


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _plain_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def build_config(adapter: LoraAdapter, stand_ins=()) -> dict:
    """adapter_config.json for the adapter's current modules, starting from what was read.
    `stand_ins`: one module per expert-stack parameter (`peft_experts.join`)."""
    if not len(adapter):
        raise FormatError("the adapter has no LoRA modules to write")
    config = dict(adapter.config)
    plain = [m for m in adapter if m.expert is None]
    mods = plain + list(stand_ins)
    dora = {m.is_dora for m in mods}
    if len(dora) > 1:
        raise IncompatibleError("PEFT cannot hold DoRA and plain LoRA modules in one adapter")
    fifo = {m.fan_in_fan_out for m in plain if m.kind == "linear"}
    if len(fifo) > 1:
        raise IncompatibleError("PEFT cannot hold fan_in_fan_out and plain linear modules in one adapter")
    if any(m.mid is not None for m in mods):
        raise IncompatibleError("PEFT cannot hold Tucker (lora_mid) modules; convert with --rank to factor them")
    rslora = all(m.use_rslora for m in mods)

    def alpha_of(m: LoraModule) -> float:
        # a mixed rsLoRA set is folded into alpha exactly: alpha/sqrt(r) == (alpha*sqrt(r))/r
        if m.use_rslora and not rslora:
            return m.alpha_value * math.sqrt(m.rank)
        return m.alpha_value

    r = _most_common(m.rank for m in mods)
    alpha = _most_common(alpha_of(m) for m in mods)
    rank_pattern = _patterns(mods, lambda m: m.rank, r, adapter.config.get("rank_pattern") or {})
    alpha_pattern = _patterns(mods, lambda m: _plain_number(alpha_of(m)), _plain_number(alpha),
                              adapter.config.get("alpha_pattern") or {})
    # keep the old config's target_modules only if it still names exactly these modules
    targets = sorted({m.name for m in plain})
    old_targets = config.get("target_modules")
    if not (isinstance(old_targets, (list, str)) and _targets_match(old_targets, targets)):
        config["target_modules"] = targets
    params = sorted(m.name for m in stand_ins)
    old_params = config.get("target_parameters")
    if params and not (isinstance(old_params, list) and _targets_match(old_params, params)):
        config["target_parameters"] = params
    elif not params:
        config.pop("target_parameters", None)
    config.update({
        "peft_type": "LORA", "r": r, "lora_alpha": _plain_number(alpha),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": rslora, "use_dora": dora.pop(), "fan_in_fan_out": bool(fifo and fifo.pop()),
        "base_model_name_or_path": adapter.base_model,
    })
    config.setdefault("bias", "none")
    config.setdefault("task_type", None)
    config.setdefault("inference_mode", True)
    # a suffix target may also hit base modules this adapter has no tensors for; PEFT's default
    # init gives those a zero B, so they stay no-ops (init_lora_weights=False would make them random)
    config["init_lora_weights"] = True
    return config


def _patterns(mods, value_of, default, old_patterns: dict) -> dict:
    """{pattern: value} for the modules whose value differs from `default`. The keys a read config
    used are kept when they still give every module its value (PEFT matches the first key that
    fits); otherwise each deviating module gets its own exact, escaped name."""
    reused = {}
    for m in mods:
        if value_of(m) != default:
            reused[_pattern_key(old_patterns, m.name)] = value_of(m)
    if all(pattern_value(reused, m.name, default) == value_of(m) for m in mods):
        return reused
    return {re.escape(m.name): value_of(m) for m in mods if value_of(m) != default}


def _pattern_key(old_patterns: dict, name: str) -> str:
    """Reuse the key a read config used for this module, else the exact, escaped module name."""
    for key in old_patterns:
        if patterns_.key_matches(key, name):
            return key
    return re.escape(name)


def _targets_match(old, names) -> bool:
    """Every module is targeted and every target names a module (PEFT's suffix rule)."""
    if isinstance(old, str):
        target = patterns_.UserPattern(old, f"{CONFIG}: target_modules")
        return all(target.fullmatch(n) for n in names)
    hit = lambda n, t: n == t or n.endswith("." + t)  # noqa: E731
    return all(any(hit(n, t) for t in old) for n in names) and all(any(hit(n, t) for n in names) for t in old)


def magnitude_shape(m: LoraModule) -> Tuple[int, ...]:
    """PEFT's (and so diffusers') DoRA magnitude: [out] for linear layers, [1, out, 1, 1] for convs
    (its weight norm keeps the conv's dims); read in either shape, written in this one."""
    out = m.magnitude.numel()
    return (1, out) + (1,) * (m.down.dim() - 2) if m.kind == "conv" else (out,)


def state_dict(adapter: LoraAdapter) -> Dict[str, torch.Tensor]:
    return tensors_and_stand_ins(adapter)[0]


def tensors_and_stand_ins(adapter: LoraAdapter) -> Tuple[Dict[str, torch.Tensor], list]:
    """The tensors to save, and the stand-ins `build_config` needs for expert stacks."""
    experts, stand_ins = peft_experts.join([m for m in adapter if m.expert is not None],
                                           all(m.use_rslora for m in adapter))
    out: Dict[str, torch.Tensor] = {PREFIX + k: v for k, v in experts.items()}
    for m in adapter:
        if m.expert is not None:
            continue
        base = PREFIX + m.name
        if m.kind == "embedding":
            out[base + ".lora_embedding_A"], out[base + ".lora_embedding_B"] = m.down, m.up
        else:
            out[base + ".lora_A.weight"], out[base + ".lora_B.weight"] = m.down, m.up
        if m.magnitude is not None:
            out[base + ".lora_magnitude_vector"] = m.magnitude.reshape(magnitude_shape(m))
    for name, t in adapter.extra.items():
        out[PREFIX + name] = t
    return {k: v.contiguous() for k, v in out.items()}, stand_ins


def write(adapter: LoraAdapter, folder: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write into an existing (temporary) folder."""
    tensors, stand_ins = tensors_and_stand_ins(adapter)
    config = build_config(adapter, stand_ins)
    meta = {"format": "pt"}
    meta.update(metadata or {})
    safetensors_io.save(os.path.join(folder, WEIGHTS), tensors, meta)
    with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


FORMAT = Format("peft", detect, read, write, folder=True, files=((CONFIG,), (WEIGHTS, WEIGHTS_BIN)),
                options=("transposed_experts",))
