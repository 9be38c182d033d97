"""Pieces shared by the command modules."""
from __future__ import annotations

import json
import sys

import click
from tqdm import tqdm

output_option = click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the result.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="Report as a table on stderr or JSON on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")


def progress_bar(total: int, desc: str, quiet: bool, unit: str = "tensor"):
    """A tqdm bar on stderr (hidden when quiet or when stderr is not a terminal)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet or None, leave=False)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def table(rows, headers) -> str:
    """A plain aligned text table."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
