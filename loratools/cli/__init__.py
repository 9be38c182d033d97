"""Command-line interface: `loratools.cli.main.cli` is the click group."""
