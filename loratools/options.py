"""What every operation's frozen Options checks the same way: weights, the device, and how an
API call given keyword options or a ready Options object gets one Options (never both)."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence, Tuple, Type, TypeVar

import torch

from .errors import UsageError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
OptionsT = TypeVar("OptionsT")


def resolve_device(spec) -> str:
    """'cpu' or 'cuda:N' from auto / cpu / cuda / cuda:N (or a torch.device); a GPU that torch
    cannot see is a UsageError."""
    name = str(spec).strip().lower() if spec is not None else "auto"
    if not _DEVICE.match(name):
        raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if name == "auto":
        return f"cuda:{torch.cuda.current_device()}" if available else "cpu"
    if not available:
        raise UsageError(f"--device {name}: torch sees no CUDA device here (use --device cpu or auto)")
    index = int(name.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) (0-based)")
    return f"cuda:{index}"


def check_weights(weights: Optional[Sequence[float]]) -> Optional[Tuple[float, ...]]:
    """The weights as a tuple of floats (None: 1 each); every one finite."""
    if weights is None or len(weights) == 0:
        return None
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise UsageError(f"weights must be numbers, got {', '.join(map(str, weights))}") from None
    if not all(math.isfinite(w) for w in values):
        raise UsageError(f"weights must be finite numbers, got {', '.join(map(str, weights))}")
    return values


def weights_for(weights: Optional[Tuple[float, ...]], count: int) -> Tuple[float, ...]:
    """One weight per input: the given ones (their count must match) or 1 each."""
    if count == 0:
        raise UsageError("give at least one adapter")
    if weights is None:
        return (1.0,) * count
    if len(weights) != count:
        raise UsageError(f"{len(weights)} weight(s) for {count} adapter(s): give one --weight per adapter")
    return weights


def build(cls: Type[OptionsT], options: Optional[OptionsT], **given) -> OptionsT:
    """`options` when the caller built one, else `cls(**given)`. Giving both is a UsageError, so a
    keyword option is never silently ignored."""
    if options is None:
        return cls(**given)
    if not isinstance(options, cls):
        raise UsageError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    # a required field counts as not given when None
    defaults = {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)
                if f.init}
    clash = [k for k, v in given.items() if k in defaults and v != defaults[k]]
    if clash:
        raise UsageError(f"give {', '.join(clash)} inside options= or as keywords, not both")
    return options
