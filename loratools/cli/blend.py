"""`loratools blend ADAPTER[:WEIGHT] ... --method M [--rank K] -o OUT`"""
from __future__ import annotations

import click

from ..blending import METHODS, SIGN_METHODS, SVD_MODES, BlendOptions, blend as run_blend
from ..formats import WRITABLE_ALONE, detect, output_is_folder as check_output_kind, read_adapter
from ..inspection import adapter_bytes
from .common import check_dry_output
from .common import (ADAPTERS_METAVAR, adapter_output_option, device_option, dry_run_line, dry_run_option, emit_json,
                     format_option, overwrite_option, progress_bar, quiet_option, table, uniform_scale_option,
                     weight_option, weighted_adapters)


@click.command("blend")
@click.argument("adapters", nargs=-1, required=True, metavar=ADAPTERS_METAVAR)
@weight_option
@click.option("-m", "--method", type=click.Choice(METHODS), default="svd", show_default=True,
              help="cat: exact, rank Σr. svd: best rank-K of the exact weighted sum. linear: PEFT/kohya factor "
                   "averaging (approximate). ties, dare_linear, dare_ties, magnitude_prune: element-wise on ΔW.")
@click.option("-r", "--rank", type=int, default=None,
              help="Output rank for svd and the element-wise methods (default: the largest input rank).")
@click.option("--density", type=float, default=None, help="Fraction of each ΔW kept by ties/dare/magnitude_prune.")
@click.option("--majority-sign", type=click.Choice(SIGN_METHODS), default=None,
              help="Sign election for ties/dare_ties (default total).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE masks and randomized SVD.")
@click.option("--svd", "svd_mode", type=click.Choice(SVD_MODES), default=None,
              help="How element-wise results are factored back to rank K (default randomized, 4 power iterations).")
@click.option("--clamp", type=float, default=None,
              help="Clamp the factors at this quantile, as kohya does (e.g. 0.99).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Dtype of the output factors (default: the first adapter's).")
@click.option("--to", "to", type=click.Choice(WRITABLE_ALONE), default=None,
              help="Output format (default: the first adapter's).")
@adapter_output_option
@uniform_scale_option
@dry_run_option
@device_option
@overwrite_option
@format_option
@quiet_option
def command(adapters, weights, method, rank, density, majority_sign, seed, svd_mode, clamp, dtype, to, output,
            uniform_scale, dry_run, device, overwrite, fmt, quiet):
    """Blend several LoRA ADAPTERS (each optionally weighted as PATH:WEIGHT, weights may be negative)
    into one adapter written to OUTPUT, and report per module the Frobenius norm retained.

    \b
    Examples:
      loratools blend style/:0.7 subject/:0.3 -m cat -o blended/
      loratools blend a/ b/ c/ -w 0.5 -w 0.3 -w -0.2 -m svd --rank 16 -o blended/
      loratools blend a.safetensors b.safetensors -m ties --density 0.5 --rank 16 -o ab.safetensors
    """
    paths, weights = weighted_adapters(adapters, weights)
    opts = BlendOptions(weights=weights, method=method, rank=rank, density=density, majority_sign=majority_sign,
                        seed=seed, svd=svd_mode, clamp=clamp, dtype=dtype, to=to, device=device,
                        uniform_scale=uniform_scale)
    if dry_run:
        check_output_kind(output, to or detect(paths[0]))
    with progress_bar(None, f"blending ({method})", quiet) as bar:
        result, report = run_blend(paths, output=None if dry_run else output, overwrite=overwrite,
                                   progress=lambda _name: bar.update(1), options=opts)
    if dry_run:
        check_dry_output(output)
    if fmt == "json":
        emit_json(dict(report.to_dict(), output=output))
        return
    rows = [[m.name, "+".join(map(str, m.ranks_in)), m.rank_out, f"{m.norm_target:.4g}", f"{m.retained:.4f}",
             f"{m.rel_error:.2e}"] for m in report.modules]
    t = report.totals()
    rows.append(["TOTAL", t["rank_in"], t["rank_out"], f"{t['norm_target']:.4g}", f"{t['retained']:.4f}",
                 f"{t['rel_error']:.2e}"])
    if not quiet:
        click.echo(table(rows, ["module", "ranks in", "rank out", "‖target‖", "retained", "rel. error"]), err=True)
    if dry_run:
        click.echo(dry_run_line(output, result.format, sum(adapter_bytes(read_adapter(p)) for p in paths),
                                adapter_bytes(result)), err=True)
        return
    click.echo(f"blended {len(paths)} adapter(s) with {method} into {t['modules']} module(s); wrote {output}", err=True)
