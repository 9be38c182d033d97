"""Regular expressions that users write (PEFT's rank_pattern / alpha_pattern / target_modules,
--include / --exclude), matched in bounded time.

They go through the `regex` package, whose default (VERSION0) syntax and semantics are those of
`re`, with a timeout per match: a pattern with catastrophic backtracking (`(a|aa)+$`) is refused
in one line instead of running for hours on a long module name.
"""
from __future__ import annotations

import functools
from typing import Optional, Type

import regex

from .errors import FormatError, LoraToolsError

TIMEOUT_S = 0.25  # real patterns match a module name in microseconds


class UserPattern:
    """One compiled user pattern; `what` names where it came from, for messages."""

    def __init__(self, pattern: str, what: str, error: Type[LoraToolsError] = FormatError, peft_key: bool = False):
        self.pattern, self.what, self.error = pattern, what, error
        source = rf"(.*\.)?({pattern})$" if peft_key else pattern  # PEFT's get_pattern_key rule
        try:
            self._re = regex.compile(source)
        except (regex.error, RecursionError, OverflowError, ValueError) as e:
            raise error(f"{what}: invalid regular expression {pattern!r} ({str(e).splitlines()[0]})") from None

    def _run(self, method: str, text: str):
        try:
            return getattr(self._re, method)(text, timeout=TIMEOUT_S)
        except TimeoutError:
            raise self.error(f"{self.what}: {self.pattern!r} takes too long to match {text[:80]!r} (catastrophic "
                             "backtracking); simplify the pattern") from None

    def match(self, text: str):
        return self._run("match", text)

    def fullmatch(self, text: str):
        return self._run("fullmatch", text)

    def search(self, text: str):
        return self._run("search", text)


@functools.lru_cache(maxsize=4096)
def peft_key(pattern: str, what: str = "rank_pattern/alpha_pattern") -> UserPattern:
    """A rank_pattern / alpha_pattern key: matches a module whose name ends with it (`(.*\\.)?(key)$`)."""
    return UserPattern(pattern, what, peft_key=True)


def key_matches(pattern: str, name: str, what: Optional[str] = None) -> bool:
    return peft_key(pattern, what or "rank_pattern/alpha_pattern").match(name) is not None
