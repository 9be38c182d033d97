"""One hierarchy of known errors. The CLI prints their message on one line and exits non-zero.

Each also subclasses the matching builtin so library users can catch what they expect.
"""


class LoraToolsError(Exception):
    """Base of every error loratools raises on purpose. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(LoraToolsError, ValueError):
    """The command was called wrongly (bad option values, conflicting flags)."""

    exit_code = 2


class InputNotFoundError(LoraToolsError, FileNotFoundError):
    """A path or repository that was named does not exist."""


class FormatError(LoraToolsError, ValueError):
    """A file is malformed or not in a format loratools understands."""


class ShapeMismatchError(LoraToolsError, ValueError):
    """Tensors that must fit together do not (adapter vs base, A vs B)."""


class IncompatibleError(LoraToolsError, ValueError):
    """Inputs are valid alone but cannot be combined (e.g. an adapter for another model)."""


class OutputExistsError(LoraToolsError, FileExistsError):
    """The output path exists and --overwrite was not given."""


class NonFiniteError(LoraToolsError, ArithmeticError):
    """A result contains NaN or Inf; nothing was written."""

    @classmethod
    def merged(cls, name: str, dtype) -> "NonFiniteError":
        beyond = " (or values beyond its range)" if getattr(dtype, "itemsize", 4) == 1 else ""  # fp8 clips
        return cls(f"merging into {name} produced NaN or Inf{beyond} in {dtype}; nothing was written "
                   "(check the adapter and the weights)")


class HubError(LoraToolsError, OSError):
    """The Hugging Face Hub refused or could not be reached."""
