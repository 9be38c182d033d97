"""A small local stand-in for the Hugging Face Hub, for tests (no network, nothing downloaded).

It speaks the HTTP API that `huggingface_hub` (2.x) uses for these calls, and nothing else:

  POST /api/repos/create                              create_repo (an initial commit with .gitattributes)
  POST /api/validate-yaml                             create_commit's README.md metadata check
  GET  /api/models/{repo}[/revision/{rev}]            repo_info / model_info (sha, siblings)
  GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree (?recursive=true), one page
  POST /api/models/{repo}/preupload/{rev}             upload modes: "lfs" for weight files, "regular" else
  POST /api/models/{repo}/branch/{branch}             create_branch
  POST /api/models/{repo}/commit/{rev}[?create_pr=1]  ndjson commit: file / lfsFile / deletedFile / deletedFolder
  POST /{repo}.git/info/lfs/objects/batch             git-LFS batch API, "basic" transfer only
  HEAD/GET /{repo}/resolve/{rev}/{path}               regular file: 200 + ETag (git blob sha1);
                                                      LFS file: 302 to the "CDN" + X-Linked-Etag (sha256),
                                                      X-Linked-Size; always X-Repo-Commit
  PUT/HEAD/GET {cdn}/lfs/{sha256}                     the LFS object store, on a second port (another
                                                      origin, as a real CDN is: auth is not forwarded)

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)
or `X-Error-Message` headers, which is how `huggingface_hub` tells them apart.
Not implemented: Xet storage (clients must run with HF_HUB_DISABLE_XET=1, which the `fake_hub`
fixture sets), multipart LFS, organisations, pagination, datasets/spaces, deletions of repos.
Model repos only. Everything is kept in memory.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:  # git's oid: of the pointer file for LFS files
        return git_blob_oid(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)


@dataclass
class Repo:
    owner: str
    private: bool = False
    gated: bool = False
    granted: set = field(default_factory=set)  # users who accepted a gated repo's conditions
    refs: Dict[str, str] = field(default_factory=dict)  # branch (or refs/pr/N) -> commit oid
    commits: Dict[str, Dict[str, Entry]] = field(default_factory=dict)  # commit oid -> files
    prs: int = 0


class HubHTTPError(Exception):
    def __init__(self, status: int, code: Optional[str] = None, message: str = "", **body):
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body


class FakeHub:
    """Start with `start()`; `url` is the HF_ENDPOINT. `requests` logs (method, path) of every call."""

    def __init__(self):
        self.users: Dict[str, str] = {}  # token -> user name
        self.repos: Dict[str, Repo] = {}
        self.lfs_objects: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []
        self.fetched: List[str] = []
        self.lock = threading.RLock()
        self._servers: List[ThreadingHTTPServer] = []

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        for role in ("api", "cdn"):
            handler = type(f"{role}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # ---- seeding and inspection (for tests) -------------------------------------------------
    def add_user(self, name: str, token: str) -> None:
        self.users[token] = name

    def add_repo(self, repo_id: str, private: bool = False, gated: bool = False) -> Repo:
        with self.lock:
            repo = Repo(owner=repo_id.split("/")[0], private=private, gated=gated)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": Entry(GITATTRIBUTES, False)}, [])
            return repo

    def commit(self, repo_id: str, files: Dict[str, bytes], branch: str = "main") -> str:
        """Seed files directly (weight files as LFS, like the Hub). Returns the commit oid."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.add_repo(repo_id)
            if branch not in repo.refs:
                repo.refs[branch] = repo.refs["main"]
            entries = {p: Entry(d, _is_lfs(p, len(d))) for p, d in files.items()}
            self.lfs_objects.update({e.sha256: e.data for e in entries.values() if e.lfs})
            return self._commit(repo, branch, entries, [])

    def files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: e.data for p, e in repo.commits[self._resolve(repo, revision)].items()}

    def downloads(self) -> List[str]:
        """`repo_id/path` of every file whose content was sent (GET on /resolve, or on the LFS store)."""
        return list(self.fetched)

    # ---- internals ---------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, add: Dict[str, Entry], delete: List[str]) -> str:
        parent = repo.refs.get(branch)
        files = dict(repo.commits[parent]) if parent else {}
        for path in delete:
            files = {p: e for p, e in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(add)
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[oid] = files
        repo.refs[branch] = oid
        return oid

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _repo(self, repo_id: str, user: Optional[str], write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubHTTPError(401 if user is None else 404, "RepoNotFound", "Repository not found")
        if write and user is None:
            raise HubHTTPError(401, None, "You must be authenticated to write")
        if write and user != repo.owner:
            raise HubHTTPError(403, None, f"You don't have the rights to write to {repo_id}")
        return repo


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= 10 * 2**20


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    role: str

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # ---- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers=None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self) -> Optional[str]:
        auth = self.headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer "):
            return None
        user = self.hub.users.get(auth[7:].strip())
        if user is None:
            raise HubHTTPError(401, None, INVALID_TOKEN)
        return user

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.hub.requests.append((self.command, split.path))
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        try:
            with self.hub.lock:
                self._route(parts, query)
        except HubHTTPError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.code == "EntryNotFound" and getattr(e, "commit", None):
                headers["X-Repo-Commit"] = e.commit
            self._json(dict(e.body, error=e.message), e.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _route(self, p: List[str], q: Dict[str, str]) -> None:
        cmd = self.command
        if self.role == "cdn":
            if len(p) == 2 and p[0] == "lfs":
                return self._lfs_object(p[1], q.get("file"))
            raise HubHTTPError(404, None, "Not found")
        if p[:1] == ["api"]:
            if p[1:] == ["repos", "create"] and cmd == "POST":
                return self._create_repo()
            if p[1:] == ["validate-yaml"] and cmd == "POST":
                return self._validate_yaml()
            if len(p) >= 4 and p[1] == "models":
                repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
                if not rest and cmd == "GET":
                    return self._info(repo_id, "main")
                if len(rest) == 2 and rest[0] == "revision" and cmd == "GET":
                    return self._info(repo_id, rest[1])
                if len(rest) >= 2 and rest[0] == "tree" and cmd == "GET":
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), q.get("recursive", "").lower() == "true")
                if len(rest) == 2 and rest[0] == "preupload" and cmd == "POST":
                    return self._preupload(repo_id, rest[1])
                if len(rest) == 2 and rest[0] == "branch" and cmd == "POST":
                    return self._branch(repo_id, rest[1])
                if len(rest) == 2 and rest[0] == "commit" and cmd == "POST":
                    return self._commit(repo_id, rest[1], q.get("create_pr") == "1")
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"] and cmd == "POST":
            return self._lfs_batch(f"{p[0]}/{p[1][:-4]}")
        if len(p) >= 5 and p[2] == "resolve" and cmd in ("GET", "HEAD"):
            return self._resolve_file(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubHTTPError(404, None, f"no such route: {cmd} {self.path}")

    # ---- API ---------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, None, "You must be authenticated to create a repo")
        body = json.loads(self._body())
        if body.get("type", "model") != "model":
            raise HubHTTPError(400, None, "this fake Hub serves model repos only")
        namespace = body.get("organization") or user
        if namespace != user:
            raise HubHTTPError(403, None, f"You don't have the rights to create a model under the namespace {namespace}")
        repo_id = f"{namespace}/{body['name']}"
        if repo_id in self.hub.repos:
            raise HubHTTPError(409, None, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        self.hub.add_repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body()).get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
            ok = isinstance(meta, dict)
        except yaml.YAMLError:
            ok = False
        if not ok:
            return self._json({"errors": [{"message": "metadata is not a YAML mapping"}]}, 400)
        self._json({"errors": [], "warnings": []})

    def _info(self, repo_id: str, revision: str) -> None:
        repo = self.hub._repo(repo_id, self._user())
        sha = self.hub._resolve(repo, revision)
        files = repo.commits[sha]
        self._json({"id": repo_id, "author": repo.owner, "sha": sha, "private": repo.private,
                    "gated": "manual" if repo.gated else False, "disabled": False, "lastModified": _now(),
                    "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> None:
        repo = self.hub._repo(repo_id, self._user())
        files = repo.commits[self.hub._resolve(repo, revision)]
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        out, folders = [], set()
        for path in sorted(files):
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            for i in range(1, len(rel) if recursive else min(len(rel), 2)):
                folders.add(base + "/".join(rel[:i]))
            if recursive or len(rel) == 1:
                e = files[path]
                item = {"type": "file", "oid": e.oid, "size": len(e.data), "path": path}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": len(e.data),
                                   "pointerSize": len(lfs_pointer(e.sha256, len(e.data)))}
                out.append(item)
        if base and not out and not folders:
            raise HubHTTPError(404, "EntryNotFound", f"{prefix} does not exist")
        out += [{"type": "directory", "oid": git_blob_oid(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        self._json(out)

    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self.hub._repo(repo_id, self._user(), write=True)
        current = repo.commits.get(repo.refs.get(revision, ""), {})
        answer = []
        for f in json.loads(self._body())["files"]:
            lfs = _is_lfs(f["path"], int(f["size"]))
            old = current.get(f["path"])
            oid = None if old is None else (old.sha256 if old.lfs else old.oid)
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._json({"files": answer})

    def _branch(self, repo_id: str, branch: str) -> None:
        repo = self.hub._repo(repo_id, self._user(), write=True)
        if branch in repo.refs:
            raise HubHTTPError(409, None, "Reference already exists")
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        repo.refs[branch] = self.hub._resolve(repo, start)
        self._json({})

    def _commit(self, repo_id: str, revision: str, create_pr: bool) -> None:
        repo = self.hub._repo(repo_id, self._user(), write=True)
        if revision not in repo.refs:
            raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        add: Dict[str, Entry] = {}
        delete: List[str] = []
        for line in self._body().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                add[value["path"]] = Entry(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubHTTPError(422, None, f"LFS object {value['oid']} was not uploaded")
                add[value["path"]] = Entry(data, True)
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
        branch = revision
        pr_url = None
        if create_pr:
            repo.prs += 1
            branch = f"refs/pr/{repo.prs}"
            repo.refs[branch] = repo.refs[revision]
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
        oid = self.hub._commit(repo, branch, add, delete)
        self._json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                    "pullRequestUrl": pr_url, "success": True})

    def _lfs_batch(self, repo_id: str) -> None:
        self.hub._repo(repo_id, self._user(), write=True)
        body = json.loads(self._body())
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubHTTPError(400, None, "only uploads with the basic transfer are implemented")
        objects = []
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:  # already stored objects need no upload
                item["actions"] = {"upload": {"href": f"{self.hub.cdn_url}/lfs/{obj['oid']}"}}
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_object(self, oid: str, file: Optional[str]) -> None:
        if self.command == "PUT":
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                raise HubHTTPError(400, None, "sha256 mismatch")
            self.hub.lfs_objects[oid] = data
            return self._send(200, b"", {"ETag": f'"{oid}"'})
        data = self.hub.lfs_objects.get(oid)
        if data is None:
            raise HubHTTPError(404, None, "no such object")
        if self.command == "GET":
            self.hub.fetched.append(file or oid)
        self._send(200, data, {"ETag": f'"{oid}"'}, "application/octet-stream")

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        user = self._user()
        repo = self.hub._repo(repo_id, user)
        if repo.gated and user != repo.owner and user not in repo.granted:
            raise HubHTTPError(401 if user is None else 403, "GatedRepo", "Access to this model is restricted")
        sha = self.hub._resolve(repo, revision)
        entry = repo.commits[sha].get(path)
        if entry is None:
            err = HubHTTPError(404, "EntryNotFound", f"{path} does not exist at {revision}")
            err.commit = sha
            raise err
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.oid}"'}
        if entry.lfs:
            # like a signed CDN url: the object, plus which file it is (for `downloads()`)
            headers.update({"Location": f"{self.hub.cdn_url}/lfs/{entry.sha256}?file={quote(repo_id + '/' + path)}",
                            "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(len(entry.data))})
            return self._send(302, b"", headers)
        if self.command == "GET":
            self.hub.fetched.append(f"{repo_id}/{path}")
        self._send(200, entry.data, headers, "application/octet-stream")
