"""`loratools extract BASE TUNED -o OUT --rank K`"""
from __future__ import annotations

import click

from ..atomic import check_output
from ..archs import COMPONENTS
from ..checkpoint import Checkpoint
from ..formats import WRITABLE_ALONE
from ..extraction import ExtractOptions, default_base_name, SVD_METHODS, extract
from ..extraction_plan import plan_extract
from .common import check_dry_output
from .common import (adapter_output_option, device_option, dry_run_line, dry_run_option, emit_json, format_option,
                     overwrite_option, progress_bar, quiet_option, size, table, uniform_scale_option)
from .resize import REPORT_HEADERS, conv_rank_option, dynamic_option, param_option, report_rows


@click.command("extract")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@adapter_output_option
@click.option("--rank", type=int, required=True, help="Rank of every module (with --dynamic: the cap).")
@conv_rank_option
@dynamic_option
@param_option
@click.option("--min-diff", type=float, default=0.0, show_default=True,
              help="Skip weights whose largest absolute difference is at most this.")
@click.option("--include", multiple=True, help="Only modules whose name matches this regex (repeatable).")
@click.option("--exclude", multiple=True, help="Skip modules whose name matches this regex (repeatable).")
@click.option("--embeddings", is_flag=True, help="Also extract embeddings and lm_head (skipped by default).")
@click.option("--to", "to", type=click.Choice(WRITABLE_ALONE), default="peft", show_default=True,
              help="Output format (for GGUF: extract to peft, then `convert --to gguf --base MODEL`).")
@click.option("--component", type=click.Choice(COMPONENTS), default=None,
              help="Prefix module names with a pipeline component (kohya / diffusers output of a unet/ folder).")
@click.option("--base-model-name", default=None,
              help="base_model_name_or_path to record (default: the BASE path).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Dtype of the adapter's factors.")
@click.option("--svd", type=click.Choice(SVD_METHODS), default="auto", show_default=True,
              help="auto: randomized SVD for large matrices, exact for small ones.")
@click.option("--power-iters", type=int, default=4, show_default=True, help="Power iterations of the randomized SVD.")
@click.option("--fan-in-fan-out/--no-fan-in-fan-out", "fan_in_fan_out", default=None,
              help="Linear weights are stored [in, out] (GPT-2's Conv1D). Default: from the base's config.json.")
@uniform_scale_option
@dry_run_option
@device_option
@format_option
@overwrite_option
@quiet_option
def command(base, tuned, output, rank, conv_rank, dynamic, param, min_diff, include, exclude, embeddings, to,
            component, base_model_name, dtype, svd, power_iters, fan_in_fan_out, uniform_scale, dry_run, device, fmt,
            overwrite, quiet):
    """Extract a LoRA from TUNED (a fine-tune of BASE): factor W_tuned - W_base for every 2-D and conv
    weight that changed, and write the adapter to OUTPUT. Streams both checkpoints. With --dry-run,
    plan from the checkpoints' headers alone (no tensor data is read).

    \b
    Examples:
      loratools extract base_model/ finetuned/ -o extracted/ --rank 32
      loratools extract base_model/ finetuned/ -o dyn.safetensors --rank 64 --dynamic sv_fro --param 0.9 --to kohya
      loratools extract base_model/ finetuned/ -o extracted/ --rank 32 --dry-run
    """
    opts = ExtractOptions(rank=rank, conv_rank=conv_rank, dynamic=dynamic, param=param, min_diff=min_diff,
                          include=include, exclude=exclude, embeddings=embeddings, to=to,
                          base_model_name=base_model_name or default_base_name(base), dtype=dtype, svd=svd,
                          power_iters=power_iters, component=component, fan_in_fan_out=fan_in_fan_out, device=device,
                          uniform_scale=uniform_scale)  # the dry run refuses what the run would
    if dry_run:
        return show_plan(plan_extract(base, tuned, output, options=opts), dynamic, fmt, quiet)
    check_output(output, overwrite)
    ckpt = Checkpoint(base)  # opened once here (a Hub reference is resolved once) for the bar's total
    with progress_bar(len(ckpt.infos), "extracting", quiet) as bar:
        result = extract(ckpt, tuned, output, overwrite=overwrite, progress=lambda _name: bar.update(1), options=opts)
    if fmt == "json":
        emit_json({"output": result.output, "format": to, "average_fro_retained": result.average_fro_retained,
                   "modules": [dict(m.as_dict(), svd=result.methods[m.name]) for m in result.modules],
                   "skipped": result.skipped})
    elif not quiet:
        rows = [r[:2] + r[3:] + [result.methods[m.name]] for r, m in zip(report_rows(result.modules), result.modules)]
        headers = REPORT_HEADERS[:2] + REPORT_HEADERS[3:] + ["svd"]
        click.echo(table(rows, headers), err=True)
    if not quiet:
        for reason, names in result.skipped.items():
            if reason.startswith("differs"):
                why = reason[len('differs but '):]
                click.echo(f"note: {len(names)} tensor(s) changed but were not extracted ({why}):"
                           f" {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}", err=True)
        click.echo(f"extracted {len(result.modules)} module(s) as {to}; average Frobenius norm retained "
                   f"{result.average_fro_retained:.4f}; wrote {output}", err=True)


def show_plan(plan, dynamic, fmt: str, quiet: bool) -> None:
    """A dry run's report: the candidate modules with their ranks, then what would be written."""
    check_dry_output(plan.output)
    if fmt == "json":
        emit_json(plan.to_dict())
        return
    if not quiet:
        bound = "≤ " if dynamic else ""
        rows = [[m.name, m.kind, "x".join(map(str, m.shape)), f"{bound}{m.rank}", m.svd, size(m.bytes)]
                for m in plan.modules]
        click.echo(table(rows, ["module", "kind", "shape", "rank", "svd", "bytes"]), err=True)
        click.echo(f"{len(plan.modules)} candidate module(s); sizes are upper bounds: a weight that did not change "
                   "is skipped when the extraction runs", err=True)
    click.echo(dry_run_line(plan.output, plan.format, plan.work_bytes, plan.out_bytes), err=True)
