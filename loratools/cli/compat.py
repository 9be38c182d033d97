"""`loratools compat ADAPTER... --base BASE`: which adapters fit a base, from headers only."""
from __future__ import annotations

import click

from ..bases import open_base
from ..collection import MAX_ENTRIES, compat, expand
from ..errors import IncompatibleError
from .common import emit_json, table


@click.command("compat")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", required=True, type=click.Path(),
              help="Model folder, diffusers pipeline folder or single-file SD checkpoint (or a Hub reference).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A table or JSON on stdout.")
@click.option("--max-entries", type=int, default=MAX_ENTRIES, show_default=True,
              help="Stop with a message when a folder walk visits more entries than this.")
def command(adapters, base, fmt, max_entries):
    """Say which of ADAPTERS (files, folders searched recursively, globs) fit BASE: every module
    names a weight of the base whose shape its update has. Reads headers only, on both sides.
    Exits 1 when any adapter does not fit (each is listed with its first problem). Examples:

    \b
      loratools compat loras/ --base sd15.safetensors
      loratools compat adapters/*/ --base Llama-3.2-1B/ --format json
    """
    model = open_base(base)
    fits = [compat(e, model) for e in expand(adapters, max_entries)]
    if fmt == "json":
        emit_json({"base": base, "adapters": [f.as_dict() for f in fits]})
    else:
        rows = [[f.path, "yes" if f.fits else "no", f"{f.matched}/{f.modules}", f.problem or ""] for f in fits]
        click.echo(table(rows, ["adapter", "fits", "modules", "problem"]))
    bad = sum(not f.fits for f in fits)
    if bad:
        raise IncompatibleError(f"{bad} of {len(fits)} adapter(s) do not fit {base} (listed above)")
    click.echo(f"all {len(fits)} adapter(s) fit {base}", err=True)
