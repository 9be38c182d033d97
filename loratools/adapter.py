"""The in-memory adapter model that every command works on.

A `LoraModule` keeps its factors exactly as the file stored them (no reshaping, no dtype change),
so writing back what was read is bit-exact. The module owns its geometry: everything else asks it
for the 2-D factor pair (a kohya Tucker core folded in exactly), the dense update and the shape of
the weight it updates, instead of special-casing kinds and Tucker cores itself.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .errors import FormatError, IncompatibleError, ShapeMismatchError
from .linalg import gram_dot
from .lycoris_algos import Transform

KINDS = ("linear", "conv", "embedding")


@dataclass
class LoraModule:
    """One LoRA on the base weight `<name>.weight`.

    linear:    down [r, in],          up [out, r]          ΔW = s·up@down            W [out, in]
    conv:      down [r, in, kh, kw],  up [out, r, 1, 1]    ΔW = s·(up@down).reshape   W [out, in, kh, kw]
    embedding: down [r, num_emb],     up [dim, r]          ΔW = s·(up@down).T         W [num_emb, dim]
    fan_in_fan_out (GPT-2 Conv1D): the base stores W [in, out], so ΔW is transposed.
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: Optional[float] = None  # None means alpha = rank
    kind: str = "linear"
    use_rslora: bool = False
    magnitude: Optional[torch.Tensor] = None  # DoRA magnitude [out]
    fan_in_fan_out: bool = False
    mid: Optional[torch.Tensor] = None  # kohya LoCon Tucker core [r, r, kh, kw]
    # a LyCORIS update that depends on the base weight (OFT, IA³, GLoRA …): merged by `op.apply`;
    # down/up are then zero placeholders that only carry the weight's shape (0 where unknown)
    op: Optional[Transform] = None
    # one expert of a 3-D fused expert stack (PEFT target_parameters): the stack's parameter name and
    # the expert's index; the update is the 2-D slice param[expert] (fan_in_fan_out: stored [in, out])
    param: Optional[str] = None
    expert: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"module {self.name}: unknown kind {self.kind!r} (expected one of {KINDS})")
        self.check()

    @property
    def target(self) -> str:
        """The base parameter the update goes into."""
        return self.param if self.param is not None else self.name + ".weight"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        r = self.rank
        return self.alpha_value / (math.sqrt(r) if self.use_rslora else r)

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def check(self) -> None:
        """Raise ShapeMismatchError unless down and up can form a product of this kind."""
        d, u, n = self.down, self.up, self.name
        want_dims = {"linear": (2, 2), "embedding": (2, 2), "conv": (4, 4)}[self.kind]
        if self.mid is None and (d.dim(), u.dim()) != want_dims:
            raise ShapeMismatchError(
                f"module {n}: {self.kind} factors must be {want_dims[0]}-D and {want_dims[1]}-D, "
                f"got down {tuple(d.shape)} and up {tuple(u.shape)}")
        if self.kind == "conv" and self.mid is None and tuple(u.shape[2:]) != (1, 1):
            raise ShapeMismatchError(f"module {n}: conv up must be [out, r, 1, 1], got {tuple(u.shape)}")
        if u.shape[1] != d.shape[0]:
            raise ShapeMismatchError(
                f"module {n}: rank mismatch, down {tuple(d.shape)} has rank {d.shape[0]} "
                f"but up {tuple(u.shape)} has rank {u.shape[1]}")
        if d.shape[0] < 1:
            raise ShapeMismatchError(f"module {n}: rank 0")
        mid = self.mid
        if mid is not None and (mid.dim() != 4 or tuple(mid.shape[:2]) != (u.shape[1], d.shape[0])):
            raise ShapeMismatchError(f"module {n}: Tucker core must be [{u.shape[1]}, {d.shape[0]}, kh, kw], "
                                     f"got {tuple(mid.shape)}")

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        """Shape of the base weight this module updates."""
        if self.kind == "embedding":
            return (int(self.down.shape[1]), int(self.up.shape[0]))
        if self.kind == "conv":
            if self.mid is not None:  # Tucker: down [r, in, 1, 1], mid [r, r, kh, kw]
                return (int(self.up.shape[0]), int(self.down.shape[1])) + tuple(int(x) for x in self.mid.shape[2:])
            return (int(self.up.shape[0]),) + tuple(int(x) for x in self.down.shape[1:])
        out, inp = int(self.up.shape[0]), int(self.down.shape[1])
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def stored_factors(self, fold_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, n]) flattened in the stored orientation: `scale · up @ down` is the
        update as stored (transposed for embeddings and fan_in_fan_out). A Tucker core is folded into
        down exactly, ΔW[o,i,h,w] = Σ up[o,a] (Σ mid[a,b,h,w] down[b,i]), in `fold_dtype`; otherwise
        the factors keep their stored dtype."""
        if self.op is not None:
            raise IncompatibleError(
                f"module {self.name}: a LyCORIS {self.op.label} update depends on the base weight and has no "
                "LoRA factors; merge it, or factor it with `convert --base BASE --rank K`")
        down = self.down
        if self.mid is not None:
            down = torch.einsum("abhw,bi->aihw", self.mid.to(fold_dtype), down.flatten(1).to(fold_dtype))
        return self.up.flatten(1), down.flatten(1)

    def delta_norm(self) -> float:
        """‖ΔW‖_F without the dense matrix: ‖s·U D‖² = s²·Σ (UᵀU) ⊙ (D Dᵀ), two r×r products."""
        u, d = (t.to(torch.float64) for t in self.factors_2d(fold_dtype=torch.float64))
        sq = gram_dot(u, d, u, d)
        return abs(self.scale) * math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else float("nan")

    def factors_2d(self, fold_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """(U, D) with `W.reshape(rows, -1) += scale · U @ D` in the base weight's layout.

        For transposed layouts the roles swap: (up@down).T == down.T @ up.T.
        """
        up, down = self.stored_factors(fold_dtype)
        if self.kind == "embedding" or self.fan_in_fan_out:
            return down.t(), up.t()
        return up, down

    def to(self, device) -> "LoraModule":
        """The module with its tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        tensors = {k: getattr(self, k) for k in ("down", "up", "magnitude", "mid") if getattr(self, k) is not None}
        if all(t.device == device for t in tensors.values()):
            return self
        return dataclasses.replace(self, **{k: t.to(device) for k, t in tensors.items()})

    def dense_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = scale · (up @ down) in the base weight's shape. Builds the dense matrix: for tests,
        small modules and the element-wise blend methods only."""
        u, d = self.factors_2d(fold_dtype=dtype)
        delta = (u.to(dtype) @ d.to(dtype)) * self.scale
        return delta.reshape(self.weight_shape)


@dataclass
class LoraAdapter:
    """A set of modules keyed by base module name, plus what rides along with them.

    `extra`: full tensors the adapter replaces (PEFT `modules_to_save`), keyed by base parameter name.
    `config`: the format's own configuration, kept so a read-then-write round trip loses nothing.
    """

    modules: Dict[str, LoraModule] = field(default_factory=dict)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: Optional[str] = None
    format: str = "peft"
    config: dict = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def add(self, module: LoraModule) -> None:
        if module.name in self.modules:
            raise FormatError(f"module {module.name} appears twice")
        self.modules[module.name] = module

    @property
    def ranks(self) -> List[int]:
        return [m.rank for m in self]

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self)

    @property
    def rank_range(self) -> str:
        """`8`, `4-16`, or `-` without modules: how reports and cards show the ranks."""
        ranks = self.ranks
        if not ranks:
            return "-"
        lo, hi = min(ranks), max(ranks)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def dtype(self) -> Optional[torch.dtype]:
        for m in self:
            return m.down.dtype
        return None

    def num_parameters(self) -> int:
        n = 0
        for m in self:
            n += m.down.numel() + m.up.numel()
            n += m.magnitude.numel() if m.magnitude is not None else 0
            n += m.mid.numel() if m.mid is not None else 0
        return n + sum(t.numel() for t in self.extra.values())


def fit_adapter(adapter: LoraAdapter, base) -> LoraAdapter:
    """The adapter with each module's layout fitted (`fit_module`) to the weight it updates in `base`
    (anything with `in` and `shape` over parameter names)."""
    modules = {}
    for name, m in adapter.modules.items():
        # an expert's slice of a 3-D stack is no weight of its own: nothing to fit
        fits = m.expert is None and m.target in base
        modules[name] = fit_module(m, tuple(base.shape(m.target))) if fits else m
    return dataclasses.replace(adapter, modules=modules)


def fit_module(m: LoraModule, shape: Tuple[int, ...]) -> LoraModule:
    """Reshape a module's factors (views, exact) when base and adapter disagree only on layout: linear
    vs 1×1 conv (SD's `proj_in`/`proj_out` between LDM checkpoints and diffusers configs), a conv
    update stored flat as [out, in·kh·kw] (LyCORIS LoHa/LoKr whose kernel no name list knew), and
    the shape placeholders of LyCORIS transforms (0 where the file cannot say)."""
    have = tuple(m.weight_shape)
    if m.op is not None:
        fits = all(h in (0, s) for h, s in zip(have, shape)) and (len(have) == len(shape) or not any(have[1:]))
        if have != tuple(shape) and fits:
            return dataclasses.replace(m, **placeholders(shape))
        return m
    if m.mid is not None or m.fan_in_fan_out or have == tuple(shape):
        return m
    if m.kind == "linear" and len(shape) == 4 and have == (shape[0], math.prod(shape[1:])):
        return dataclasses.replace(m, kind="conv", down=m.down.reshape(m.rank, *shape[1:]), up=m.up[:, :, None, None])
    if m.kind == "conv" and len(shape) == 2 and have == tuple(shape) + (1, 1):
        return dataclasses.replace(m, kind="linear", down=m.down.flatten(1), up=m.up.flatten(1))
    return m


def placeholders(shape: Tuple[int, ...]) -> dict:
    """Zero rank-1 down/up (and kind) whose `weight_shape` is `shape`: a transform's shape carrier."""
    if len(shape) == 4:
        return dict(kind="conv", down=torch.zeros(1, *shape[1:]), up=torch.zeros(shape[0], 1, 1, 1))
    return dict(kind="linear", down=torch.zeros(1, shape[1]), up=torch.zeros(shape[0], 1))


def common_alpha(modules) -> float:
    """One alpha for loaders that scale every module by alpha / rank (llama.cpp; PEFT without
    alpha_pattern): the most common `scale · rank`, so most modules keep their B unchanged."""
    counts: Dict[float, int] = {}
    for m in modules:
        key = m.scale * m.rank
        counts[key] = counts.get(key, 0) + 1
    best = max(counts.items(), key=lambda kv: kv[1])[0] if counts else 1.0
    return best if math.isfinite(best) and best > 0 else 1.0


def fold_scales(adapter: LoraAdapter) -> LoraAdapter:
    """The same updates with one alpha for every module (scale alpha / rank, no rsLoRA): the rest of
    each module's scale is folded into its B (up) in fp64, one rounding to the stored dtype. ΔW and
    DoRA (which normalises W + ΔW) are unchanged; no alpha_pattern is needed to hold the scales."""
    alpha = common_alpha(adapter)
    modules = {}
    for name, m in adapter.modules.items():
        fold = m.scale * m.rank / alpha
        up = m.up if fold == 1.0 else (m.up.to(torch.float64) * fold).to(m.up.dtype)  # one rounding
        modules[name] = dataclasses.replace(m, up=up, alpha=alpha, use_rslora=False)
    config = {k: v for k, v in adapter.config.items() if k != "alpha_pattern"}
    return dataclasses.replace(adapter, modules=modules, config=config)
