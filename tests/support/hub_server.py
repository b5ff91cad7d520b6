"""A local stand-in for the Hugging Face Hub, for the pull/push tests.
This module holds its state and the fixtures; tests/support/hub_routes.py speaks HTTP.

The unmodified `huggingface_hub` client talks to it over real HTTP, the way it talks to
huggingface.co. The routes, status codes, headers and JSON shapes are the ones the 2.4
client reads (hf_api.py, file_download.py, _commit_api.py, lfs.py, utils/_http.py):

  GET  /api/models/{repo}[/revision/{rev}]   model info: sha, private, gated, siblings
                                             (?blobs=true adds size, blobId, lfs)
  GET  /api/models/{repo}/tree/{rev}[/{dir}] tree listing; recursive; paginated by Link header
  HEAD/GET /{repo}/resolve/{rev}/{path}      regular file: 200 + ETag (git oid), X-Repo-Commit;
                                             LFS file: 302 to the storage host + X-Linked-Etag
                                             (sha256), X-Linked-Size, X-Repo-Commit
  POST /api/repos/create, /api/models/{repo}/branch/{name}, /api/validate-yaml
  POST /api/models/{repo}/preupload/{rev}    "regular" or "lfs" by .gitattributes, size, binary
  POST /{repo}.git/info/lfs/objects/batch    basic LFS transfer: signed PUT on the storage host,
                                             then POST .../objects/verify
  POST /api/models/{repo}/commit/{rev}       NDJSON: header, file (base64), lfsFile, deletedFile

Large-file storage answers on a second port: another origin, as the real CDN/S3 is, so the
client strips the Authorization header before going there (the tests check it does).
Errors carry the X-Error-Code the client maps: RepoNotFound (401 anonymous / 404 with a
token), GatedRepo (401 / 403, on file downloads only: listing a gated repo is public),
RevisionNotFound, EntryNotFound; a token the Hub does not know gets 401 "Invalid credentials
in Authorization header". Not implemented: Xet storage (tests set HF_HUB_DISABLE_XET, so the
client takes the classic LFS route the Hub still serves), PRs, tags, datasets and spaces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.hub_routes import BINARY_REGULAR_MAX, REGULAR_MAX, Handler

# What huggingface.co puts in a new model repo's first commit.
LFS_PATTERNS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
                "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
                "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
                "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    size: int
    sha256: str            # of the content; the LFS oid when `lfs`
    lfs: bool
    content_oid: str = ""  # git oid of the content (regular files)

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def oid(self) -> str:
        """The git object id: of the content, or of the LFS pointer file."""
        return git_oid(self.pointer) if self.lfs else self.content_oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    date: str


@dataclass
class Repo:
    id: str
    private: bool = False
    gated: str | bool = False             # False | "auto" | "manual"
    allowed: set[str] = field(default_factory=set)   # users who accepted a gated repo's terms
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created: str = "2024-01-01T00:00:00.000Z"


@dataclass
class Hit:
    method: str
    path: str          # decoded path, no query
    host: str          # "hub" | "storage"
    auth: str | None   # the Authorization header as received


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client hanging up (or stop() cutting it off) is normal here; anything else is a bug to see."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FakeHub:
    """The Hub's state (repos, users, stored objects) plus the two HTTP servers."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}           # token -> user name
        self.orgs: dict[str, set[str]] = {}        # org -> member user names
        self.hits: list[Hit] = []
        self.connections: set = set()             # open client sockets, closed by stop()
        self.cut: dict[str, int] = {}              # sha256 -> bytes sent before the serving host dies
        # (status, message): the Hub answers every request with this error; "{auth}" in the message
        # becomes the Authorization header received (a server that echoes credentials back)
        self.forced: tuple[int, str] | None = None
        self._secret = hashlib.sha256(str(time.time_ns()).encode()).digest()
        self._counter = itertools.count()
        self.servers = [_Server(("127.0.0.1", 0), Handler) for _ in range(2)]
        for server, role in zip(self.servers, ("hub", "storage")):
            server.hub, server.role, server.daemon_threads = self, role, True
        self.endpoint = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        self.storage = f"http://127.0.0.1:{self.servers[1].server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in self.servers]

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> FakeHub:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop answering, including on kept-alive connections: the host is gone."""
        for s in self.servers:
            s.shutdown()
            s.server_close()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- test set-up and inspection --------------------------------------------
    def add_user(self, token: str, name: str, orgs=()) -> None:
        self.tokens[token] = name
        for org in orgs:
            self.orgs.setdefault(org, set()).add(name)

    def seed(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", private: bool = False,
             gated: str | bool = False, message: str = "Upload files") -> str:
        """Create the repo if needed and commit `files` on `branch`; returns the commit sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create(repo_id, private=private)
            repo.gated = gated or repo.gated
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            return self.commit(repo, branch, {p: self.store(d, self.must_be_lfs(repo, branch, p, d))
                                               for p, d in files.items()}, set(), message)

    def head(self, repo_id: str, rev: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(rev, rev)]

    def content(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        return self.read(self.head(repo_id, rev).files[path])

    def record(self, method: str, path: str, host: str, auth: str | None) -> None:
        self.hits.append(Hit(method, path, host, auth))

    def served(self) -> list[str]:
        """Repo paths whose bytes were sent (resolve GETs of regular files, storage GETs of LFS ones)."""
        by_oid = {b.sha256: p for r in self.repos.values() for c in r.commits.values() for p, b in c.files.items()}
        out = []
        for h in self.hits:
            if h.method == "GET" and h.host == "hub" and "/resolve/" in h.path:
                out.append(h.path.split("/resolve/", 1)[1].split("/", 1)[1])
            elif h.method == "GET" and h.host == "storage":
                out.append(by_oid.get(h.path.rsplit("/", 1)[-1], h.path))
        return out

    # -- internals ------------------------------------------------------------------
    def create(self, repo_id: str, *, private: bool) -> Repo:
        repo = Repo(repo_id, private=private)
        self.repos[repo_id] = repo
        first = self.commit(repo, None, {".gitattributes": self.store(GITATTRIBUTES, False)}, set(),
                             "initial commit")
        repo.branches["main"] = first
        return repo

    def store(self, data: bytes, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / "objects" / sha
        if not path.exists():
            path.write_bytes(data)
        return Blob(len(data), sha, lfs, git_oid(data))

    def lfs_blob(self, sha256: str) -> Blob:
        return Blob((self.root / "objects" / sha256).stat().st_size, sha256, True)

    def read(self, blob: Blob) -> bytes:
        return (self.root / "objects" / blob.sha256).read_bytes()

    def commit(self, repo: Repo, branch: str | None, add: dict[str, Blob], delete: set[str], title: str) -> str:
        parent = repo.branches.get(branch) if branch else None
        files = dict(repo.commits[parent].files) if parent else {}
        for p in delete:
            files = {k: v for k, v in files.items() if k != p and not k.startswith(p.rstrip("/") + "/")}
        files.update(add)
        tree = "".join(f"{p}\0{b.oid}\n" for p, b in sorted(files.items()))
        # surrogatepass: a hostile repo's file names may hold lone surrogates (JSON "\udcff" in a listing)
        text = f"{parent}\n{tree}\n{title}\n{next(self._counter)}"
        sha = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[sha] = Commit(sha, parent, files, title, date)
        if branch:
            repo.branches[branch] = sha
        return sha

    def lfs_patterns(self, repo: Repo, branch: str) -> list[str]:
        head = repo.commits.get(repo.branches.get(branch, ""))
        attrs = head and head.files.get(".gitattributes")
        text = self.read(attrs).decode("utf-8", "replace") if attrs else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def must_be_lfs(self, repo: Repo, branch: str, path: str, sample: bytes, size: int | None = None) -> bool:
        """The preupload decision: .gitattributes says so, or too big / binary for a git blob."""
        size = len(sample) if size is None else size
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in self.lfs_patterns(repo, branch)):
            return True
        return size > REGULAR_MAX or (size > BINARY_REGULAR_MAX and b"\0" in sample[:512])

    def sign(self, what: str, oid: str) -> str:
        return hmac.new(self._secret, f"{what}:{oid}".encode(), "sha256").hexdigest()


# -- pointing the real client at it -------------------------------------------------------

FAKE_TOKEN = "hf_FAKEtokenABCDEF123456"   # recognisable: the tests grep every output for it


def client_env(endpoint: str | None, hf_home: Path, *, offline: bool = False, token: str | None = None) -> dict:
    """The environment a user would set to point huggingface_hub here (read by subprocesses too)."""
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1" if offline else "0",
           # The double speaks classic LFS, not Xet (a separate storage protocol): tell the client,
           # as a user without hf_xet would have it.
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5"}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    return env


def use_client_env(monkeypatch, env: dict) -> None:
    """Apply `env` to this process: os.environ, plus the constants huggingface_hub read at import.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME... once, into module constants,
    when first imported (possibly by another test). Re-evaluating constants.py under the new
    environment gives exactly what a fresh process would see; the differences are patched in
    (and undone by monkeypatch after the test).
    """
    import os
    import runpy

    from huggingface_hub import constants

    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_TOKEN_PATH", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fresh = runpy.run_path(constants.__file__)
    for key, value in fresh.items():
        if key.isupper() and not key.startswith("_") and getattr(constants, key, object()) != value:
            monkeypatch.setattr(constants, key, value)
    assert os.environ.get("HF_ENDPOINT", constants.ENDPOINT) == constants.ENDPOINT


# -- repo contents -----------------------------------------------------------------------

def concept_repo(token: str = "<cat-toy>", seed: int = 0, key: str = "<cat_toy_v0>"):
    """An sd-concepts-library repo: 1-D vector under a stale key; the identifier file has the token."""
    from tests.support.helpers import random_embedding
    from textinv_cli.formats.pickle_writer import dump_torch_pickle

    emb = random_embedding(token, n=1, seed=seed)
    files = {"learned_embeds.bin": dump_torch_pickle({key: emb.vectors["clip_l"][0]}),
             "token_identifier.txt": token.encode(), "type_of_concept.txt": b"object\n",
             "README.md": b"---\nlicense: mit\n---\n# cat toy\n", "concept_images/0.jpeg": b"\xff\xd8\xff fake jpeg"}
    return emb, files


# -- fixtures (import them into a test module to use them) --------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running FakeHub with user "me" (token FAKE_TOKEN, member of "my-org"); the client points at it."""
    from huggingface_hub import close_session

    fake = FakeHub(tmp_path / "hub-data").start()
    fake.add_user(FAKE_TOKEN, "me", orgs=["my-org"])
    fake.hf_home = tmp_path / "hf-home"
    use_client_env(monkeypatch, client_env(fake.endpoint, fake.hf_home, token=FAKE_TOKEN))
    yield fake
    close_session()  # no pooled connection to this server outlives it
    fake.stop()


@pytest.fixture
def hubcli(cli, caplog):
    """cli(...) that also proves the access token never shows: not on stdout, stderr, nor in any log."""
    import logging

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its own level would filter debug records

    def invoke(*args: str):
        r = cli(*args)
        for text in (r.output, r.stderr, caplog.text):
            assert FAKE_TOKEN not in text
        return r

    return invoke
