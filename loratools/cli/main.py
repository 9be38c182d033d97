"""The `loratools` command: a click group, one module per command, known errors on one line."""
from __future__ import annotations

import importlib
import os
import re
import signal
import sys

import click

from .. import __version__
from .. import paths
from ..errors import LoraToolsError

# command name -> module in loratools.cli that defines a click command called `command`
COMMANDS = {
    "merge": "merge",
    "blend": "blend",
    "convert": "convert",
    "inspect": "inspect",
    "validate": "validate",
    "pull": "pull",
    "push": "push",
    "resize": "resize", "extract": "extract",
}


class LazyGroup(click.Group):
    """Imports a command's module only when it runs, so `loratools --help` stays fast."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"loratools.cli.{COMMANDS[name]}").command


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
        if _debug():
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        _error(f"{e.__class__.__name__}: {msg} (set LORATOOLS_DEBUG=1 for a traceback)")
        return 1


def _error(message: str) -> None:
    """`loratools: error: …` on exactly one line: control characters (a path with a newline) escaped."""
    click.echo("loratools: error: " + _CONTROL.sub(lambda m: repr(m.group())[1:-1], message), err=True)


def run() -> None:
    sys.exit(main())
