"""Resize an adapter's rank: the best rank-k approximation of each module's ΔW.

The SVD comes from the factors through the QR trick (`linalg.lowrank_svd`), in fp32, so the
dense out×in matrix is never built. Singular values are split as S^½ into both factors and the
module keeps its scale (alpha follows the new rank: alpha' = s·k, kohya's rule), so
`scale' · up' @ down'` is the rank-k truncation of `scale · up @ down`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import paths
from .adapter import LoraAdapter, LoraModule
from .atomic import atomic_outputs, check_output
from .errors import IncompatibleError, LoraToolsError, NonFiniteError, UsageError
from .fusing import FUSING_FAMILIES, fuse_for_format, fused_groups, original_layout, replace_groups
from .formats import (WRITABLE, check_uniform_scale, output_is_folder, read_adapter, uniform, writable_format,
                      write_into)
from .ops import all_finite
from .provenance import stamp
from .report import Report
from .linalg import effective_alpha, lowrank_svd, retained, select_rank, split_factors
from .options import build, resolve_device

# metadata that describes the old ranks or the old bytes; the format's writer fills in new values
_STALE_METADATA = re.compile(r"^(ss_network_dim|ss_network_alpha|sshs_.*|modelspec\.hash_.*)$")


@dataclass
class ModuleResize:
    """What resizing one module kept."""

    name: str
    kind: str
    old_rank: int
    new_rank: int
    fro_retained: float  # ||σ_:k|| / ||σ||: the fraction of ΔW's Frobenius norm kept
    sum_retained: Optional[float]  # Σσ_:k / Σσ (None where only the leading σ are known)
    sv_ratio: Optional[float]  # σ_max / σ_k (None for an all-zero module)
    spectrum: List[float] = field(default_factory=list, repr=False)  # σ, descending (for --plot)

    @property
    def rel_error(self) -> float:
        """||ΔW − ΔW_k||_F / ||ΔW||_F: by Eckart–Young the norm of the σ left out, √(1 − retained²)."""
        return max(0.0, 1.0 - self.fro_retained ** 2) ** 0.5

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "old_rank": self.old_rank, "new_rank": self.new_rank,
                "fro_retained": self.fro_retained, "sum_retained": self.sum_retained, "sv_ratio": self.sv_ratio,
                "rel_error": self.rel_error}


@dataclass(repr=False)
class ResizeResult(Report):
    adapter: LoraAdapter
    modules: List[ModuleResize]
    output: Optional[str] = None

    @property
    def average_fro_retained(self) -> float:
        return sum(m.fro_retained for m in self.modules) / len(self.modules) if self.modules else 1.0

    def summary(self) -> dict:
        return {"format": self.adapter.format, "modules": len(self.modules),
                "rank_in": sum(m.old_rank for m in self.modules), "rank_out": sum(m.new_rank for m in self.modules),
                "average_fro_retained": self.average_fro_retained, "output": self.output}

    def to_dict(self) -> dict:
        return dict(self.summary(), modules=[m.as_dict() for m in self.modules])


def check_rank_options(rank: Optional[int], conv_rank: Optional[int], dynamic: Optional[str],
                       param: Optional[float]) -> None:
    """Raise UsageError for a combination of rank options that cannot work (before any work)."""
    if dynamic is None:
        if rank is None:
            raise UsageError("give --rank K, or --dynamic RULE --param P (with --rank as the cap)")
        if param is not None:
            raise UsageError("--param needs --dynamic")
    for opt, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise UsageError(f"{opt} must be at least 1, got {value}")
    if dynamic is not None:  # validates the rule name and the parameter's range
        select_rank(torch.ones(2), rule=dynamic, param=param)


@dataclass(frozen=True)
class ResizeOptions:
    """What `resize` does, checked once on creation (the CLI and the API build the same object).
    Fixed: `rank` (`conv_rank` for conv modules, default `rank`). Dynamic: `dynamic` with `param`,
    `rank` as the cap. `device` becomes 'cpu' or 'cuda:N'."""

    rank: Optional[int] = None
    conv_rank: Optional[int] = None
    dynamic: Optional[str] = None
    param: Optional[float] = None
    device: str = "auto"
    uniform_scale: bool = False  # one alpha for all modules (PEFT output; checked against the input's format)

    def __post_init__(self):
        check_rank_options(self.rank, self.conv_rank, self.dynamic, self.param)
        object.__setattr__(self, "device", resolve_device(self.device))

    def rank_for(self, kind: str) -> Optional[int]:
        return self.conv_rank if kind == "conv" and self.conv_rank is not None else self.rank


def summarize(s: torch.Tensor, k: int,
              total_fro: Optional[float] = None) -> Tuple[float, Optional[float], Optional[float]]:
    """(Frobenius retained, sum(σ) retained, σ_max/σ_k) for keeping the first k of the σ in `s`.

    `total_fro` is ΔW's true Frobenius norm when `s` holds only the leading singular values; then
    the sum retained is unknown (None)."""
    if total_fro is None:
        fro, sm = retained(s, k)
    else:
        kept = float(torch.linalg.vector_norm(s[:k].double()))
        fro, sm = (min(kept / total_fro, 1.0) if total_fro > 0 else 1.0), None
    ratio = float(s[0] / s[k - 1]) if k <= len(s) and float(s[k - 1]) > 0 else None
    return fro, sm, ratio


def resize_module(m: LoraModule, rank: Optional[int] = None, dynamic: Optional[str] = None,
                  param: Optional[float] = None, device: str = "cpu") -> Tuple[LoraModule, ModuleResize]:
    """The module at its new rank (same kind, dtype and scale) and what it kept; the SVD runs on
    `device`, the module comes back on the host."""
    up, down = (t.to(device).float() for t in m.stored_factors())
    if not (all_finite(up) and all_finite(down)):
        raise NonFiniteError(f"module {m.name} contains NaN or Inf; nothing was written")
    u, s, vh = lowrank_svd(up, down)
    k = select_rank(s, rank=rank, rule=dynamic, param=param, max_rank=m.rank)
    new_up, new_down = split_factors(u, s, vh, k)
    if m.kind == "conv":
        new_up = new_up.reshape(new_up.shape[0], k, 1, 1)
        new_down = new_down.reshape((k,) + m.weight_shape[1:])
    dtype = m.down.dtype
    new_down, new_up = new_down.to("cpu", dtype), new_up.to("cpu", m.up.dtype)
    module = LoraModule(name=m.name, down=new_down.contiguous(), up=new_up.contiguous(),
                        alpha=effective_alpha(m.scale, k, m.use_rslora), kind=m.kind, use_rslora=m.use_rslora,
                        magnitude=m.magnitude, fan_in_fan_out=m.fan_in_fan_out, param=m.param, expert=m.expert)
    fro, sm, ratio = summarize(s, k)
    return module, ModuleResize(m.name, m.kind, m.rank, k, fro, sm, ratio, s.tolist())


@paths.guarded
def resize(adapter: Union[str, os.PathLike, LoraAdapter], output: Optional[Union[str, os.PathLike]] = None,
           rank: Optional[int] = None, conv_rank: Optional[int] = None, dynamic: Optional[str] = None,
           param: Optional[float] = None, overwrite: bool = False,
           progress: Optional[Callable[[str], None]] = None, plot: Optional[Union[str, os.PathLike]] = None,
           device: str = "auto", uniform_scale: bool = False, options: Optional[ResizeOptions] = None
           ) -> ResizeResult:
    """Resize every module of `adapter` (a path or a LoraAdapter) and, if `output` is given, write
    it in the adapter's own format. Fixed: `rank` (`conv_rank` for conv modules, default `rank`).
    Dynamic: `dynamic` in sv_ratio / sv_fro / sv_cumulative with `param`, `rank` as the cap.
    Never above a module's old rank, never below 1. `plot`: also draw the spectra into this PNG;
    the adapter and the plot are written together or not at all. `device`: auto, cpu, cuda or
    cuda:N. `uniform_scale`: one alpha for all modules (PEFT output). `options`: a ResizeOptions
    instead of the keyword options."""
    opts = build(ResizeOptions, options, rank=rank, conv_rank=conv_rank, dynamic=dynamic, param=param, device=device,
                 uniform_scale=uniform_scale)
    if plot is not None and output is None:
        raise UsageError("plot needs an output")
    if plot is not None:
        require_matplotlib()
    for path in (output, plot):
        if path is not None:
            check_output(path, overwrite)
    paths.check_distinct(output, plot)
    src = read_adapter(adapter)
    # kohya / ComfyUI DiT files: resize each fused projection (its parts' ΔW together), so it keeps the new rank
    src = fuse_for_format(src, src.format)
    if not len(src):
        raise UsageError("the adapter has no LoRA modules to resize")
    if output is not None and src.format not in WRITABLE:  # resize writes its input's format
        raise UsageError(f"resize writes the adapter's own format, and loratools reads {src.format} files only: "
                         "`loratools convert ADAPTER --to kohya --rank K` factors it at rank K (retained energy "
                         "reported), or convert it first and resize that")
    if opts.uniform_scale:  # the output keeps the input's format
        check_uniform_scale(src.format)
    modules: Dict[str, LoraModule] = {}
    reports: List[ModuleResize] = []
    for m in src:
        new, report = resize_module(m, opts.rank_for(m.kind), opts.dynamic, opts.param, opts.device)
        modules[m.name] = new
        reports.append(report)
        if progress:
            progress(m.name)
    config = dict(src.config)
    # old patterns may be regexes shared by modules that now differ; the writer makes exact ones
    config.pop("rank_pattern", None)
    config.pop("alpha_pattern", None)
    metadata = stamp({k: v for k, v in src.metadata.items() if not _STALE_METADATA.match(k)}, "resize",
                     [adapter] if not isinstance(adapter, LoraAdapter) else [], rank=opts.rank,
                     conv_rank=opts.rank_for("conv"), dynamic=opts.dynamic, param=opts.param)
    out = LoraAdapter(modules=modules, extra=dict(src.extra), base_model=src.base_model, format=src.format,
                      config=config, metadata=metadata)
    out = uniform(out, src.format, opts.uniform_scale)
    result = ResizeResult(out, reports)
    if output is not None:
        fmt = writable_format(out, src.format)
        folder = output_is_folder(output, fmt)
        targets = [(output, folder)] + ([(plot, False)] if plot is not None else [])
        with atomic_outputs(targets, overwrite) as tmps:
            write_into(out, tmps[0], fmt, metadata, folder)
            if plot is not None:
                draw_spectra(reports, tmps[1])
        result.output = os.path.abspath(os.fspath(output))
    return result


def draw_spectra(modules: List[ModuleResize], path: str, title: str = "singular values") -> None:
    """Draw every module's normalised spectrum and the chosen cut into the PNG file `path`."""
    figure_cls = require_matplotlib()
    fig = figure_cls(figsize=(12, 4.5))  # no pyplot: leaves the caller's backend and state alone
    ax1, ax2 = fig.subplots(1, 2)
    for m in modules:
        s = torch.tensor(m.spectrum, dtype=torch.float64)
        if not len(s) or float(s[0]) <= 0:
            continue
        x = torch.arange(1, len(s) + 1)
        fro = torch.sqrt(torch.cumsum(s ** 2, 0) / float((s ** 2).sum()))
        ax1.plot(x, s / s[0], lw=0.6, alpha=0.4)
        ax1.plot([m.new_rank], [float(s[m.new_rank - 1] / s[0])], "k.", ms=3)
        ax2.plot(x, fro, lw=0.6, alpha=0.4)
        ax2.plot([m.new_rank], [float(fro[m.new_rank - 1])], "k.", ms=3)
    ax1.set(yscale="log", xlabel="index", ylabel="σ_i / σ_max", title=f"{title} (dots: cut)")
    ax2.set(xlabel="rank k", ylabel="Frobenius norm retained", title="retained ||ΔW|| by rank")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LoraToolsError("--plot needs matplotlib: pip install 'loratools[plot]'") from None
    return Figure


