"""`loratools pull REPO_ID [-o DIR]`"""
from __future__ import annotations

import os

import click

from .. import share
from ..dtypes import dtype_name
from .common import emit_json, format_option, overwrite_option, size, table


@click.command("pull")
@click.argument("repo_id")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Copy the adapter's files into this folder (default: leave them in the Hugging Face cache).")
@click.option("--revision", default=None, help="Branch, tag or commit (same as REPO_ID@REVISION).")
@click.option("--dry-run", is_flag=True, help="List the files REPO_ID resolves to and their sizes; download nothing.")
@overwrite_option
@format_option
@click.option("-q", "--quiet", is_flag=True, help="No file table and no summary line (the path is still printed).")
def command(repo_id, output, revision, dry_run, overwrite, fmt, quiet):
    """Download the LoRA adapter in REPO_ID (user/repo[@revision][/subfolder or /file.safetensors]),
    detect its format and say what it is. Only the adapter's files are fetched. Prints the local path.

    \b
    Examples:
      loratools pull someone/llama-lora
      loratools pull someone/llama-lora@v2 -o ./llama-lora
      loratools pull someone/sdxl-loras/style.safetensors -o ./style
      loratools pull someone/llama-lora --dry-run
    """
    if dry_run:
        return show_plan(share.plan_pull(repo_id, revision), output, fmt, quiet)
    got = share.pull(repo_id, output, overwrite, revision=revision)
    a = got.adapter
    ranks = sorted(set(a.ranks))
    dtype = dtype_name(a.dtype())
    files = {n: os.path.getsize(f) for n, f in got.files.items()}
    if fmt == "json":
        emit_json({"repo": repo_id, "revision": revision, "commit": got.commit, "format": a.format,
                   "modules": len(a), "ranks": ranks, "dtype": dtype, "base_model": a.base_model,
                   "extra_tensors": len(a.extra), "path": got.path, "files": files})
        return
    if not quiet:
        click.echo(table(list(files.items()), ["file", "bytes"]), err=True)
        click.echo(f"{repo_id}: {a.format} adapter, {len(a)} module(s), rank {a.rank_range}, {dtype}"
                   f"{', base ' + a.base_model if a.base_model else ''}; commit {got.commit}", err=True)
    click.echo(got.path)


def show_plan(plan: share.PullPlan, output, fmt: str, quiet: bool) -> None:
    """A dry run's report: the files the reference resolves to, their sizes, where they would go."""
    total = sum(plan.files.values())
    if fmt == "json":
        emit_json(dict(plan.to_dict(), output=output))
        return
    if not quiet:
        click.echo(table(list(plan.files.items()), ["file", "bytes"]), err=True)
    where = f"and copy them into {output}" if output else "into the Hugging Face cache"
    # pull reads the adapter once to detect its format: about its weights' size in memory
    click.echo(f"would download {len(plan.files)} file(s) ({size(total)}) of {plan.ref} at commit {plan.commit} "
               f"{where}; peak memory about {size(total)}; nothing downloaded (dry run)", err=True)
