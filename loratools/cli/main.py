"""The `loratools` command: a click group, one module per command, known errors on one line."""
from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from ..errors import LoraToolsError

# command name -> module in loratools.cli that defines a click command called `command`
COMMANDS = {
    "merge": "merge",
    "blend": "blend",
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
@click.version_option(package_name="loratools")
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
        cli.main(args=argv, prog_name="loratools", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors: click's own one-line message
        e.show()
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
    except Exception as e:  # an unexpected failure still gets one line
        if _debug():
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"loratools: error: {e.__class__.__name__}: {msg} "
                   "(set LORATOOLS_DEBUG=1 for a traceback)", err=True)
        return 1


def run() -> None:
    sys.exit(main())
