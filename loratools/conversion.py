"""Convert an adapter between formats, exactly where the target can hold it (`loratools.convert`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

from .adapter import LoraAdapter
from .archs import COMPONENTS
from . import paths
from .atomic import check_output
from .errors import IncompatibleError, UsageError
from .formats import (FORMATS, WRITABLE, check_uniform_scale, detect, output_is_folder, read_adapter, uniform,
                      writable_format, write_adapter)
from .inspection import adapter_bytes
from .fusing import ORIGINAL_FORMATS
from .options import build, resolve_device
from .report import Report
from .resizing import ModuleResize, resize_fused

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ConvertOptions:
    """What `convert` does, checked once on creation (the CLI and the API build the same object)."""

    to: str
    from_: Optional[str] = None
    base: Optional[str] = None
    rank: Optional[int] = None
    allow_unmatched: bool = False
    component: Optional[str] = None
    device: str = "auto"  # where LyCORIS modules are factored (becomes 'cpu' or 'cuda:N')
    uniform_scale: bool = False  # one alpha for all modules (PEFT output)
    fused_rank: Optional[int] = None  # kohya / comfyui: fused projections above this rank refactored to it by SVD

    def __post_init__(self):
        if self.to not in WRITABLE:
            raise UsageError(f"cannot write format {self.to!r}: use one of {', '.join(WRITABLE)}")
        if self.from_ is not None and self.from_ not in FORMATS:
            raise UsageError(f"unknown format {self.from_!r}: use one of {', '.join(FORMATS)}")
        if self.component is not None and self.component not in COMPONENTS:
            raise UsageError(f"unknown component {self.component!r}: use one of {', '.join(COMPONENTS)}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.fused_rank is not None and self.fused_rank < 1:
            raise UsageError(f"--fused-rank must be at least 1, got {self.fused_rank}")
        if self.fused_rank is not None and self.to not in ORIGINAL_FORMATS:
            raise UsageError(f"--fused-rank applies to --to {' or '.join(ORIGINAL_FORMATS)} (fused projections), "
                             f"not {self.to}")
        if self.uniform_scale:
            check_uniform_scale(self.to)
        object.__setattr__(self, "device", resolve_device(self.device))


@dataclass(repr=False)
class ConvertReport(Report):
    source: str
    from_: str
    to: str
    output: Optional[str]
    modules: int
    rank: str  # '8' or '4-16'
    extra_tensors: int = 0
    bytes: int = 0
    names_from: Optional[str] = None
    dropped_unmatched: List[str] = field(default_factory=list, repr=False)
    retained: Optional[dict] = field(default=None, repr=False)
    fused: Optional[dict] = field(default=None, repr=False)  # --fused-rank: the SVD's relative errors
    fused_modules: List[ModuleResize] = field(default_factory=list, repr=False)  # and what each kept
    dry_run: bool = False
    adapter: Optional[LoraAdapter] = field(default=None, repr=False)

    def summary(self) -> dict:
        return {"from": self.from_, "to": self.to, "modules": self.modules, "rank": self.rank, "output": self.output,
                "dry_run": self.dry_run}

    def to_dict(self) -> dict:
        skip = ("adapter", "from_", "source", "fused_modules")
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {"input": self.source, "from": self.from_, **d}


def add_component(adapter: LoraAdapter, component: str) -> LoraAdapter:
    """Prefix bare module names (an adapter of one model) with a pipeline component."""
    prefixed = [m.name for m in adapter if m.name.split(".", 1)[0] in COMPONENTS]
    if prefixed:
        raise UsageError(f"--component: the adapter's names already carry a component ({prefixed[0]})")
    modules = {f"{component}.{n}": dataclasses.replace(m, name=f"{component}.{n}") for n, m in adapter.modules.items()}
    extra = {f"{component}.{n}": t for n, t in adapter.extra.items()}
    return dataclasses.replace(adapter, modules=modules, extra=extra)


def components(adapter: LoraAdapter) -> List[str]:
    """The pipeline components the adapter's module names carry, in COMPONENTS order."""
    found = {n.split(".", 1)[0] for n in list(adapter.modules) + list(adapter.extra)}
    return [c for c in COMPONENTS if c in found]


def take_component(adapter: LoraAdapter, component: str) -> LoraAdapter:
    """The modules of one pipeline component, without its prefix: an adapter of that one model."""
    cut = len(component) + 1
    modules = {n[cut:]: dataclasses.replace(m, name=n[cut:]) for n, m in adapter.modules.items()
               if n.startswith(component + ".")}
    if not modules:
        raise UsageError(f"--component {component}: the adapter has no {component} modules "
                         f"(it has {', '.join(components(adapter)) or 'no components'})")
    extra = {n[cut:]: t for n, t in adapter.extra.items() if n.startswith(component + ".")}
    return dataclasses.replace(adapter, modules=modules, extra=extra, config={})


