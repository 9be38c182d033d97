"""Hugging Face Hub references: `user/repo`, `user/repo@revision`, `user/repo/subfolder`,
`user/repo@revision/subfolder/file.safetensors`, and the explicit `hf://…` form of each.

`existing_path(ref, fetch)` turns a reference into a local path: `fetch(HubRef)` downloads what the
caller needs with `snapshot` (allow patterns), `fetch_file` and `repo_files` into the normal Hugging
Face cache. This module knows no file names: formats pass the adapter patterns, model readers the
model patterns, so every command accepts Hub references and nothing here depends on them.

The settings huggingface_hub reads once at import (HF_ENDPOINT, HF_HOME / HF_HUB_CACHE,
HF_HUB_OFFLINE) are read here at call time and passed explicitly, so a process that changes its
environment later still gets what it asked for. HF_TOKEN is read by huggingface_hub per call.
Failures become one-line `HubError`s; the token never appears in a message.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import quote, unquote

from . import paths
from .errors import HubError, InputNotFoundError, LoraToolsError, UsageError

PREFIX = "hf://"
# files a reference may name directly instead of a folder
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")

_NAME = r"[A-Za-z0-9][\w.-]*"
_REF = re.compile(rf"(?P<repo>{_NAME}/{_NAME})"
                  r"(?:@(?P<rev>refs/pr/\d+|refs/convert/[\w.-]+|[^/@]+))?"
                  r"(?:/(?P<sub>[^@]*[^@/]))?/?"
                  r"(?:@(?P<rev2>[^/@]+))?")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: Optional[str] = None
    subfolder: str = ""

    def __post_init__(self):
        # huggingface_hub joins both into cache paths (refs/<revision>, snapshots/<commit>/<subfolder>)
        if self.revision is not None:
            check_revision(self.repo_id, self.revision)
        if self.subfolder:
            _check_part(self.subfolder, "subfolder", self.repo_id)

    @property
    def is_file(self) -> bool:
        return self.subfolder.lower().endswith(FILE_SUFFIXES)

    def __str__(self) -> str:
        rev = self.revision or ""
        if "/" in rev and not re.fullmatch(r"refs/(pr/\d+|convert/[\w.-]+)", rev):
            rev = quote(rev, safe="")
        rev = f"@{rev}" if rev else ""
        return f"{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


def _check_part(value: str, what: str, repo_id: str, extra: str = "") -> None:
    """UsageError for a revision or subfolder that could name a path outside the repository (a `..`
    or empty segment, a leading or trailing `/`, a backslash) or holds control characters."""
    bad = (not value or len(value) > 1000 or value.startswith("/") or value.endswith("/")
           or any(seg in ("", ".", "..") for seg in value.split("/"))
           or any(c in value for c in "\\" + extra) or any(ord(c) < 32 or ord(c) == 127 for c in value))
    if bad:
        raise UsageError(f"{repo_id}: invalid {what} {value!r} (no '..' or empty parts, no leading or trailing '/', "
                         "no control characters)")


def check_revision(repo_id: str, revision: str) -> None:
    """UsageError for a revision that could name a path outside the repository, or no git ref (see _check_part)."""
    _check_part(revision, "revision", repo_id, extra="~^:?*[")


def parse_ref(ref: str) -> Optional[HubRef]:
    """The Hub reference `ref` names, or None if it is not one. A bare `a/b` only counts when no
    local file or folder of that name exists and it does not look like a local path."""
    ref = os.fspath(ref)
    explicit = ref.startswith(PREFIX)
    body = ref[len(PREFIX):] if explicit else ref
    if not explicit:
        first = body.split("/")[0]
        if (os.path.exists(body) or body.startswith(("/", ".", "~")) or "\\" in body
                or os.path.isdir(first)):
            return None
    m = _REF.fullmatch(body)
    if m is None or (m["rev"] and m["rev2"]) or ".." in m["repo"] or "--" in m["repo"] or len(m["repo"]) > 96:
        if explicit:
            raise UsageError(f"{ref}: not a Hub reference (use hf://user/repo[@revision][/subfolder])")
        return None
    sub = m["sub"] or ""
    rev = m["rev"] or m["rev2"]
    return HubRef(m["repo"], unquote(rev) if rev else None, sub)


def settings() -> Tuple[Optional[str], Optional[str], bool]:
    """(endpoint, cache_dir, offline) from the environment as it is now; None means the library default."""
    env = os.environ
    endpoint = (env.get("HF_ENDPOINT") or "").rstrip("/") or None
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache and env.get("HF_HOME"):
        cache = os.path.join(env["HF_HOME"], "hub")
    flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")
    if flag is None:
        from huggingface_hub import constants
        offline = bool(constants.HF_HUB_OFFLINE)
    else:
        offline = flag.upper() in ("1", "ON", "YES", "TRUE")
    return endpoint, (os.path.expanduser(os.path.expandvars(cache)) if cache else None), offline


def endpoint_url() -> str:
    from huggingface_hub import constants
    return settings()[0] or constants.ENDPOINT


def _cause_chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@contextmanager
def hub_errors(what: str, write: bool = False) -> Iterator[None]:
    """Map huggingface_hub / network failures to one-line HubErrors that say what to do."""
    from huggingface_hub import errors as E

    transport: tuple = (ConnectionError, TimeoutError)
    for name in ("httpx2", "httpx", "requests"):  # whichever HTTP client this huggingface_hub has loaded
        mod = sys.modules.get(name)
        err = getattr(mod, "TransportError", None) or getattr(getattr(mod, "exceptions", None), "ConnectionError", None)
        transport += (err,) if isinstance(err, type) else ()

    try:
        yield
    except LoraToolsError:
        raise
    except E.HFValidationError as e:
        raise UsageError(f"{what}: invalid repository name ({str(e).splitlines()[0]})") from None
    except Exception as exc:  # find the error that explains it (snapshot_download wraps the HTTP error)
        host = endpoint_url()
        token_set = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        for e in _cause_chain(exc):
            if isinstance(e, E.GatedRepoError):
                raise HubError(f"{what}: the repository is gated; accept its conditions on {host} and set HF_TOKEN "
                               "to a token of that account") from None
            if isinstance(e, E.RepositoryNotFoundError):
                hint = "a token that can read it" if token_set else "HF_TOKEN if it is private"
                raise HubError(f"{what}: repository not found on {host} (check the name; set {hint})") from None
            if isinstance(e, E.RevisionNotFoundError):
                raise HubError(f"{what}: revision not found (check the branch, tag or commit)") from None
            if isinstance(e, E.RemoteEntryNotFoundError):
                raise HubError(f"{what}: no such file or folder in the repository") from None
            if isinstance(e, E.OfflineModeIsEnabled) or (isinstance(e, E.LocalEntryNotFoundError) and settings()[2]):
                raise HubError(f"{what}: HF_HUB_OFFLINE is set and it is not in the cache "
                               f"({settings()[1] or 'default cache'}); "
                               "run once online or unset HF_HUB_OFFLINE") from None
            if isinstance(e, E.HfHubHTTPError) and e.response is not None:
                status = e.response.status_code
                if status == 401:
                    raise HubError(f"{what}: {host} rejected the credentials (401); set HF_TOKEN to a valid token"
                                   if token_set else f"{what}: authentication required (401); set HF_TOKEN") from None
                if status == 403:
                    need = "write access to that repository or namespace" if write else "read access to it"
                    raise HubError(f"{what}: permission denied (403); HF_TOKEN needs {need}") from None
                msg = _scrub(e.response.headers.get("X-Error-Message") or "")
                raise HubError(f"{what}: the Hub answered {status}{': ' + msg if msg else ''}") from None
            if isinstance(e, transport):
                raise HubError(f"{what}: cannot reach the Hub at {host} ({e.__class__.__name__}) and nothing usable "
                               "is cached; check the network or HF_ENDPOINT") from None
        if isinstance(exc, E.LocalEntryNotFoundError):
            raise HubError(f"{what}: not found on the Hub or in the cache") from None
        raise


def _scrub(text: str) -> str:
    """Never echo a token, whatever the server says."""
    text = text.splitlines()[0] if text else ""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            text = text.replace(os.environ[var], "***")
    return text[:200]


def snapshot(ref: HubRef, allow: Sequence[str], ignore: Sequence[str] = ()) -> str:
    """snapshot_download of the files matching `allow`; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    endpoint, cache_dir, offline = settings()
    # its "No files matched allow_patterns" warning is expected (we try several layouts) and would
    # be a second line on stderr
    quiet = logging.getLogger("huggingface_hub._snapshot_download")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with hub_errors(str(ref)):
            return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=list(allow),
                                     ignore_patterns=list(ignore) or None, endpoint=endpoint, cache_dir=cache_dir,
                                     local_files_only=offline, tqdm_class=_progress_class())
    finally:
        quiet.setLevel(level)


