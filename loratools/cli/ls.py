"""`loratools ls PATH...`: one row per adapter of a collection, from headers and metadata only."""
from __future__ import annotations

import csv
import io

import click

from ..collection import MAX_ENTRIES, SORTS, describe, duplicates, expand, select, summary
from .common import emit_json, size, table

COLUMNS = ["path", "format", "family", "base", "targets", "rank", "alpha", "DoRA", "dtype", "size", "loads in"]


def _span(values) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _cells(r, short: bool) -> list:
    if r.error:
        return [r.path, "unreadable"] + ["-"] * (len(COLUMNS) - 2)
    targets = ",".join(r.targets)
    if short and len(targets) > 40:
        targets = targets[:37] + "..."
    return [r.path, r.format, r.family or "-", r.base or "-", targets or "-", _span(r.ranks), _span(r.alphas),
            "yes" if r.dora else "no", r.dtype or "-", size(r.size) if short else (r.size or ""),
            ", ".join(r.loads_in) or "-"]


@click.command("ls")
@click.argument("paths", nargs=-1, required=True)
@click.option("--sort", type=click.Choice(list(SORTS)), default="path", show_default=True, help="Order of the rows.")
@click.option("--family", default=None, help="Only adapters of this family (sd1, sd2, sdxl, flux, sd3 …).")
@click.option("--base", "base_name", default=None,
              help="Only adapters whose base model name contains this (PEFT base_model_name_or_path, "
                   "kohya ss_sd_model_name).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="A table, JSON or CSV on stdout.")
@click.option("--duplicates", "dups", is_flag=True,
              help="Also hash every adapter's tensor bytes (sd-scripts' sshs_model_hash for a file) and report "
                   "groups with the same content (reads all tensor data).")
@click.option("--max-entries", type=int, default=MAX_ENTRIES, show_default=True,
              help="Stop with a message when a folder walk visits more entries than this.")
def command(paths, sort, family, base_name, fmt, dups, max_entries):
    """List the adapters under PATHS (files, folders searched recursively, globs, Hub references):
    format, family, base model, target modules, rank(s), alpha(s), DoRA, dtype and size, read from
    headers and metadata without tensor data. Files that cannot be read are listed with the reason.
    Symlinked and hidden folders are not entered. Examples:

    \b
      loratools ls ComfyUI/models/loras --sort size
      loratools ls 'loras/**/*.safetensors' --family sdxl --format csv > sdxl.csv
      loratools ls loras/ --duplicates
    """
    rows = [describe(e, content_hash=dups) for e in expand(paths, max_entries)]
    rows = sorted(select(rows, family, base_name), key=SORTS[sort])
    groups = duplicates(rows) if dups else []
    if fmt == "json":
        out = {"adapters": [r.as_dict() for r in rows]}
        if dups:
            out["duplicates"] = [[r.path for r in g] for g in groups]
        emit_json(out)
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c.lower() for c in COLUMNS] + ["modules", "hash", "error"])
        for r in rows:
            cells = _cells(r, short=False) if not r.error else [r.path] + [""] * (len(COLUMNS) - 1)
            w.writerow(cells + [r.modules if not r.error else "", r.hash or "", r.error or ""])
        click.echo(buf.getvalue(), nl=False)
        return
    click.echo(table([_cells(r, short=True) for r in rows], COLUMNS))
    for r in rows:
        if r.error:
            click.echo(f"unreadable: {r.path}: {r.error}")
    ok, bad = summary(rows)
    click.echo(f"{ok} adapter(s)" + (f", {bad} unreadable" if bad else ""), err=True)
    for g in groups:
        click.echo(f"duplicates ({g[0].hash[:12]}): " + ", ".join(r.path for r in g))
    if dups and not groups:
        click.echo("no duplicates", err=True)
