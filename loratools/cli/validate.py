"""`loratools validate ADAPTER [--base BASE] [--strict]`: exit 0 when clean (warnings are listed), 1 on errors."""
from __future__ import annotations

import click

from ..errors import LoraToolsError
from ..formats import read_adapter
from ..bases import open_base
from ..validate import MAX_DELTA_RATIO, check_names, check_patterns, validate
from .common import emit_json


class ValidationFailed(LoraToolsError):
    """validate found problems (listed on stdout)."""


@click.command("validate")
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), default=None,
              help="The base it will be merged into (any base `merge` takes: model folder, diffusers pipeline "
                   "folder, single-file SD checkpoint): also check that every module fits a weight.")
@click.option("--no-norms", is_flag=True,
              help="With --base, skip reading base weights to compare ‖ΔW‖ with ‖W‖ "
                   f"(warns above {MAX_DELTA_RATIO:g}x).")
@click.option("--strict", is_flag=True, help="Fail (exit 1) on warnings too.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="One line per finding, or a JSON report (both on stdout).")
def command(adapter, base, no_norms, strict, fmt):
    """Check ADAPTER for NaN/Inf values, broken factors (A/B rank mismatch, wrong dimensions),
    suspicious scales and, with --base, modules that are absent from the base or do not fit its
    weights. Exits 1 on errors (what `merge` would refuse) and 0 otherwise; warnings are listed
    and fail only with --strict. Examples:

    \b
      loratools validate my_lora.safetensors
      loratools validate lora.safetensors --base sd15.safetensors && loratools merge sd15.safetensors …
      loratools validate adapter/ --base model/ --strict --format json
    """
    # list every problem instead of stopping at the first; unknown kohya names are a warning here
    lora = read_adapter(adapter, check=False, keep_unmatched=True)
    findings = check_names(lora) + check_patterns(lora)
    findings += validate(lora, base=open_base(base) if base else None, norms=not no_norms)
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    failed = errors > 0 or (strict and warnings > 0)
    if fmt == "json":
        emit_json({"adapter": adapter, "base": base, "modules": len(lora), "ok": not failed, "errors": errors,
                   "warnings": warnings, "findings": [f.as_dict() for f in findings]})
    else:
        for f in findings:
            click.echo(f"{f.severity}: {f.message}")
    against = f" against {base}" if base else ""
    if failed:
        raise ValidationFailed(f"{adapter}: {len(findings)} problem(s) ({errors} error(s), {warnings} warning(s))"
                               f"{against}"
                               + (" (--strict fails on warnings)" if not errors else ""))
    note = f", {warnings} warning(s)" if warnings else ""
    click.echo(f"{adapter}: ok ({len(lora)} module(s) checked{against}{note})", err=True)