def _for_target(adapter: LoraAdapter, opts: ConvertOptions) -> LoraAdapter:
    """The adapter in the shape the target format holds: one model for peft, components otherwise."""
    comps = components(adapter)
    if opts.to == "peft":
        if opts.component:
            return take_component(adapter, opts.component) if comps else adapter
        if comps:
            raise IncompatibleError(
                f"the adapter's modules belong to pipeline components ({', '.join(comps)}), which one PEFT "
                "adapter cannot hold: use --to peft_diffusion (a PEFT folder per component), or --component "
                f"{comps[0]} to keep that component's modules only")
        return adapter
    if opts.component:
        return add_component(adapter, opts.component)
    return adapter


@paths.guarded
def convert(source: Union[PathLike, LoraAdapter], output: Optional[PathLike], to: Optional[str] = None,
            from_: Optional[str] = None, base: Optional[str] = None, rank: Optional[int] = None,
            allow_unmatched: bool = False, component: Optional[str] = None, overwrite: bool = False,
            dry_run: bool = False, device: str = "auto", uniform_scale: bool = False,
            fused_rank: Optional[int] = None, options: Optional[ConvertOptions] = None) -> ConvertReport:
    """Read `source` (a path, Hub reference or LoraAdapter) and write it to `output` in format `to`.
    With `dry_run` (or no `output`), check everything and write nothing. `device`: where LoHa/LoKr
    are factored (auto, cpu, cuda, cuda:N). `uniform_scale`: one alpha for all modules, the rest of
    each scale folded into B (PEFT output). `fused_rank`: kohya / comfyui output, every fused projection
    whose exact fusion has a higher rank becomes its best rank-`fused_rank` LoRA (errors in the report's
    `fused`). `options`: a ConvertOptions instead of the keyword options. Returns a ConvertReport."""
    opts = build(ConvertOptions, options, to=to, from_=from_, base=base, rank=rank, allow_unmatched=allow_unmatched,
                 component=component, device=device, uniform_scale=uniform_scale, fused_rank=fused_rank)
    if opts.base is not None:
        paths.note_input(opts.base)  # names are read from it: it is an input the output may not replace
    if output is not None:
        output_is_folder(output, opts.to)
        if not dry_run:
            check_output(output, overwrite)
    in_fmt = source.format if isinstance(source, LoraAdapter) else (opts.from_ or detect(source))
    if opts.rank is not None and in_fmt == "kohya" and not isinstance(source, LoraAdapter):
        in_fmt = "lycoris"  # LoCon Tucker / input-axis DoRA: read as the LyCORIS file it is, to factor them
    if opts.rank is not None and in_fmt != "lycoris":
        raise UsageError("--rank applies to LyCORIS/kohya input only (resize a LoRA with `loratools resize`)")
    adapter = read_adapter(source, format=in_fmt, base=opts.base, allow_unmatched=opts.allow_unmatched or None,
                           rank=opts.rank, device=opts.device)
    read_config = adapter.config
    adapter = uniform(_for_target(adapter, opts), opts.to, opts.uniform_scale)
    fused, refactored = None, []
    if opts.fused_rank is not None:
        adapter, refactored = resize_fused(adapter, opts.to, opts.fused_rank, opts.device)
        errors = {m.name: m.rel_error for m in refactored}
        fused = {"rank": opts.fused_rank, "modules": len(errors), "worst": max(errors.values(), default=0.0),
                 "mean": sum(errors.values()) / len(errors) if errors else 0.0, "per_module": errors}
    writable_format(adapter, opts.to)  # a dry run refuses what the write would (e.g. an unfactored OFT)
    kept = read_config.get("retained")
    report = ConvertReport(
        source=os.fspath(source) if not isinstance(source, LoraAdapter) else "<adapter>", from_=in_fmt, to=opts.to,
        output=None, modules=len(adapter), rank=adapter.rank_range, extra_tensors=len(adapter.extra),
        bytes=adapter_bytes(adapter),
        names_from=read_config.get("names_from"), dropped_unmatched=read_config.get("unmatched", []),
        retained={"min": min(kept.values()), "mean": sum(kept.values()) / len(kept), "per_module": kept}
        if kept else None, fused=fused, fused_modules=refactored, dry_run=dry_run or output is None, adapter=adapter)
    if output is not None and not dry_run:
        report.output = write_adapter(adapter, output, format=opts.to, overwrite=overwrite, base=opts.base)
    return report
