"""Blend several adapters into one: Σ w_i s_i B_i A_i, exactly (`cat`), as its best rank-k
approximation (`svd`, from the factors by the QR trick), by PEFT's factor averaging (`linear`),
or by the element-wise TIES / DARE / magnitude-prune rules on the dense ΔW_i (see blend_dense).

Every module is blended in the base weight's 2-D layout (`factors_2d`) and written back in the
first input's layout for that module, with alpha = rank (scale 1) so that no per-adapter scale is
lost. A module an adapter lacks counts as zero. The report gives, per module, the Frobenius norm
of the target (the exact weighted sum, or the element-wise method's own dense result), of the
output, and of their difference.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import blend_dense, paths
from .adapter import LoraAdapter, LoraModule
from .archs.family import shared_family_metadata
from .atomic import check_output
from .blend_dense import DENSE_METHODS, SIGN_METHODS
from .dtypes import parse_dtype
from .errors import IncompatibleError, NonFiniteError, ShapeMismatchError, UsageError
from .fusing import fuse_for_format
from .formats import check_uniform_scale, check_writable_alone, read_adapter, uniform, write_adapter
from .provenance import stamp
from .linalg import exact_svd, gram_dot, lowrank_svd, randomized_svd, split_factors
from .options import build, check_weights, resolve_device, weights_for
from .report import Report
from .ops import all_finite

METHODS = ("cat", "svd", "linear") + DENSE_METHODS
SVD_MODES = ("exact", "randomized")
POWER_ITERS, OVERSAMPLE = 4, 16  # randomized SVD of the dense element-wise results
AdapterLike = Union[str, os.PathLike, LoraAdapter]


@dataclass(frozen=True)
class BlendOptions:
    """What `blend` does, checked once on creation (the CLI and the API build the same object).
    `dtype` becomes a torch dtype (None: the first adapter's), `device` 'cpu' or 'cuda:N'."""

    weights: Optional[Tuple[float, ...]] = None  # one per adapter (None: 1 each)
    method: str = "svd"
    rank: Optional[int] = None  # None: the largest input rank
    density: Optional[float] = None
    majority_sign: Optional[str] = None
    seed: int = 0
    svd: Optional[str] = None
    clamp: Optional[float] = None
    dtype: Optional[Union[str, torch.dtype]] = None
    to: Optional[str] = None
    device: str = "auto"
    uniform_scale: bool = False  # one alpha for all modules (PEFT output)

    def __post_init__(self):
        method, rank, density, clamp = self.method, self.rank, self.density, self.clamp
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        dense = method in DENSE_METHODS
        if rank is not None and method in ("cat", "linear"):
            raise UsageError(f"--rank does not apply to method {method} (its rank is fixed by the inputs)")
        if rank is not None and rank < 1:
            raise UsageError("--rank must be at least 1")
        if dense and density is None:
            raise UsageError(f"method {method} needs --density (the fraction of each ΔW to keep, in (0, 1])")
        if density is not None and not dense:
            raise UsageError(f"--density applies only to {', '.join(DENSE_METHODS)}")
        if density is not None and not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1], got {density}")
        if self.majority_sign is not None and method not in ("ties", "dare_ties"):
            raise UsageError("--majority-sign applies only to ties and dare_ties")
        if self.majority_sign is not None and self.majority_sign not in SIGN_METHODS:
            raise UsageError(f"--majority-sign must be one of {', '.join(SIGN_METHODS)}")
        if self.svd is not None and not dense:
            raise UsageError(f"--svd applies only to {', '.join(DENSE_METHODS)} (svd is exact from the factors)")
        if self.svd is not None and self.svd not in SVD_MODES:
            raise UsageError(f"--svd must be one of {', '.join(SVD_MODES)}")
        if clamp is not None and method in ("cat", "linear"):
            raise UsageError(f"--clamp applies only to methods that factor with an SVD, not {method}")
        if clamp is not None and not 0.5 <= clamp <= 1:
            raise UsageError(f"--clamp is a quantile in [0.5, 1], got {clamp}")
        if not 0 <= int(self.seed) < 1 << 63:
            raise UsageError(f"--seed must be between 0 and 2^63-1, got {self.seed}")
        if self.to is not None:
            check_writable_alone(self.to, "blend")
        if self.uniform_scale and self.to is not None:
            check_uniform_scale(self.to)
        object.__setattr__(self, "weights", check_weights(self.weights))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "device", resolve_device(self.device))

    @property
    def sign_rule(self) -> str:
        return self.majority_sign or "total"

    @property
    def svd_mode(self) -> str:
        return self.svd or "randomized"


