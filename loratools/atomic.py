"""Outputs appear complete or not at all: write to a temporary sibling, rename into place."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

from . import paths, renames
from .errors import LoraToolsError, OutputExistsError
from .paths import check_output  # commands import it from here too

_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # the output's file system said no


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


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
    (or interrupt) remove it. See `atomic_outputs`."""
    with atomic_outputs([(path, directory)], overwrite) as tmps:
        yield tmps[0]


@contextmanager
def atomic_outputs(targets: Sequence[Tuple[str, bool]], overwrite: bool = False) -> Iterator[List[str]]:
    """Temporary paths for several outputs `(path, is_folder)` of one command, all renamed into place
    at the end, or none (a failure part-way puts back what was already replaced). Without
    --overwrite a rename never replaces anything (an output that appeared meanwhile, e.g. a
    concurrent run's, survives and this run fails); with it, only the file or folder checked at the
    start is replaced, and only after every new output is complete."""
    plan = []
    for path, directory in targets:
        path = os.path.abspath(os.fspath(path))
        clean_stale(path)
        path = check_output(path, overwrite, directory)
        plan.append((path, directory, paths.replaceable(path, directory) if overwrite else None))
    paths.check_distinct(*(p for p, _, _ in plan))
    tmps: List[str] = []
    placed: List[Tuple[str, Optional[str]]] = []  # (path, where its previous content is now)
    try:
        for path, directory, _ in plan:
            tmps.append(_make_tmp(path, directory))
        yield list(tmps)
        for tmp, (path, directory, _) in zip(tmps, plan):
            os.chmod(tmp, 0o755 if directory else 0o644)  # mkdtemp/mkstemp make it private
            paths.check_aliasing(path)  # inputs resolved while writing count too
        for tmp, (path, _, replacing) in zip(tmps, plan):
            placed.append((path, _place(tmp, path, replacing)))
    except BaseException as e:
        for path, old in reversed(placed):  # put back what the outputs placed so far replaced
            _unplace(path, old)
        for tmp in tmps:
            _remove(tmp)
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            where = " and ".join(p for p, _, _ in plan)
            raise LoraToolsError(f"cannot write {where}: {e.strerror}; nothing was written") from None
        raise
    for _, old in placed:
        if old is not None:
            _remove(old)


def _make_tmp(path: str, directory: bool) -> str:
    parent, name = os.path.split(path)
    prefix = f".{name}.tmp-{os.getpid()}-"
    try:
        os.makedirs(parent, exist_ok=True)
        if directory:
            return tempfile.mkdtemp(prefix=prefix, dir=parent)
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        return tmp
    except OSError as e:
        raise LoraToolsError(f"cannot write to {parent}: {e.strerror}") from None


def _ident(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _place(tmp: str, path: str, replacing: Optional[Tuple[int, int]]) -> Optional[str]:
    """Move `tmp` to `path`; return where the replaced output now is (None if nothing was replaced).
    `replacing`: the identity of the existing output --overwrite may replace (None: nothing).
    Anything else found at `path` now is left alone and this fails."""
    current = _ident(path)
    if current is None:
        if not renames.rename_noreplace(tmp, path):
            raise OutputExistsError(f"{path} appeared while loratools was writing it (another run?); it was "
                                    "left alone and nothing was written")
        return None
    if current != replacing:
        what = "appeared" if replacing is None else "was replaced"
        raise OutputExistsError(f"{path} {what} while loratools was writing it (another run?); it was left "
                                "alone and nothing was written")
    if renames.exchange(tmp, path):  # one atomic swap: tmp now holds the old output
        return tmp
    old = tempfile.mktemp(prefix=f".{os.path.basename(path)}.old-{os.getpid()}-", dir=os.path.dirname(path))
    os.rename(path, old)
    try:
        if not renames.rename_noreplace(tmp, path):
            raise OutputExistsError(f"{path} appeared while loratools was replacing it; nothing was written")
    except BaseException:
        if not os.path.lexists(path):
            os.rename(old, path)  # the new output failed after the old one was moved aside
        raise
    return old


def _unplace(path: str, old: Optional[str]) -> None:
    """Undo `_place`: remove the new output, put the previous one (if any) back."""
    if old is None:
        _remove(path)
    elif not renames.exchange(old, path):
        _remove(path)
        os.rename(old, path)
