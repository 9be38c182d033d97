"""Many inputs in one process: `batched(command)` turns a one-adapter command into one that also
takes several adapters, folders (searched recursively) and globs. One input keeps the command's
own behaviour; several run the command once per input (optionally in `--jobs` worker processes),
write one output per input into the OUTPUT folder, and end with one summary table. Each input that
fails is one line in it and exit status 1; the others are still done."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import inspect
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, List, Optional, Tuple

import click

from .. import paths
from ..collection import Entry, collection_inputs, one_line
from ..errors import LoraToolsError, UsageError
from .common import emit_json, progress_bar, table

SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OutName = Callable[[str, dict], str]  # (input path, the command's parameters) -> output name in the folder


class BatchFailed(LoraToolsError):
    """Some inputs of a batch failed (each is listed in the summary)."""


@dataclasses.dataclass
class Result:
    path: str
    output: Optional[str] = None
    error: Optional[str] = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


def stem(path: str) -> str:
    """`a/b/style.safetensors` -> `style`; `a/peft_adapter/` -> `peft_adapter`."""
    name = os.path.basename(os.path.normpath(path))
    for s in SUFFIXES:
        if name.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return name


def same_name(path: str, params: dict) -> str:
    """The input's own file or folder name: for commands that write the input's format back."""
    return os.path.basename(os.path.normpath(path))


def run_one(module: str, params: dict) -> Result:
    """Run `module`'s single-input command with `params`, its output captured (also in a worker)."""
    single = importlib.import_module(module).command.single
    out, err = io.StringIO(), io.StringIO()
    res = Result(params["_input"], params.get("_output"))
    args = {k: v for k, v in params.items() if not k.startswith("_")}
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            single(**args)
    except click.exceptions.Exit as e:
        if e.exit_code:
            res.error = f"exit status {e.exit_code}"
    except click.ClickException as e:
        res.error = " ".join(e.format_message().split())
    except Exception as e:  # noqa: BLE001 - one input's failure is one line; the others go on
        res.error = one_line(e, res.path)
    res.seconds = time.perf_counter() - start
    res.stdout, res.stderr = out.getvalue(), err.getvalue()
    return res