@dataclass
class ModuleReport:
    name: str
    ranks_in: List[int]  # one per input adapter, 0 where it lacks the module
    rank_out: int
    norm_target: float   # ||target||_F
    norm_out: float      # ||output ΔW||_F
    error: float         # ||output ΔW - target||_F

    @property
    def retained(self) -> float:
        return self.norm_out / self.norm_target if self.norm_target > 0 else 1.0

    @property
    def rel_error(self) -> float:
        return self.error / self.norm_target if self.norm_target > 0 else 0.0

    def to_dict(self) -> dict:
        return {"module": self.name, "ranks_in": self.ranks_in, "rank_out": self.rank_out,
                "norm_target": self.norm_target, "norm_out": self.norm_out, "retained": self.retained,
                "error": self.error, "rel_error": self.rel_error}


@dataclass(repr=False)
class BlendReport(Report):
    method: str
    weights: List[float]
    modules: List[ModuleReport] = field(default_factory=list)

    def totals(self) -> dict:
        t2 = sum(m.norm_target ** 2 for m in self.modules)
        o2 = sum(m.norm_out ** 2 for m in self.modules)
        e2 = sum(m.error ** 2 for m in self.modules)
        return {"modules": len(self.modules), "rank_in": sum(sum(m.ranks_in) for m in self.modules),
                "rank_out": sum(m.rank_out for m in self.modules), "norm_target": t2 ** 0.5,
                "norm_out": o2 ** 0.5, "retained": (o2 / t2) ** 0.5 if t2 > 0 else 1.0,
                "error": e2 ** 0.5, "rel_error": (e2 / t2) ** 0.5 if t2 > 0 else 0.0}

    def summary(self) -> dict:
        t = self.totals()
        return {"method": self.method, "weights": self.weights, "modules": t["modules"], "rank_out": t["rank_out"],
                "retained": t["retained"]}

    def to_dict(self) -> dict:
        return {"method": self.method, "weights": self.weights,
                "modules": [m.to_dict() for m in self.modules], "totals": self.totals()}


@dataclass
class _Source:
    module: LoraModule
    weight: float

    @property
    def coeff(self) -> float:
        return self.weight * self.module.scale


# ---- layouts -------------------------------------------------------------------------------------

def _module(template: LoraModule, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype,
            native: bool = False) -> LoraModule:
    """A module in `template`'s layout with 2-D ΔW = up @ down (alpha = rank, scale 1);
    `native`: up and down are already in that layout."""
    r = int(up.shape[1])
    shape = template.weight_shape
    kind, fifo = template.kind, template.fan_in_fan_out
    if native:
        pass
    elif kind == "conv":
        up, down = up.reshape(shape[0], r, 1, 1), down.reshape((r,) + shape[1:])
    elif kind == "embedding" or fifo:
        up, down = down.t(), up.t()
    up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    if not (all_finite(up) and all_finite(down)):
        raise NonFiniteError(f"module {template.name}: the blend overflows {dtype} (try --dtype fp32); "
                             "nothing was written")
    return LoraModule(template.name, down=down, up=up, alpha=float(r), kind=kind, fan_in_fan_out=fifo,
                      param=template.param, expert=template.expert)


# ---- small linear algebra --------------------------------------------------------------------------

