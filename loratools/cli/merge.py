"""`loratools merge BASE ADAPTER [ADAPTER ...] -o OUT`"""
from __future__ import annotations

import click

from .. import refs, share
from ..bases import QuantizedBase
from ..merge import describe, merge as run_merge, open_base
from .common import output_option, overwrite_option, progress_bar, quiet_option, table


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@output_option
@click.option("-w", "--weight", "weights", multiple=True, type=float,
              help="Weight per adapter, in order (default 1). Negative subtracts: --weight -1 undoes a merge.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Dtype of the output's floating tensors (default: keep each tensor's dtype; "
                   "bf16 for a dequantized quantized base).")
@click.option("--requantize", is_flag=True,
              help="Quantized base (bitsandbytes 4-bit/8-bit, FP8): write the merged weights quantized again in the "
                   "base's format and report the error (default: a plain checkpoint, bf16 unless --dtype).")
@click.option("--dry-run", is_flag=True, help="Print what would be merged and write nothing.")
@click.option("--no-check-finite", is_flag=True, help="Skip the NaN/Inf check of merged weights.")
@click.option("--push", "push_to", metavar="REPO_ID", default=None,
              help="Also upload the merged model to this Hub repository, with a model card, in one commit.")
@click.option("--private", is_flag=True, help="With --push: create the repository as private.")
@overwrite_option
@quiet_option
def command(base, adapters, output, weights, dtype, requantize, dry_run, no_check_finite, push_to, private, overwrite,
            quiet):
    """Merge one or more LoRA ADAPTERS into the BASE model and write the merged model to OUTPUT.

    BASE is a model folder, a diffusers pipeline folder (model_index.json; adapter modules named
    unet.…, text_encoder.…) or a single-file SD 1.x/2.x/SDXL .safetensors checkpoint (written as
    one file). Streams the checkpoint one tensor at a time, keeps its shard layout, and copies its other files.
    """
    if push_to:
        push_to = refs.check_repo_id(push_to)
        share.check_online(push_to)  # fail before merging, not after
    if dry_run:
        ckpt, plan = describe(base, adapters, list(weights), requantize=requantize)
        default = "bf16" if isinstance(ckpt, QuantizedBase) and not requantize else "same dtypes"
        rows = []
        for (adapter, w), path in zip(plan.adapters, adapters):
            rows.append([path, adapter.format, len(adapter), w, adapter.rank_range, len(adapter.extra)])
        click.echo(table(rows, ["adapter", "format", "modules", "weight", "rank", "extra tensors"]))
        click.echo(f"base: {ckpt.describe()}; "
                   f"{len(plan.terms)} weights would be merged, {len(plan.replace)} replaced; "
                   f"output {output} ({dtype or default}); nothing written (dry run)")
        return
    ckpt = open_base(base)  # also resolves a Hub reference
    with progress_bar(ckpt.num_tensors, "merging", quiet) as bar:
        plan = run_merge(ckpt, adapters, output, weights=list(weights), dtype=dtype, overwrite=overwrite,
                         check_finite=not no_check_finite, progress=lambda _name: bar.update(1),
                         requantize=requantize)
    errors = getattr(ckpt, "requant_errors", None)
    if errors:
        worst = max(errors, key=errors.get)
        click.echo(f"requantized {len(errors)} merged weight(s): relative error mean "
                   f"{sum(errors.values()) / len(errors):.3g}, max {errors[worst]:.3g} ({worst})", err=True)
    click.echo(f"merged {plan.num_modules} module(s) from {len(adapters)} adapter(s) into {len(plan.terms)} "
               f"weight(s); wrote {output}", err=True)
    if push_to:
        card = share.merged_card(push_to, base, adapters, list(weights) or [1.0] * len(adapters), output)
        info = share.execute(share.plan_folder_push(output, push_to, card), private=private,
                                commit_message=f"Upload merged model ({len(adapters)} adapter(s)) with loratools")
        click.echo(f"pushed {output} to {push_to}: {info.commit_url}", err=True)
