"""Outputs appear complete or not at all: write to a temporary sibling, rename into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from .errors import LoraToolsError, OutputExistsError


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def check_output(path: str, overwrite: bool) -> str:
    """Refuse an existing output without --overwrite; return the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists: pass --overwrite to replace it")
    return path


@contextmanager
def atomic_output(path: str, overwrite: bool = False, directory: bool = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any error
    (or interrupt) remove it. An existing `path` is replaced only after the new one is complete."""
    path = check_output(path, overwrite)
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        if directory:
            tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
            os.close(fd)
    except OSError as e:
        raise LoraToolsError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        yield tmp
        if directory:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        else:
            os.chmod(tmp, 0o644)
        if os.path.lexists(path):
            old = tempfile.mktemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
