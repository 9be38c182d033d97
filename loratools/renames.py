"""Renames that never replace what they were not asked to: Linux renameat2(RENAME_NOREPLACE /
RENAME_EXCHANGE) through ctypes, else a link (files) or mkdir (folders) reservation."""
from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Optional

_AT_FDCWD = -100
_NOREPLACE, _EXCHANGE = 1, 2
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load()


def _call(src: str, dst: str, flags: int) -> Optional[int]:
    """0 on success, the errno on failure, None when renameat2 is not available for these paths."""
    if _renameat2 is None:
        return None
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return 0
    err = ctypes.get_errno()
    return None if err in _UNSUPPORTED else err


def rename_noreplace(src: str, dst: str) -> bool:
    """Rename `src` to `dst` unless `dst` exists (then False, nothing changed). Other errors raise."""
    err = _call(src, dst, _NOREPLACE)
    if err == 0:
        return True
    if err == errno.EEXIST:
        return False
    if err is not None:
        raise OSError(err, os.strerror(err), dst)
    if os.path.isdir(src) and not os.path.islink(src):
        try:
            os.mkdir(dst)  # reserve the name; rename may replace only this empty folder
        except FileExistsError:
            return False
        try:
            os.rename(src, dst)
        except OSError as e:  # someone filled the reserved folder meanwhile: it is theirs
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            os.rmdir(dst)
            raise
        return True
    try:
        os.link(src, dst)  # fails if dst exists
    except FileExistsError:
        return False
    os.unlink(src)
    return True


def exchange(a: str, b: str) -> bool:
    """Swap `a` and `b` atomically; False where the system cannot (the caller falls back)."""
    err = _call(a, b, _EXCHANGE)
    if err == 0:
        return True
    if err is not None and err != errno.ENOENT:
        raise OSError(err, os.strerror(err), b)
    return False
