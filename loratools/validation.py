"""`loratools.validate`: every check of an adapter, and of its fit to a base, as one report."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

from .adapter import LoraAdapter
from .bases import Base, open_base
from .checks import Finding, check_all, check_names, check_patterns
from .formats import read_adapter
from .report import Report

PathLike = Union[str, os.PathLike]


@dataclass(repr=False)
class ValidateReport(Report):
    adapter: str
    base: Optional[str]
    modules: int
    findings: List[Finding] = field(default_factory=list)
    strict: bool = False  # warnings fail too

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return len(self.findings) - self.errors

    @property
    def ok(self) -> bool:
        return self.errors == 0 and not (self.strict and self.warnings)

    def summary(self) -> dict:
        return {"adapter": self.adapter, "base": self.base, "modules": self.modules, "ok": self.ok,
                "errors": self.errors, "warnings": self.warnings}

    def to_dict(self) -> dict:
        return dict(self.summary(), findings=[f.as_dict() for f in self.findings])


def validate(adapter: Union[PathLike, LoraAdapter], base: Union[PathLike, Base, None] = None, norms: bool = True,
             strict: bool = False) -> ValidateReport:
    """Every finding for `adapter` (a path, Hub reference or LoraAdapter), and against `base` (any base
    `merge` takes) when given; with `norms`, also compare ‖ΔW‖ with ‖W‖. Never raises on a finding:
    the report's `ok` says whether `merge` would accept it (with `strict`, warnings count too)."""
    # list every problem instead of stopping at the first; unknown kohya names are a warning here
    model = open_base(base) if base is not None else None
    # the base tells how its expert stacks are laid out (PEFT target_parameters adapters)
    layout = (getattr(model, "adapter_options", None) or {}).get("transposed_experts")
    lora = read_adapter(adapter, check=False, keep_unmatched=True, transposed_experts=layout)
    findings = check_names(lora) + check_patterns(lora)
    findings += check_all(lora, base=model, norms=norms)
    where = "<adapter>" if isinstance(adapter, LoraAdapter) else os.fspath(adapter)
    shown = None if base is None else (base.folder if hasattr(base, "folder") else os.fspath(base))
    return ValidateReport(where, shown, len(lora), findings, strict)
