"""`loratools convert IN -o OUT --to peft|peft_diffusion|kohya|diffusers`"""
from __future__ import annotations

import dataclasses

import click

from ..archs import COMPONENTS
from ..errors import UsageError
from ..formats import FORMATS, WRITABLE, detect, read_adapter, write_adapter
from .batch import batched, stem
from .common import emit_json, format_option, overwrite_option, table


def add_component(adapter, component: str):
    """Prefix bare module names (an adapter of one model) with a pipeline component."""
    prefixed = [m.name for m in adapter if m.name.split(".", 1)[0] in COMPONENTS]
    if prefixed:
        raise UsageError(f"--component: the adapter's names already carry a component ({prefixed[0]})")
    modules = {f"{component}.{n}": dataclasses.replace(m, name=f"{component}.{n}") for n, m in adapter.modules.items()}
    extra = {f"{component}.{n}": t for n, t in adapter.extra.items()}
    return dataclasses.replace(adapter, modules=modules, extra=extra)


@click.command("convert")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Where to write: a file for kohya/diffusers, a folder for peft/peft_diffusion.")
@click.option("--to", "to", required=True, type=click.Choice(WRITABLE), help="Output format.")
@click.option("--from", "from_", type=click.Choice(list(FORMATS)), default=None, help="Input format (default: detect).")
@click.option("--base", type=click.Path(), default=None,
              help="Diffusers model folder whose module names resolve kohya/LyCORIS names "
                   "(default: the shipped SD 1.x / 2.x / SDXL manifests).")
@click.option("--rank", type=int, default=None,
              help="LyCORIS LoHa/LoKr only: rank to factor each ΔW at (default: its exact numerical rank).")
@click.option("--allow-unmatched", is_flag=True, help="Drop kohya/LyCORIS modules no known module matches (listed).")
@click.option("--component", type=click.Choice(COMPONENTS), default=None,
              help="Say which pipeline component an adapter of one model (e.g. a PEFT UNet LoRA) belongs to.")
@overwrite_option
@format_option
def command(source, output, to, from_, base, rank, allow_unmatched, component, overwrite, fmt):
    """Convert the LoRA adapter SOURCE to another format, exactly where the target can hold it.

    \b
    Examples:
      loratools convert my_lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors
      loratools convert peft_unet/ --component unet --to kohya -o my_lora.safetensors
      loratools convert loha.safetensors --to kohya --rank 16 -o lora.safetensors
    """
    in_fmt = from_ or detect(source)
    if rank is not None and in_fmt != "lycoris":
        raise UsageError("--rank applies to LyCORIS LoHa/LoKr input only (resize a LoRA with `loratools resize`)")
    adapter = read_adapter(source, format=in_fmt, base=base, allow_unmatched=allow_unmatched or None, rank=rank)
    if component:
        adapter = add_component(adapter, component)
    write_adapter(adapter, output, format=to, overwrite=overwrite)
    report = {"input": source, "from": in_fmt, "output": output, "to": to, "modules": len(adapter),
              "extra_tensors": len(adapter.extra), "names_from": adapter.config.get("names_from"),
              "dropped_unmatched": adapter.config.get("unmatched", [])}
    kept = adapter.config.get("retained")
    if kept:
        report["retained"] = {"min": min(kept.values()), "mean": sum(kept.values()) / len(kept), "per_module": kept}
    if fmt == "json":
        emit_json(report)
        return
    rows = [[in_fmt, to, len(adapter), adapter.rank_range, report["names_from"] or "-"]]
    click.echo(table(rows, ["from", "to", "modules", "rank", "names from"]), err=True)
    if report["dropped_unmatched"]:
        click.echo(f"dropped {len(report['dropped_unmatched'])} unmatched module(s): "
                   + ", ".join(report["dropped_unmatched"][:10]), err=True)
    if kept:
        click.echo(f"LyCORIS factored to LoRA: retained Frobenius fraction min {report['retained']['min']:.6f}, "
                   f"mean {report['retained']['mean']:.6f}", err=True)
    click.echo(f"wrote {output}", err=True)


def _out_name(path: str, params: dict) -> str:
    """One output per input: a folder for a folder format, else a .safetensors file."""
    return stem(path) + ("" if FORMATS[params["to"]].folder else ".safetensors")


command = batched(command, output_name="output", out_name=_out_name)
