"""The record every adapter format module fills in: what the registry, the CLI, the Hub resolver
and `push` know about a format, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from ..adapter import LoraAdapter


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[str], bool]
    read: Callable[..., LoraAdapter]
    write: Optional[Callable[..., None]]  # None: read only
    folder: bool  # written as a folder (else as one file)
    # the files it is made of, each as (preferred name, fallbacks …); the first group marks it.
    # Empty: any one .safetensors file.
    files: Tuple[Tuple[str, ...], ...] = ()
    suffix: str = ".safetensors"  # a file format's extension (Hub downloads look for it)
    subfolders: Tuple[str, ...] = ()  # it keeps its files in these subfolders (pipeline components)
    options: Tuple[str, ...] = ()  # reader options it takes: base, allow_unmatched, rank
    write_options: Tuple[str, ...] = ()  # writer options it takes: base (GGUF: the model's names and layout)

    @property
    def marker(self) -> Optional[str]:
        return self.files[0][0] if self.files else None