def _progress_class():
    """Download progress on stderr only when it is a terminal (logs and pipes stay clean)."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True if kwargs.get("disable") is True else None
            super().__init__(*args, **kwargs)

    return Bar


def repo_files(ref: HubRef, snap: str) -> List[str]:
    """The repository's file list at the snapshot's commit, from the tree listing snapshot_download cached."""
    commit = os.path.basename(snap)
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:  # huggingface_hub < 2: ask the Hub
        with hub_errors(str(ref)):
            from huggingface_hub import HfApi
            return HfApi(endpoint=settings()[0]).list_repo_files(ref.repo_id, revision=commit)
    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, revision=commit, cache_dir=settings()[1])]
    except Exception:  # CachedRepoTreeNotFoundError: no listing was cached (e.g. an old cache)
        return []


def repo_tree(ref: HubRef) -> Tuple[str, Dict[str, int]]:
    """(commit, {path: size}) of every file at the reference's revision, from the Hub's listing:
    nothing is downloaded and nothing is written to the cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    endpoint, _, offline = settings()
    if offline:
        raise HubError(f"{ref}: listing the repository needs the Hub; unset HF_HUB_OFFLINE")
    hf = HfApi(endpoint=endpoint)
    with hub_errors(str(ref)):
        commit = hf.model_info(ref.repo_id, revision=ref.revision).sha
        tree = hf.list_repo_tree(ref.repo_id, revision=commit, recursive=True)
        return commit, {f.path: f.size for f in tree if isinstance(f, RepoFile)}


