"""The one shape every operation's result has: `to_dict()` (what `--format json` prints) and a
one-line repr built from `summary()` (never whole tensors or per-module lists)."""
from __future__ import annotations


class Report:
    def summary(self) -> dict:
        """A few scalars that say what happened (counts, formats, the output path)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return self.summary()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.summary().items())
        return f"{type(self).__name__}({fields})"