class _LowRankNorms:
    """Frobenius norms of a low-rank target T = U_t @ D_t and of (X - T) for outputs X = U @ D,
    from R×R Gram matrices in fp64 (no dense product; error² = ||X||² - 2<X,T> + ||T||²)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up.double(), down.double()
        self.norm2 = gram_dot(self.up, self.down, self.up, self.down)

    def compare(self, up: torch.Tensor, down: torch.Tensor) -> Tuple[float, float]:
        """(||X||, ||X - T||)."""
        up, down = up.double(), down.double()
        out2 = gram_dot(up, down, up, down)
        err2 = out2 - 2 * gram_dot(up, down, self.up, self.down) + self.norm2
        return max(out2, 0.0) ** 0.5, max(err2, 0.0) ** 0.5


def _gram_norm(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor]) -> float:
    """||Σ_j U_j D_j||_F from the factors (fp64 Gram matrices)."""
    return max(0.0, _LowRankNorms(torch.cat(list(ups), 1), torch.cat(list(downs), 0)).norm2) ** 0.5


def quantile(x: torch.Tensor, q: float) -> float:
    """torch.quantile(x, q) (linear interpolation) without its input-size limit, via kthvalue."""
    flat = x.reshape(-1).float()
    pos = q * (flat.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = float(flat.kthvalue(lo + 1).values)
    v_hi = float(flat.kthvalue(hi + 1).values) if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _canonical(u: torch.Tensor, vh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fix the SVD's sign freedom (largest |entry| of each U column positive), so results and
    --clamp do not depend on which SVD routine ran."""
    idx = u.abs().argmax(0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    sign[sign == 0] = 1
    return u * sign, vh * sign[:, None]


def _finish(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int,
            clamp: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of rank k: S^½ on both sides, or kohya's clamp of (U S, Vh) at the quantile
    `clamp`, then the columns rebalanced (product unchanged) for fp16 safety."""
    u, vh = _canonical(u[:, :k], vh[:k])
    if clamp is None:
        return split_factors(u, s, vh, k)
    us = u * s[:k]
    hi = quantile(torch.cat([us.reshape(-1), vh.reshape(-1)]), clamp)
    us, vh = us.clamp(-hi, hi), vh.clamp(-hi, hi)
    nu, nv = torch.linalg.vector_norm(us, dim=0), torch.linalg.vector_norm(vh, dim=1)
    g = torch.where((nu > 0) & (nv > 0), (nu / nv.clamp_min(1e-30)).sqrt(), torch.ones_like(nu))
    return us / g, vh * g[:, None]


# ---- methods ---------------------------------------------------------------------------------------

def _target(sources: Sequence[_Source]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact weighted sum as concatenated fp32 factors: [c_1 U_1 | …] @ [D_1; …]."""
    pairs = [s.module.factors_2d() for s in sources]
    return (torch.cat([u.float() * s.coeff for (u, _), s in zip(pairs, sources)], 1),
            torch.cat([d.float() for _, d in pairs], 0))


def _linear(sources: Sequence[_Source], name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "linear" on the stored factors: A = Σ ±√|c_i| A_i, B = Σ √|c_i| B_i (the sign on A,
    as PEFT does). Approximate: the product adds cross terms B_i A_j."""
    mods = [s.module for s in sources]
    layouts = {(m.kind, m.fan_in_fan_out, tuple(m.down.shape), tuple(m.up.shape)) for m in mods}
    if len(layouts) > 1:
        ranks = sorted({m.rank for m in mods})
        why = f"equal ranks, got {ranks}" if len(ranks) > 1 else "factors of the same layout"
        raise UsageError(f"module {name}: method linear needs {why}; use cat or svd")
    if any(m.mid is not None for m in mods):
        raise IncompatibleError(f"module {name}: method linear cannot average Tucker (lora_mid) factors; use svd")
    up = sum(math.sqrt(abs(s.coeff)) * s.module.up.float() for s in sources)
    down = sum(math.copysign(math.sqrt(abs(s.coeff)), s.coeff) * s.module.down.float() for s in sources)
    return up, down


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(all_finite(t) for t in tensors):
        raise NonFiniteError(f"module {name}: the weighted update overflows float32 (are the weights that large?); "
                             "nothing was written")


def _blend_module(name: str, sources: Sequence[_Source], n_inputs: List[int], indices: List[int], rank: int,
                  opts: BlendOptions, dtype: torch.dtype) -> Tuple[LoraModule, ModuleReport]:
    """One module's blend at `rank`; `indices`: which inputs the sources are (the DARE seeds)."""
    method, clamp = opts.method, opts.clamp
    template = sources[0].module
    shape = template.weight_shape
    rows, cols = shape[0], math.prod(shape[1:])
    if method in DENSE_METHODS:
        tasks = [blend_dense.Task(*s.module.factors_2d(), s.module.scale, s.weight) for s in sources]
        seeds = [blend_dense.dare_seed(opts.seed, name, i) for i in indices]
        target = blend_dense.combine(tasks, rows, cols, method, opts.density, opts.sign_rule, seeds)
        _check_finite(name, target)
        k = min(rank, rows, cols)
        if opts.svd_mode == "exact":
            u, s, vh = exact_svd(target)
        else:
            u, s, vh = randomized_svd(target, k, oversample=OVERSAMPLE, n_iter=POWER_ITERS, seed=opts.seed)
        out = _module(template, *_finish(u, s, vh, k, clamp), dtype)
        up, down = out.factors_2d()
        up = up.float() * out.scale
        norm_target = float(torch.linalg.vector_norm(target, dtype=torch.float64))
        error = blend_dense.residual_norm(target, up, down)
        return out, ModuleReport(name, n_inputs, out.rank, norm_target, _gram_norm([up], [down]), error)
    tu, td = _target(sources)
    _check_finite(name, tu, td)
    if method == "linear":
        out = _module(template, *_linear(sources, name), dtype, native=True)
    else:
        if method == "cat":
            up, down = tu, td
        else:  # svd
            u, s, vh = lowrank_svd(tu, td)
            up, down = _finish(u, s, vh, min(rank, s.numel()), clamp)
        out = _module(template, up, down, dtype)
    up, down = out.factors_2d()
    target = _LowRankNorms(tu, td)
    norm_out, error = target.compare(up * out.scale, down)
    return out, ModuleReport(name, n_inputs, out.rank, max(target.norm2, 0.0) ** 0.5, norm_out, error)


# ---- the API ---------------------------------------------------------------------------------------

def _extras(loaded: Sequence[Tuple[LoraAdapter, float]]) -> Dict[str, torch.Tensor]:
    """Full tensors (modules_to_save) are carried only when every input has the same ones: a
    weighted blend of replacement tensors has no meaning."""
    first = loaded[0][0].extra
    same = all(set(a.extra) == set(first) and all(a.extra[k].dtype == first[k].dtype
                                                  and torch.equal(a.extra[k], first[k]) for k in first)
               for a, _ in loaded)
    if not same:
        raise IncompatibleError("the adapters carry different full tensors (modules_to_save / resized embeddings), "
                                "which cannot be blended; merge them with `loratools merge` instead")
    return dict(first)


def _group(loaded: Sequence[Tuple[LoraAdapter, float]]) -> Dict[str, Dict[int, _Source]]:
    groups: Dict[str, Dict[int, _Source]] = {}
    for i, (adapter, weight) in enumerate(loaded):
        if adapter.is_dora:
            raise IncompatibleError(
                f"adapter {i + 1} is DoRA: its magnitude vector replaces the row norms of W+ΔW, so DoRA updates "
                "do not add and no blend of them is exact; merge it into the base with `loratools merge`")
        for m in adapter:
            for j, other in groups.get(m.name, {}).items():
                if other.module.weight_shape != m.weight_shape:
                    raise ShapeMismatchError(
                        f"module {m.name}: adapter {j + 1} updates a weight of shape {other.module.weight_shape} "
                        f"but adapter {i + 1} one of shape {m.weight_shape} (adapters for different models?)")
            for t in (m.down, m.up) + ((m.mid,) if m.mid is not None else ()):
                if not all_finite(t):
                    raise NonFiniteError(f"module {m.name} of adapter {i + 1} contains NaN or Inf")
            groups.setdefault(m.name, {})[i] = _Source(m, float(weight))
    return groups


def _output_config(first: LoraAdapter, fmt: str, names: List[str]) -> dict:
    if fmt != first.format:
        return {}
    config = dict(first.config, rank_pattern={}, alpha_pattern={})
    if set(names) != set(first.modules):  # the first's targeting rules do not describe the union
        for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
            config.pop(key, None)
        config["target_modules"] = sorted(names)
    return config


@paths.guarded
def blend(adapters: Sequence[AdapterLike], weights: Optional[Sequence[float]] = None, method: str = "svd",
          rank: Optional[int] = None, density: Optional[float] = None, majority_sign: Optional[str] = None,
          seed: int = 0, svd: Optional[str] = None, clamp: Optional[float] = None, dtype: Optional[str] = None,
          output: Optional[Union[str, os.PathLike]] = None, to: Optional[str] = None, overwrite: bool = False,
          progress: Optional[Callable[[str], None]] = None, device: str = "auto", uniform_scale: bool = False,
          options: Optional[BlendOptions] = None) -> Tuple[LoraAdapter, BlendReport]:
    """Blend `adapters` (paths or LoraAdapter objects) with `weights` (default 1 each) into one adapter.

    Returns the adapter and its report; with `output`, also writes it (in `to`, default the first
    input's format). `uniform_scale`: one alpha for all modules (PEFT output). `options`: a
    BlendOptions instead of the keyword options. Raises before writing anything if an input or
    option is wrong.
    """
    opts = build(BlendOptions, options, weights=weights, method=method, rank=rank, density=density,
                 majority_sign=majority_sign, seed=seed, svd=svd, clamp=clamp, dtype=dtype, to=to, device=device,
                 uniform_scale=uniform_scale)
    weights = list(weights_for(opts.weights, len(adapters)))
    if output is not None:
        check_output(output, overwrite)
    loaded = [(read_adapter(a), w) for a, w in zip(adapters, weights)]
    fmt = opts.to or loaded[0][0].format
    # kohya / ComfyUI DiT output: blend each fused projection (its parts' ΔW together), so it has the rank asked for
    loaded = [(fuse_for_format(a, fmt), w) for a, w in loaded]
    first = loaded[0][0]
    extra = _extras(loaded)
    groups = _group(loaded)
    if not groups:
        raise UsageError("the adapters have no LoRA modules to blend")
    out_dtype = opts.dtype or first.dtype() or torch.float32
    rank_out = opts.rank or max(m.rank for a, _ in loaded for m in a)
    report = BlendReport(opts.method, weights)
    modules: Dict[str, LoraModule] = {}
    for name, by_index in groups.items():
        sources = [_Source(s.module.to(opts.device), s.weight) for s in by_index.values()]
        ranks_in = [by_index[i].module.rank if i in by_index else 0 for i in range(len(loaded))]
        out, mod_report = _blend_module(name, sources, ranks_in, list(by_index), rank_out, opts, out_dtype)
        modules[name] = out.to("cpu")
        report.modules.append(mod_report)
        if progress:
            progress(name)
    family = shared_family_metadata([a.metadata or {} for a, _ in loaded])  # so the output's family is not guessed
    metadata = stamp(family, "blend", [a for a in adapters if not isinstance(a, LoraAdapter)], method=opts.method,
                     weights=weights, rank=opts.rank, density=opts.density, seed=opts.seed,
                     retained=report.totals().get("retained"))
    result = LoraAdapter(modules=modules, extra=extra, base_model=first.base_model, format=fmt,
                         config=_output_config(first, fmt, list(modules)), metadata=metadata)
    result = uniform(result, fmt, opts.uniform_scale)
    if output is not None:
        write_adapter(result, output, format=fmt, overwrite=overwrite, metadata=metadata)
    return result, report
