"""Outputs appear complete or not at all: write to a temporary sibling, rename into place."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from .errors import LoraToolsError, OutputExistsError

_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # the output's file system said no


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def clean_stale(path: str) -> None:
    """Remove what a killed run (SIGKILL, power loss) left beside `path`: temporaries are named
    `.NAME.tmp-PID-*` / `.NAME.old-PID-*`, and only those of processes that no longer exist are
    touched (a concurrent run's are left alone). An `.old` copy whose target is missing was the
    previous output, moved aside just before the kill: it is put back. Same-host runs only."""
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in sorted(entries):
        for kind in ("tmp", "old"):
            prefix = f".{name}.{kind}-"
            pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
            if not pid.isdigit() or _alive(int(pid)):
                continue
            stale = os.path.join(parent, entry)
            try:
                if kind == "old" and not os.path.lexists(path):
                    os.rename(stale, path)
                else:
                    _remove(stale)
            except OSError:
                pass


@contextmanager
def atomic_output(path: str, overwrite: bool = False, directory: bool = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any error
    (or interrupt) remove it. An existing `path` is replaced only after the new one is complete."""
    path = os.path.abspath(os.fspath(path))
    clean_stale(path)
    path = check_output(path, overwrite)
    parent, name = os.path.split(path)
    prefix = f".{name}.tmp-{os.getpid()}-"
    try:
        os.makedirs(parent, exist_ok=True)
        if directory:
            tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)
    except OSError as e:
        raise LoraToolsError(f"cannot write to {parent}: {e.strerror}") from None
    old = None
    try:
        yield tmp
        if directory:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        else:
            os.chmod(tmp, 0o644)
        if os.path.lexists(path):
            old = tempfile.mktemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if old is not None and os.path.lexists(old) and not os.path.lexists(path):
            os.rename(old, path)  # the new output failed after the old one was moved aside
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            raise LoraToolsError(f"cannot write {path}: {e.strerror}; nothing was written") from None
        raise
    if old is not None:
        _remove(old)