def _check_folder(folder: str, inputs: List[str]) -> None:
    """The OUTPUT folder of a batch must be a folder that is not, is not inside and does not hold
    any input (a folder named on the command line included): each run checks only its own input."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{folder}: with several inputs OUTPUT is a folder, and this is not one; "
                         "give a folder")
    paths.check_aliasing(os.path.abspath(folder), [os.path.abspath(p) for p in inputs], protected=False)


def _plan(entries: List[Entry], params: dict, input_name: str, output_name: Optional[str],
          out_name: Optional[OutName], args: Tuple[str, ...] = ()) -> Tuple[List[dict], List[Result]]:
    """Per-input parameters, and the inputs that failed before running (nothing found there)."""
    jobs, failed, seen = [], [], {}
    for e in entries:
        if e.error:
            failed.append(Result(e.path, error=e.error))
            continue
        p = dict(params, **{input_name: e.path, "_input": e.path})
        if output_name:
            out = os.path.join(params[output_name], out_name(e.path, params))
            if out in seen:
                raise UsageError(f"{seen[out]} and {e.path} would both be written to {out}; "
                                 "convert them in separate runs")
            seen[out] = e.path
            p[output_name] = p["_output"] = out
        jobs.append(p)
    if output_name:  # an output may not be any input: --overwrite would replace what is being read
        for p in jobs:
            for q in jobs:
                if os.path.exists(p["_output"]) and os.path.samefile(p["_output"], q["_input"]):
                    raise UsageError(f"{p['_output']}: is also an input; write the outputs to another folder")
        _check_folder(params[output_name], [*args, *(e.path for e in entries if not e.error)])
    return jobs, failed


def _execute(module: str, jobs: List[dict], workers: int) -> List[Result]:
    with progress_bar(len(jobs), "adapters", quiet=False, unit="adapter") as bar:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for p in jobs:
                results.append(run_one(module, p))
                bar.update(1)
            return results
        # spawn: a fork of a process that has run torch's thread pools can hang
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            results = []
            for r in pool.map(run_one, [module] * len(jobs), jobs, chunksize=max(1, len(jobs) // (workers * 8))):
                results.append(r)
                bar.update(1)
            return results


def _report(results: List[Result], json_out: bool, prefix_lines: bool) -> None:
    if json_out:
        docs = []
        for r in results:
            try:
                doc = json.loads(r.stdout) if r.stdout.strip() else None
            except ValueError:
                doc = r.stdout
            docs.append({"input": r.path, "ok": r.error is None, "output": r.output, "error": r.error,
                         "report": doc})
        emit_json(docs)
    else:
        for r in results:
            text = r.stdout.rstrip("\n")
            if not text:
                continue
            if prefix_lines:
                click.echo("\n".join(f"{r.path}: {line}" for line in text.splitlines()))
            else:
                click.echo(f"==> {r.path} <==\n{text}\n")
    for r in results:
        for line in r.stderr.splitlines():
            if line.startswith("warning:"):
                click.echo(f"{r.path}: {line}", err=True)
    rows = [[r.path, "failed" if r.error else "ok", r.error or r.output or "", f"{r.seconds:.2f}"] for r in results]
    click.echo(table(rows, ["input", "result", "problem / output", "seconds"]), err=True)


def batched(cmd: click.Command, output_name: Optional[str] = None, out_name: Optional[OutName] = None,
            single_only: Tuple[str, ...] = (), prefix_lines: bool = False) -> click.Command:
    """`cmd` taking many inputs (see the module docstring). `output_name`: its output parameter,
    a folder with many inputs, where `out_name` names each input's output. `single_only`: options
    that make sense for one input only (refused with several when given)."""
    inp = next(p for p in cmd.params if isinstance(p, click.Argument))
    params = [click.Argument([inp.name], nargs=-1, required=True, type=inp.type) if p is inp else p
              for p in cmd.params]
    params.append(click.Option(["--jobs", "-j"], type=click.IntRange(min=1), default=1, show_default=True,
                               help="With several inputs: worker processes."))
    own_dry_run = any(p.name == "dry_run" for p in cmd.params)  # the single command's own --dry-run serves both
    if output_name and not own_dry_run:
        params.append(click.Option(["--dry-run"], is_flag=True,
                                   help="List what would be written (with several inputs, or one) and stop."))
    single = cmd.callback
    module = single.__module__

    def callback(**kw):
        inputs = kw.pop(inp.name)
        workers = kw.pop("jobs")
        dry_run = kw.get("dry_run", False) if own_dry_run else kw.pop("dry_run", False)
        entries = collection_inputs(inputs)
        if entries is None and (own_dry_run or not dry_run):  # one input: the command itself, dry run or not
            return single(**kw, **{inp.name: inputs[0]})
        entries = entries if entries is not None else [Entry(inputs[0])]
        if not entries:
            raise UsageError(f"no adapters found in {', '.join(inputs)}")
        given = [o for o in single_only if kw.get(o)]
        if given and len(entries) > 1:
            raise UsageError(f"--{given[0].replace('_', '-')} takes one input, not {len(entries)}")
        jobs, failed = _plan(entries, kw, inp.name, output_name, out_name, inputs)
        if dry_run:
            rows = [[p["_input"], p.get("_output", "")] for p in jobs] + [[r.path, "-"] for r in failed]
            click.echo(table(rows, ["input", "would write"]))
            click.echo(f"{len(jobs)} output(s) would be written; nothing was written", err=True)
            return
        if output_name and jobs:
            os.makedirs(kw[output_name], exist_ok=True)
        results = _execute(module, jobs, workers) + failed
        _report(results, kw.get("fmt") == "json", prefix_lines)
        bad = [r for r in results if r.error]
        if bad:
            raise BatchFailed(f"{len(bad)} of {len(results)} input(s) failed (listed above); the others are done")
        click.echo(f"{len(results)} input(s) done", err=True)

    many = ("\n\nSeveral ADAPTERs, folders (searched recursively) or globs: each is processed in this one "
            "process (or --jobs workers) and one summary table ends the run; exit 1 if any failed.")
    if output_name:
        many += " OUTPUT is then a folder, one output per input in it."
    text = inspect.cleandoc(cmd.help or "")
    cut = text.find("\n\n")  # after the first paragraph: the examples stay at the end of the help
    text = text + many if cut < 0 else text[:cut] + many + text[cut:]
    new = click.Command(cmd.name, params=params, callback=callback, help=text,
                        context_settings=cmd.context_settings, short_help=cmd.short_help, epilog=cmd.epilog)
    new.single = single
    return new
