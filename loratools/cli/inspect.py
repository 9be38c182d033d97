"""`loratools inspect ADAPTER`: what an adapter holds, as a table or JSON."""
from __future__ import annotations

import math
from typing import List, Optional

import click

from ..inspection import inspect
from .batch import batched
from .common import emit_json, size, table


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _json_safe(obj):
    """NaN/Inf are not JSON: scripts get null (validate says what is wrong)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _spread_line(spread: dict) -> str:
    if spread["common"] is None:
        return "-"
    line = _fmt(spread["common"])
    differs = spread["differs"]
    if differs:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(differs.items())[:3])
        more = f" and {len(differs) - 3} more" if len(differs) > 3 else ""
        line += f" ({len(differs)} module(s) differ, {_fmt(spread['min'])}..{_fmt(spread['max'])}: {shown}{more})"
    return line


def _training_lines(t: Optional[dict]) -> List[str]:
    if not t:
        return []
    net = " ".join(x for x in (t.get("network_module"), t.get("network_dim") and f"dim {t['network_dim']}",
                                t.get("network_alpha") and f"alpha {t['network_alpha']}") if x)
    parts = [net, t.get("network_args") and f"args {t['network_args']}",
             t.get("base_model_version") and f"base {t['base_model_version']}"
             + (f" ({t['base_model']})" if t.get("base_model") else ""),
             t.get("resolution") and f"resolution {t['resolution']}",
             t.get("epoch") and f"epoch {t['epoch']}" + (f"/{t['epochs']}" if t.get("epochs") else ""),
             t.get("steps") and f"steps {t['steps']}", t.get("images") and f"{t['images']} images",
             t.get("learning_rate") and f"lr {t['learning_rate']}"]
    lines = ["training    " + ", ".join(p for p in parts if p)]
    tags = t.get("tags")
    if tags:
        top = ", ".join(f"{k} {_fmt(v)}" for k, v in tags["top"])
        lines.append(f"tags        {top} ({tags['distinct']} distinct tag(s) in {tags['datasets']} dataset folder(s))")
    return lines


def render(rep: dict, modules: bool) -> str:
    fam = rep["family"]
    algos = rep["algorithms"]
    lines = [
        f"adapter     {rep['path']}",
        f"format      {rep['format']}" + ("  (" + ", ".join(f"{k} {v}" for k, v in algos.items()) + ")"
                                          if set(algos) - {"lora"} else ""),
        f"base model  {rep['base_model'] or '-'}",
        f"family      {fam['name']} (from {fam['evidence']})" if fam else "family      -",
        *_training_lines(rep["training"]),
        f"modules     {rep['modules']}  kinds: " + ", ".join(f"{k} {v}" for k, v in rep["kinds"].items()),
        "targets     " + (", ".join(f"{k} {v}" for k, v in rep["targets"].items()) or "-"),
        f"rank        {_spread_line(rep['rank'])}",
        f"alpha       {_spread_line(rep['alpha'])}",
        f"scale       {_spread_line(rep['scale'])}"
        + ("  (rsLoRA: alpha/sqrt(r))" if True in rep["use_rslora"] else ""),
        f"DoRA        {'yes' if rep['dora'] else 'no'}",
        "dtype       " + ", ".join(f"{k} ({v} modules/tensors)" for k, v in rep["dtypes"].items()),
        f"parameters  {rep['parameters']:,} ({rep['lora_parameters']:,} in LoRA factors)",
        f"bytes       {size(rep['bytes'])} of tensors, {size(rep['disk_bytes'])} on disk",
        f"|ΔW| total  {_fmt(rep['delta_norm_total'])}",
    ]
    loads = rep["loads_in"]
    lines.append("loads in    " + ", ".join(f"{k} {'✓' if v['ok'] else '✗'}" for k, v in loads.items()))
    lines += [f"            ✗ {k}: {v['why']}" for k, v in loads.items() if not v["ok"]]
    if rep["extra"]:
        lines.append("extra       " + ", ".join(f"{k} {tuple(v)}" for k, v in rep["extra"].items()))
    if rep["problems"]:
        lines.append(f"problems    {len(rep['problems'])} (run `loratools validate`): {rep['problems'][0]['message']}")
    if modules and rep["module_list"]:
        rows = [[r["name"], r["kind"], "x".join(map(str, r["weight_shape"])), r["rank"], _fmt(r["alpha"]),
                 _fmt(r["scale"]), r["dtype"], r["parameters"], _fmt(r["delta_norm"])] for r in rep["module_list"]]
        lines += ["", table(rows, ["module", "kind", "weight", "rank", "alpha", "scale", "dtype", "params", "|ΔW|"])]
    return "\n".join(lines)


@click.command("inspect")
@click.argument("adapter", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A readable table or JSON (both on stdout).")
@click.option("--summary", is_flag=True, help="Leave out the per-module table.")
@click.option("--base", type=click.Path(), default=None,
              help="Diffusers pipeline (or component) folder to resolve kohya/LyCORIS module names and shapes with "
                   "(default: the shipped SD 1.x/2.x/SDXL name lists; unknown names are shown as they are).")
def command(adapter, fmt, summary, base):
    """Show what ADAPTER holds: format, detected model family (SD 1.x/2.x, SDXL, Flux …), kohya
    training metadata (network, dim/alpha, resolution, epochs/steps, dataset tags), base model,
    modules, ranks and alphas (and where they differ), scales, dtypes, parameters and bytes,
    target modules, and ‖ΔW‖ per module.

    Reads the adapter only; it never needs the base model (--base only names LyCORIS/kohya modules).

    \b
    Examples:
      loratools inspect my_lora.safetensors --summary
      loratools inspect someone/llama-lora --format json
      loratools inspect loha.safetensors --base sdxl_pipeline/
    """
    result = inspect(adapter, base=base)
    for f in result.warnings:
        click.echo(f"warning: {f.message}", err=True)
    rep = result.to_dict()
    if fmt == "json":
        if summary:
            rep.pop("module_list")
        emit_json(_json_safe(rep))
    else:
        click.echo(render(rep, modules=not summary))


command = batched(command)