def resize_fused(adapter: LoraAdapter, fmt: str, rank: int, device: str = "cpu"
                 ) -> Tuple[LoraAdapter, List[ModuleResize]]:
    """`convert --fused-rank K`: every original module of several diffusers parts whose exact fusion (A stacked,
    B block-diagonal) has rank above `rank` becomes the best rank-`rank` LoRA of its fused ΔW (SVD from the
    factors, alpha = scale·K); one of rank `rank` or less keeps its parts, written exactly. Returns the adapter
    and what each refactored module kept (`rel_error`: ||ΔW − ΔW_K||_F / ||ΔW||_F)."""
    layout = original_layout(adapter, fmt)
    if layout is None:
        raise UsageError(f"--fused-rank: the adapter has no transformer LoRA that {fmt} writes on fused projections "
                         f"({', '.join(FUSING_FAMILIES)})")
    chosen, reports = {}, []
    for name, (m, parts) in fused_groups(adapter, layout).items():
        if m.rank <= rank:
            continue
        if m.is_dora:
            raise IncompatibleError(f"module {name}: --fused-rank {rank} would replace this DoRA's direction by an "
                                    f"SVD, which its magnitude norms exactly: use --fused-rank {m.rank} or more")
        new, report = resize_module(m, rank=rank, device=device)
        chosen[name] = (new, parts)
        reports.append(report)
    return replace_groups(adapter, chosen), reports
