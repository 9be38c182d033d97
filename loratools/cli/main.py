"""The `loratools` command: a click group, one module per command, known errors on one line."""
from __future__ import annotations

import gc
import importlib
import os
import re
import signal
import sys

import click
from click.shell_completion import CompletionItem, shell_complete

from .. import __version__
from .. import paths
from ..errors import LoraToolsError

# command name -> module in loratools.cli that defines a click command called `command`
COMMANDS = {
    "merge": "merge",
    "blend": "blend",
    "resize": "resize",
    "extract": "extract",
    "convert": "convert",
    "inspect": "inspect",
    "validate": "validate",
    "pull": "pull",
    "push": "push",
    "ls": "ls",
    "compat": "compat",
}
# one line per command, so `loratools --help` and completion list them without importing them (and torch)
SUMMARIES = {
    "merge": "Merge LoRA adapters into a base model, folder or SD checkpoint.",
    "blend": "Blend several adapters into one (cat, svd, linear, ties, dare …).",
    "resize": "Change an adapter's rank (fixed or dynamic), in the same format.",
    "extract": "Extract a LoRA from a fine-tuned model and its base.",
    "convert": "Convert an adapter between PEFT, kohya, diffusers and LyCORIS.",
    "inspect": "Show what an adapter holds: format, modules, ranks, alphas, sizes.",
    "validate": "Check an adapter (and its fit to a base) for errors.",
    "pull": "Download an adapter from the Hugging Face Hub.",
    "push": "Upload an adapter to the Hugging Face Hub with a model card.",
    "ls": "List the adapters in folders, globs or Hub references (headers only).",
    "compat": "Which adapters fit a base model (names and shapes, no tensor data).",
}
COMPLETE_VAR = "_LORATOOLS_COMPLETE"  # `_LORATOOLS_COMPLETE=bash_source loratools` prints the bash script


class LazyGroup(click.Group):
    """Imports a command's module only when it runs (or its own help or completion is asked for),
    so `loratools --help`, `--version` and command-name completion never import torch."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        command = importlib.import_module(f"loratools.cli.{COMMANDS[name]}").command
        # what the imports made (torch: ~10^5 objects) lives for the whole run: spare the collector a
        # full pass over it (0.05-0.1 s, e.g. in the middle of a merge)
        gc.freeze()
        command.short_help = command.short_help or SUMMARIES[name]
        return command

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUMMARIES[name]) for name in COMMANDS])

    def shell_complete(self, ctx, incomplete):
        names = [CompletionItem(name, help=SUMMARIES[name]) for name in COMMANDS if name.startswith(incomplete)]
        return names + click.Command.shell_complete(self, ctx, incomplete)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="loratools")
def cli():
    """Merge, blend, resize, extract, convert and inspect LoRA adapters."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _debug() -> bool:
    return os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Entry point: runs the group and maps failures to a one-line message and an exit code."""
    # clean up temporary outputs on SIGTERM too; the previous handler is back once the command is over,
    # so a SIGTERM during interpreter shutdown does not raise KeyboardInterrupt into its teardown
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv) -> int:
    try:
        # not cli.main(): it turns KeyboardInterrupt into Abort after printing a blank line
        args = sys.argv[1:] if argv is None else list(argv)
        instruction = os.environ.get(COMPLETE_VAR)
        if instruction:  # click's own completion hook, which cli.main() would run
            code = shell_complete(cli, {}, "loratools", COMPLETE_VAR, instruction)
            if code:
                click.echo(f"loratools: error: {COMPLETE_VAR}={instruction}: use bash_source, zsh_source or "
                           "fish_source", err=True)
            return code
        with cli.make_context("loratools", args) as ctx, paths.command_scope():
            cli.invoke(ctx)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # click's usage errors, on one line like ours (exit 2)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `loratools`: the help is the answer
            click.echo(e.format_message(), err=True)
            return e.exit_code
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if isinstance(e, click.UsageError) and ctx else ""
        _error(f"{' '.join(e.format_message().split())}{hint}")
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("loratools: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("loratools: interrupted; no output was written", err=True)
        return 130
    except LoraToolsError as e:
        if _debug():
            raise
        _error(str(e))
        return e.exit_code
    except OSError as e:  # disk full, permission denied …: which file and why, on one line
        if _debug():
            raise
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or (str(e).splitlines() or [e.__class__.__name__])[0]
        _error(f"{where}{why}")
        return 1
    except Exception as e:  # an unexpected failure still gets one line
        if _interrupted(e):  # Ctrl-C while a class is made (an import) comes wrapped in a RuntimeError
            click.echo("loratools: interrupted; no output was written", err=True)
            return 130
        if _debug():
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        _error(f"{e.__class__.__name__}: {msg} (set LORATOOLS_DEBUG=1 for a traceback)")
        return 1


def _interrupted(e: BaseException) -> bool:
    """Whether `e` was caused by a KeyboardInterrupt (Ctrl-C, or SIGTERM through _raise_interrupt)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _error(message: str) -> None:
    """`loratools: error: …` on exactly one line: control characters (a path with a newline) escaped."""
    click.echo("loratools: error: " + _CONTROL.sub(lambda m: repr(m.group())[1:-1], message), err=True)


def run() -> None:
    sys.exit(main())