def fetch_file(ref: HubRef, path_in_repo: str) -> str:
    local = os.path.join(snapshot(ref, [path_in_repo]), *path_in_repo.split("/"))
    if not os.path.isfile(local):
        raise HubError(f"{ref}: no file {path_in_repo} in the repository")
    return local


Fetch = Callable[[HubRef], str]  # downloads what one kind of input needs; returns the local folder or file


def local_path(ref, fetch: Fetch) -> str:
    """A local path for `ref`: itself when it is local (or not a Hub reference), else what
    `fetch` downloaded (a reference to a file is fetched as that one file)."""
    path = os.fspath(ref)
    parsed = parse_ref(path)
    if parsed is None:
        return path
    try:
        if parsed.is_file:
            return fetch_file(parsed, parsed.subfolder)
        return fetch(parsed)
    except HubError as e:
        if path.startswith(PREFIX) or "repository not found" not in str(e):
            raise
        raise HubError(f"{e}; no local file or folder {path!r} either") from None


def existing_path(ref, fetch: Fetch) -> str:
    """The local path `ref` names: itself when it exists, else the Hub download it refers to
    (user/repo[@rev][/sub], hf://…). Every command resolves its inputs through this one function."""
    path = os.fspath(ref)
    if not os.path.exists(path):
        path = local_path(path, fetch)
    if not os.path.exists(path):
        raise InputNotFoundError(f"{os.path.abspath(path)}: no such file or folder")
    paths.note_input(path)  # outputs are checked against it (paths.check_output)
    return path


def commit_of(path: str) -> Optional[str]:
    """The commit hash of a path inside the Hugging Face cache (snapshots/<commit>/…), else None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(len(parts) - 1):
        if parts[i] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return None


def hub_id(name: Optional[str]) -> Optional[str]:
    """`name` if it is a Hub repository id (for a model card's base_model), else None."""
    if not name or os.path.exists(name):
        return None
    try:
        ref = parse_ref(name)
    except LoraToolsError:
        return None
    return ref.repo_id if ref is not None and not ref.subfolder else None


def check_repo_id(repo_id: str) -> str:
    """A repository id to push to: `name` or `namespace/name`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = repo_id[len(PREFIX):] if repo_id.startswith(PREFIX) else repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{repo_id!r} is not a repository id (use namespace/name): {str(e).splitlines()[0]}") from None
    return repo_id
