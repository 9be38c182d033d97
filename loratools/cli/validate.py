"""`loratools validate ADAPTER [--base BASE] [--strict]`: exit 0 when clean (warnings are listed), 1 on errors."""
from __future__ import annotations

import click

from ..errors import LoraToolsError
from ..checks import MAX_DELTA_RATIO
from ..validation import validate
from .batch import batched
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
    and fail only with --strict; `merge` runs the same checks before it writes.

    \b
    Examples:
      loratools validate my_lora.safetensors
      loratools validate adapter/ --base base_model/ && loratools merge base_model/ adapter/ -o merged/
      loratools validate lora.safetensors --base sd15.safetensors --strict --format json
    """
    rep = validate(adapter, base=base, norms=not no_norms, strict=strict)
    findings, errors, warnings = rep.findings, rep.errors, rep.warnings
    if fmt == "json":
        emit_json(rep.to_dict())
    else:
        for f in findings:
            click.echo(f"{f.severity}: {f.message}")
    against = f" against {base}" if base else ""
    if not rep.ok:
        raise ValidationFailed(f"{adapter}: {len(findings)} problem(s) ({errors} error(s), {warnings} warning(s))"
                               f"{against}"
                               + (" (--strict fails on warnings)" if not errors else ""))
    note = f", {warnings} warning(s)" if warnings else ""
    click.echo(f"{adapter}: ok ({rep.modules} module(s) checked{against}{note})", err=True)


command = batched(command, prefix_lines=True)
