"""`loratools merge BASE ADAPTER [ADAPTER ...] -o OUT`"""
from __future__ import annotations

import math
import os

import click

from .. import refs, share
from ..bases import QuantizedBase
from ..inspection import adapter_bytes
from ..merging import MergeOptions, describe, merge as run_merge, open_base
from .common import check_dry_output
from .common import (ADAPTERS_METAVAR, device_option, dry_run_line, output_option, overwrite_option, progress_bar,
                     quiet_option, table, weight_option, weighted_adapters)

_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _weights_bytes(path: str) -> int:
    """Bytes of the base's weight files: about what the merged output holds (same layout). A model
    folder holds them at its top, a pipeline one level down: nothing deeper is looked at, no link followed."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder in [path] + [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]:
        total += sum(e.stat().st_size for e in os.scandir(folder)
                     if e.is_file(follow_symlinks=False) and e.name.endswith(_WEIGHT_SUFFIXES))
    return total


def _peak_bytes(ckpt, plan) -> int:
    """The adapters, plus the largest merged weight about three times over in fp32 (read, work, write)."""
    largest = max((math.prod(ckpt.shape(n)) for n in plan.terms), default=0)
    return sum(adapter_bytes(a) for a, _ in plan.adapters) + 3 * 4 * largest


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, metavar=ADAPTERS_METAVAR)
@output_option
@weight_option
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Dtype of the output's floating tensors (default: keep each tensor's dtype; "
                   "bf16 for a dequantized quantized base).")
@click.option("--out-type", default=None, metavar="TYPE",
              help="GGUF bases: type of the merged tensors (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0; "
                   "default: each tensor's own type, which must be one of these).")
@click.option("--requantize", is_flag=True,
              help="Quantized base (bitsandbytes 4-bit/8-bit, FP8): write the merged weights quantized again in the "
                   "base's format and report the error (default: a plain checkpoint, bf16 unless --dtype).")
@click.option("--dry-run", is_flag=True, help="Print what would be merged and write nothing.")
@click.option("--no-check-finite", is_flag=True, help="Skip the NaN/Inf check of merged weights.")
@click.option("--push", "push_to", metavar="REPO_ID", default=None,
              help="Also upload the merged model to this Hub repository, with a model card, in one commit.")
@click.option("--private", is_flag=True, help="With --push: create the repository as private.")
@device_option
@overwrite_option
@quiet_option
def command(base, adapters, output, weights, dtype, out_type, requantize, dry_run, no_check_finite, push_to, private,
            device,
            overwrite, quiet):
    """Merge one or more LoRA ADAPTERS into the BASE model and write the merged model to OUTPUT.

    BASE is a model folder, a diffusers pipeline folder (model_index.json; adapter modules named
    unet.…, text_encoder.…), a single-file SD 1.x/2.x/SDXL .safetensors checkpoint (written as
    one file) or a GGUF model for llama.cpp / Ollama (written as one .gguf; quantized tensors are
    dequantized, merged and quantized again, with the error reported). A bitsandbytes 4-bit/8-bit
    or FP8 model folder is written dequantized (bf16 unless --dtype), or with --requantize in its
    own format. Streams the checkpoint one
    tensor at a time, keeps its shard layout, and copies its other files.

    \b
    Examples:
      loratools merge base_model/ style/:0.7 task/ -o merged/
      loratools merge merged/ style/ -w -1 -o base_again/          # undo a merge
      loratools merge sd15.safetensors lora.safetensors:0.8 -o sd15-lora.safetensors --dtype fp16
      loratools merge ./sdxl-pipeline a.safetensors b/ --dry-run -o out/
    """
    adapters, weights = weighted_adapters(adapters, weights)
    opts = MergeOptions(weights=weights, dtype=dtype, out_type=out_type, check_finite=not no_check_finite,
                        device=device, requantize=requantize)
    if push_to:
        push_to = refs.check_repo_id(push_to)
        share.check_online(push_to)  # fail before merging, not after
    if dry_run:
        ckpt, plan = describe(base, adapters, options=opts)
        check_dry_output(output)
        default = "bf16" if isinstance(ckpt, QuantizedBase) and not requantize else "same dtypes"
        rows = []
        for (adapter, w), path in zip(plan.adapters, adapters):
            rows.append([path, adapter.format, len(adapter), w, adapter.rank_range, len(adapter.extra)])
        click.echo(table(rows, ["adapter", "format", "modules", "weight", "rank", "extra tensors"]))
        click.echo(f"base: {ckpt.describe()}; "
                   f"{len(plan.terms)} weights would be merged, {len(plan.replace)} replaced; "
                   f"output {output} ({dtype or default}); nothing written (dry run)")
        if not quiet:
            out_bytes = _weights_bytes(ckpt.folder)
            click.echo(dry_run_line(output, ckpt.kind, _peak_bytes(ckpt, plan), out_bytes), err=True)
        return
    ckpt = open_base(base)  # also resolves a Hub reference
    with progress_bar(ckpt.num_tensors, "merging", quiet) as bar:
        plan = run_merge(ckpt, adapters, output, overwrite=overwrite, progress=lambda _name: bar.update(1),
                         options=opts)
    click.echo(f"merged {plan.num_modules} module(s) from {len(adapters)} adapter(s) into {len(plan.terms)} "
               f"weight(s); wrote {output}", err=True)
    if plan.quant_error:
        worst = max(plan.quant_error, key=plan.quant_error.get)
        types = sorted({out for _, out in plan.types.values()})
        click.echo(f"requantized {len(plan.quant_error)} tensor(s) to {', '.join(types)}: relative error "
                   f"max {plan.quant_error[worst]:.3g} ({worst}), mean "
                   f"{sum(plan.quant_error.values()) / len(plan.quant_error):.3g}", err=True)
    if plan.not_copied:
        click.echo(f"warning: not copied from the base: {', '.join(plan.not_copied)}", err=True)
    if push_to:
        card = share.merged_card(push_to, base, adapters, weights, output)
        info = share.execute(share.plan_folder_push(output, push_to, card), private=private,
                                commit_message=f"Upload merged model ({len(adapters)} adapter(s)) with loratools")
        click.echo(f"pushed {output} to {push_to}: {info.commit_url}", err=True)
