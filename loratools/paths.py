"""Which paths a command may write, decided by file identity (device + inode), never by strings.

Every input a command resolves (`hub.existing_path`) is noted in the current command scope;
`check_output` refuses an output that is, contains or lies inside any of them, or that is or
contains the current directory, the home directory or `/` — with --overwrite too. It also
refuses to replace anything that is not a regular file or a model/adapter folder (device nodes,
FIFOs, sockets, symbolic links, unrelated folders). `open_input` opens an input file without
ever blocking on a FIFO or device node.
"""
from __future__ import annotations

import contextvars
import errno
import fnmatch
import functools
import os
import stat
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

from .errors import FormatError, OutputExistsError, UsageError

Ident = Tuple[int, int]
# what a folder that loratools may replace holds: a model, a pipeline or an adapter
_MODEL_FOLDER = ("adapter_config.json", "config.json", "model_index.json", "*.safetensors",
                 "*.safetensors.index.json", "adapter_model.bin", "loratools.json")

_inputs: contextvars.ContextVar[Optional[List[str]]] = contextvars.ContextVar("loratools_inputs", default=None)


@contextmanager
def command_scope() -> Iterator[List[str]]:
    """The inputs of one command; nested scopes (a CLI command calling the library) share the outer one."""
    current = _inputs.get()
    if current is not None:
        yield current
        return
    token = _inputs.set([])
    try:
        yield _inputs.get()
    finally:
        _inputs.reset(token)


def guarded(fn):
    """Run `fn` in a command scope, so the outputs it writes are checked against the inputs it reads."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with command_scope():
            return fn(*args, **kwargs)
    return wrapper


def note_input(path) -> None:
    """Record an input of the running command (no-op outside a command scope)."""
    scope = _inputs.get()
    if scope is not None:
        scope.append(os.path.abspath(os.fspath(path)))


def _ident(path: str) -> Optional[Ident]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _chain(path: str) -> List[Ident]:
    """Identities of `path` (symlinks resolved) and of every folder above it, that exist."""
    real = os.path.realpath(path)
    out = []
    while True:
        ident = _ident(real)
        if ident is not None:
            out.append(ident)
        parent = os.path.dirname(real)
        if parent == real:
            return out
        real = parent


def _protected() -> List[Tuple[str, str]]:
    places = [("/", "the root folder"), (os.path.expanduser("~"), "your home folder")]
    try:
        places.append((os.getcwd(), "the current folder"))
    except OSError:
        pass
    return places


def check_aliasing(path: str, inputs=None, protected: bool = True) -> None:
    """UsageError if `path` is, contains or lies inside an input, or (`protected`) is/contains cwd,
    home or /. A batch's output folder is only written into, never replaced: it passes False."""
    if inputs is None:
        inputs = _inputs.get() or []
    out_chain = _chain(path)
    out_id = _ident(os.path.realpath(path))
    for inp in dict.fromkeys(inputs):
        in_id = _ident(inp)
        if in_id is None:
            continue
        if out_id == in_id:
            raise UsageError(f"{path} is the input {inp} itself: write the output somewhere else")
        if out_id is not None and out_id in _chain(inp):
            raise UsageError(f"{path} contains the input {inp}: write the output somewhere else")
        if in_id in out_chain:
            raise UsageError(f"{path} lies inside the input {inp}: write the output somewhere else")
    for place, what in _protected() if protected else ():
        if out_id is not None and out_id in _chain(place):
            raise UsageError(f"{path} is or contains {what} ({place}): write the output somewhere else")


def _model_folder(path: str) -> bool:
    """Empty, or holds a model or adapter (itself or, for pipelines, in a subfolder such as unet/)."""
    try:
        return not os.listdir(path) or _holds_model(path, depth=1)
    except OSError:
        return False


def _holds_model(path: str, depth: int) -> bool:
    entries = os.listdir(path)
    if any(fnmatch.fnmatchcase(e, p) for e in entries for p in _MODEL_FOLDER):
        return True
    subs = [os.path.join(path, e) for e in entries]
    return depth > 0 and any(os.path.isdir(s) and not os.path.islink(s) and _holds_model(s, depth - 1) for s in subs)


def replaceable(path: str, directory: Optional[bool]) -> Optional[Ident]:
    """The identity of an existing `path` that --overwrite may replace (None if it does not exist);
    OutputExistsError for anything else. `directory`: the output is a folder (True), a file
    (False) or not known yet (None)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = st.st_mode
    why = None
    if stat.S_ISLNK(mode):
        why = "is a symbolic link"
    elif stat.S_ISREG(mode):
        if directory:
            why = "is a file and the output is a folder"
    elif stat.S_ISDIR(mode):
        if directory is False:
            why = "is a folder and the output is a file"
        elif not _model_folder(path):
            why = "is a folder that holds no model or adapter"
    else:
        why = "is not a regular file or folder (a device, FIFO or socket)"
    if why:
        raise OutputExistsError(f"{path} {why}; loratools replaces only regular files and model or adapter "
                                "folders: choose another output")
    return st.st_dev, st.st_ino


def check_output(path, overwrite: bool, directory: Optional[bool] = None) -> str:
    """Refuse an output that aliases an input or a protected folder, that exists without
    --overwrite, or that --overwrite must not replace; return the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if "\0" in path:
        raise UsageError("the output path contains a NUL character")
    check_aliasing(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists: pass --overwrite to replace it")
    replaceable(path, directory)
    return path


def check_distinct(*paths) -> None:
    """Outputs of one command must not be, contain or lie inside each other (they need not exist
    yet, so this compares resolved paths)."""
    real = [os.path.realpath(os.fspath(p)) for p in paths if p is not None]
    for i, a in enumerate(real):
        for b in real[i + 1:]:
            if a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep):
                raise UsageError(f"two outputs of one command overlap ({a}, {b}): give distinct paths")


def open_input(path, mode: str = "rb", **kwargs):
    """open() for an input file that never hangs: opened non-blocking, refused unless a regular file."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{os.path.abspath(path)}: not a regular file (a device, FIFO or socket); "
                              "give a regular file")
        os.set_blocking(fd, True)
        return open(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def is_regular(path) -> bool:
    """True for a regular file (following symlinks), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
