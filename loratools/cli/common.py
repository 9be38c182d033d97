"""Pieces shared by the command modules."""
from __future__ import annotations

import json
import os
import sys
from typing import List, Sequence, Tuple

import click
from tqdm import tqdm

from .. import paths
from ..errors import UsageError

output_option = click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the result.")
adapter_output_option = click.option(
    "-o", "--output", required=True, type=click.Path(),
    help="Where to write the adapter: NAME.safetensors (NAME.gguf) for one file (kohya, diffusers, gguf), "
         "a folder (no suffix or a trailing /) for peft, peft_diffusion and diffusers.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="Report as a table on stderr or JSON on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report table.")
uniform_scale_option = click.option(
    "--uniform-scale", is_flag=True,
    help="PEFT output: fold each module's scale into its B so one lora_alpha holds for all modules and no "
         "alpha_pattern is needed (llama.cpp's converter and other tools ignore it).")
dry_run_option = click.option("--dry-run", is_flag=True,
                              help="Print what would be written (modules, ranks, size, peak memory); write nothing.")
weight_option = click.option("-w", "--weight", "weights", multiple=True, type=float,
                             help="Weight per adapter, in order (default 1; same as ADAPTER:W). Negative subtracts.")
device_option = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                             help="Where the linear algebra runs: auto (CUDA when torch sees a GPU, else cpu), "
                                  "cpu, cuda or cuda:N.")
ADAPTERS_METAVAR = "ADAPTER[:WEIGHT]..."


def split_weight(spec: str) -> Tuple[str, float | None]:
    """`path[:weight]`: a trailing `:number` is a weight unless the whole string is an existing path."""
    path, _, tail = spec.rpartition(":")
    if os.path.exists(spec) or ":" not in spec or "/" in tail:  # `hf://user/repo` has no weight
        return spec, None
    try:
        return path, float(tail)
    except ValueError:
        raise UsageError(f"{spec}: expected ADAPTER or ADAPTER:WEIGHT with a number as WEIGHT") from None


def weighted_adapters(specs: Sequence[str], weights: Sequence[float]) -> Tuple[List[str], List[float]]:
    """(paths, weights) from ADAPTER[:WEIGHT] arguments and/or -w options (one form, not both)."""
    paths, inline = zip(*(split_weight(s) for s in specs))
    given = [w for w in inline if w is not None]
    if given and weights:
        raise UsageError("give weights as ADAPTER:WEIGHT or with -w, not both")
    if given:
        return list(paths), [1.0 if w is None else w for w in inline]
    if weights and len(weights) != len(paths):
        raise UsageError(f"{len(weights)} -w value(s) for {len(paths)} adapter(s): give one per adapter, in order")
    return list(paths), list(weights) or [1.0] * len(paths)


def progress_bar(total: int, desc: str, quiet: bool, unit: str = "tensor"):
    """A tqdm bar on stderr (hidden when quiet or when stderr is not a terminal)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet or None, leave=False)


def size(n) -> str:
    """Bytes for people: '512 B', '3.2 MiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_dry_output(output) -> None:
    """A dry run refuses, as the real run would, an output that aliases an input (call it once the
    inputs are read, before any report is printed)."""
    if output is not None:
        paths.check_aliasing(os.path.abspath(os.fspath(output)))


def dry_run_line(output, fmt: str, in_bytes: int, out_bytes: int) -> str:
    """What a dry run would have written; peak memory is `in_bytes` (the inputs, or what the operation
    holds at its largest step) and the result held at once."""
    return (f"would write {output} ({fmt}, {size(out_bytes)} of tensors; peak memory about "
            f"{size(in_bytes + out_bytes)}); nothing written (dry run)")


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def table(rows, headers) -> str:
    """A plain aligned text table."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
