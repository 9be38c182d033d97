"""The `loratools` command: a click group, one module per command, known errors on one line."""
from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from .. import __version__
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
    "ls": "ls", "compat": "compat",
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


def _debug() -> bool:
    return os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Entry point: runs the group and maps failures to a one-line message and an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up temporary outputs on SIGTERM too
    try:
        # not cli.main(): it turns KeyboardInterrupt into Abort after printing a blank line
        args = sys.argv[1:] if argv is None else list(argv)
        with cli.make_context("loratools", args) as ctx:
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
        click.echo(f"loratools: error: {' '.join(e.format_message().split())}{hint}", err=True)
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
        click.echo(f"loratools: error: {e}", err=True)
        return e.exit_code
    except OSError as e:  # disk full, permission denied …: which file and why, on one line
        if _debug():
            raise
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or (str(e).splitlines() or [e.__class__.__name__])[0]
        click.echo(f"loratools: error: {where}{why}", err=True)
        return 1
    except Exception as e:  # an unexpected failure still gets one line
        if _debug():
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"loratools: error: {e.__class__.__name__}: {msg} "
                   "(set LORATOOLS_DEBUG=1 for a traceback)", err=True)
        return 1


def run() -> None:
    sys.exit(main())
