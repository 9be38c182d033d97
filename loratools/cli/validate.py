"""`loratools validate ADAPTER [--base BASE]`: exit 0 when clean, 1 with one line per finding."""
from __future__ import annotations

import click

from ..errors import LoraToolsError
from ..formats import read_adapter
from ..validation import MAX_DELTA_RATIO, validate
from .common import emit_json


class ValidationFailed(LoraToolsError):
    """validate found problems (listed on stdout)."""


@click.command("validate")
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), default=None,
              help="Base model folder (or .safetensors file): also check that every module fits a weight.")
@click.option("--no-norms", is_flag=True,
              help=f"With --base, skip reading base weights to compare ‖ΔW‖ with ‖W‖ (warns above {MAX_DELTA_RATIO:g}x).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="One line per finding, or a JSON report (both on stdout).")
def command(adapter, base, no_norms, fmt):
    """Check ADAPTER for NaN/Inf values, broken factors (A/B rank mismatch, wrong dimensions),
    suspicious scales and, with --base, modules that are absent from the base or do not fit its
    weights. Exits 0 when clean and 1 when not; `merge` runs the same checks before it writes.

    \b
    Examples:
      loratools validate my_lora.safetensors
      loratools validate adapter/ --base base_model/ && loratools merge base_model/ adapter/ -o merged/
      loratools validate adapter/ --base base_model/ --no-norms --format json
    """
    lora = read_adapter(adapter, check=False)  # list every problem instead of stopping at the first
    findings = validate(lora, base=base, norms=not no_norms)
    if fmt == "json":
        emit_json({"adapter": adapter, "base": base, "modules": len(lora), "ok": not findings,
                   "findings": [f.as_dict() for f in findings]})
    else:
        for f in findings:
            click.echo(f"{f.severity}: {f.message}")
    against = f" against {base}" if base else ""
    if findings:
        errors = sum(f.severity == "error" for f in findings)
        raise ValidationFailed(f"{adapter}: {len(findings)} problem(s) ({errors} error(s), "
                               f"{len(findings) - errors} warning(s)){against}")
    click.echo(f"{adapter}: ok ({len(lora)} module(s) checked{against})", err=True)
