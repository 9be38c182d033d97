"""`loratools resize ADAPTER -o OUT --rank K | --dynamic RULE --param P`"""
from __future__ import annotations

import click

from ..formats import output_is_folder, read_adapter
from ..inspection import adapter_bytes
from ..resizing import ResizeOptions, require_matplotlib, resize
from ..linalg import RANK_RULES
from ..checks import check_names
from .common import check_dry_output
from .common import (adapter_output_option, device_option, dry_run_line, dry_run_option, emit_json, format_option,
                     overwrite_option, progress_bar, quiet_option, table, uniform_scale_option)
from .batch import batched, same_name

rank_option = click.option("--rank", type=int, default=None,
                           help="New rank (with --dynamic: the cap). Never above a module's old rank.")
conv_rank_option = click.option("--conv-rank", type=int, default=None,
                                help="New rank (or cap) for conv modules (default: --rank).")
dynamic_option = click.option("--dynamic", type=click.Choice(RANK_RULES), default=None,
                              help="Pick each module's rank: sv_ratio keeps σ_i > σ_max/P; sv_fro the smallest k "
                                   "keeping a fraction P of ||ΔW||_F; sv_cumulative of Σσ.")
param_option = click.option("--param", type=float, default=None, help="The --dynamic rule's parameter P.")


def fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report_rows(modules):
    return [[m.name, m.kind, m.old_rank, m.new_rank, fmt(m.fro_retained), fmt(m.sum_retained),
             fmt(m.sv_ratio, 2), f"{m.rel_error:.2e}"] for m in modules]


REPORT_HEADERS = ["module", "kind", "old rank", "new rank", "fro retained", "sum(σ) retained", "σmax/σk", "rel. error"]


@click.command("resize")
@click.argument("adapter", type=click.Path())
@adapter_output_option
@rank_option
@conv_rank_option
@dynamic_option
@param_option
@click.option("--plot", type=click.Path(), default=None,
              help="Also draw the singular-value spectra and the chosen cuts into this PNG (needs matplotlib).")
@uniform_scale_option
@dry_run_option
@device_option
@format_option
@overwrite_option
@quiet_option
def command(adapter, output, rank, conv_rank, dynamic, param, plot, uniform_scale, dry_run, device, fmt, overwrite,
            quiet):
    """Resize ADAPTER's rank and write it to OUTPUT in the same format.

    Each module becomes the best rank-k approximation of its update (SVD through the factors,
    never the dense matrix, in fp32), with the same scale. Examples:

    \b
      loratools resize my_lora.safetensors -o small.safetensors --rank 16
      loratools resize adapter/ -o adapter-dyn/ --dynamic sv_fro --param 0.9 --rank 64
    """
    opts = ResizeOptions(rank=rank, conv_rank=conv_rank, dynamic=dynamic, param=param, device=device,
                         uniform_scale=uniform_scale)
    src = read_adapter(adapter, keep_unmatched=True)  # kohya names are written back as they were read
    for f in check_names(src):
        click.echo(f"warning: {f.message}", err=True)
    output_is_folder(output, src.format)
    if plot and dry_run:  # a real run checks it (and the outputs) in `resize`
        require_matplotlib()
    with progress_bar(len(src), "resizing", quiet) as bar:
        result = resize(src, None if dry_run else output, overwrite=overwrite, progress=lambda _name: bar.update(1),
                        plot=None if dry_run else plot or None, options=opts)
    if dry_run:
        check_dry_output(output)
    old = sum(m.old_rank for m in result.modules)
    new = sum(m.new_rank for m in result.modules)
    summary = (f"resized {len(result.modules)} module(s) ({result.adapter.format}): total rank {old} -> {new}; "
               f"average Frobenius norm retained {result.average_fro_retained:.4f}; wrote {output}")
    if fmt == "json":
        emit_json({"output": result.output, "format": result.adapter.format,
                   "average_fro_retained": result.average_fro_retained, "plot": plot,
                   "modules": [m.as_dict() for m in result.modules]})
    elif not quiet:
        click.echo(table(report_rows(result.modules), REPORT_HEADERS), err=True)
    if dry_run:
        click.echo(dry_run_line(output, result.adapter.format, adapter_bytes(src), adapter_bytes(result.adapter)),
                   err=True)
    elif not quiet:
        click.echo(summary, err=True)


command = batched(command, output_name="output", out_name=same_name, single_only=("plot",))
