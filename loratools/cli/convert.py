"""`loratools convert IN -o OUT --to peft|peft_diffusion|kohya|diffusers|gguf`"""
from __future__ import annotations

import click

from ..archs import COMPONENTS
from ..conversion import ConvertOptions, convert
from ..formats import FORMATS, WRITABLE
from .common import check_dry_output
from .common import (adapter_output_option, device_option, dry_run_line, dry_run_option, emit_json, format_option,
                     overwrite_option, quiet_option, size, table, uniform_scale_option)
from .batch import batched, stem
from .resize import REPORT_HEADERS, report_rows


@click.command("convert")
@click.argument("source", type=click.Path())
@adapter_output_option
@click.option("--to", "to", required=True, type=click.Choice(WRITABLE), help="Output format.")
@click.option("--from", "from_", type=click.Choice(list(FORMATS)), default=None, help="Input format (default: detect).")
@click.option("--base", type=click.Path(), default=None,
              help="Diffusers model folder whose module names resolve kohya/LyCORIS names "
                   "(default: the shipped SD 1.x / 2.x / SDXL manifests). --to gguf / GGUF input: the LLM "
                   "(folder, Hub reference, config.json or .gguf) whose llama.cpp names and layout to use.")
@click.option("--rank", type=int, default=None,
              help="LyCORIS/kohya input: factor LoHa, LoKr, Tucker and base-dependent updates (OFT, IA³ …, "
                   "which need --base) into LoRA at this rank; the retained energy is reported.")
@click.option("--fused-rank", type=int, default=None,
              help="--to kohya/comfyui (Flux.1, FLUX.2, SD3): refactor each fused projection (qkv …) whose exact "
                   "fusion of the split LoRAs has a higher rank (block-diagonal B) to this rank by SVD; errors are "
                   "reported.")
@click.option("--allow-unmatched", is_flag=True, help="Drop kohya/LyCORIS modules no known module matches (listed).")
@click.option("--component", type=click.Choice(COMPONENTS), default=None,
              help="Which pipeline component an adapter of one model (e.g. a PEFT UNet LoRA) belongs to; "
                   "with --to peft, the one component of a pipeline adapter to keep.")
@uniform_scale_option
@dry_run_option
@device_option
@overwrite_option
@format_option
@quiet_option
def command(source, output, to, from_, base, rank, fused_rank, allow_unmatched, component, uniform_scale, dry_run,
            device, overwrite, fmt, quiet):
    """Convert the LoRA adapter SOURCE to another format, exactly where the target can hold it.

    \b
    Examples:
      loratools convert my_lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors
      loratools convert peft_unet/ --component unet --to kohya -o my_lora.safetensors
      loratools convert loha.safetensors --to kohya --rank 16 -o lora.safetensors
      loratools convert peft_lora/ --to gguf --base Qwen/Qwen2.5-0.5B -o lora.gguf
    """
    opts = ConvertOptions(to=to, from_=from_, base=base, rank=rank, allow_unmatched=allow_unmatched,
                          component=component, device=device, uniform_scale=uniform_scale, fused_rank=fused_rank)
    rep = convert(source, output, overwrite=overwrite, dry_run=dry_run, options=opts)
    if dry_run:
        check_dry_output(output)
    if fmt == "json":
        emit_json(dict(rep.to_dict(), output=output))
        return
    if not quiet:
        rows = [[rep.from_, to, rep.modules, rep.rank, size(rep.bytes), rep.names_from or "-"]]
        click.echo(table(rows, ["from", "to", "modules", "rank", "bytes", "names from"]), err=True)
    if rep.dropped_unmatched:
        click.echo(f"dropped {len(rep.dropped_unmatched)} unmatched module(s): "
                   + ", ".join(rep.dropped_unmatched[:10]), err=True)
    if rep.retained:
        click.echo(f"LyCORIS factored to LoRA: retained Frobenius fraction min {rep.retained['min']:.6f}, "
                   f"mean {rep.retained['mean']:.6f}", err=True)
    if rep.fused is not None:
        f = rep.fused
        if rep.fused_modules and not quiet:
            click.echo(table(report_rows(rep.fused_modules), REPORT_HEADERS), err=True)
        click.echo(f"fused projections refactored to rank {f['rank']} by SVD: {f['modules']} module(s); relative "
                   f"Frobenius error of ΔW worst {f['worst']:.3e}, mean {f['mean']:.3e}"
                   + ("" if f["modules"] else " (every fused projection already at or below that rank: exact)"),
                   err=True)
    if dry_run:
        click.echo(dry_run_line(output, to, rep.bytes, rep.bytes), err=True)
    else:
        click.echo(f"wrote {output}", err=True)


def _out_name(path: str, params: dict) -> str:
    """One output per input: a folder for a folder format, else a .safetensors file."""
    return stem(path) + ("" if FORMATS[params["to"]].folder else ".safetensors")


command = batched(command, output_name="output", out_name=_out_name)
