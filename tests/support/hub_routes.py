"""The HTTP side of the local Hub double (tests/support/hub_server.py holds its state).

One handler serves two hosts: the Hub itself (API, resolve, commit, LFS batch) and the
large-file storage, a different origin like the real CDN/S3, reached only through signed
URLs. Each route answers by raising Reply; _Drop closes the connection mid-answer, which
is how a test makes the network fail during a download.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, unquote, urlsplit

REGULAR_MAX = 10 * 1024 * 1024      # the Hub refuses larger non-LFS files
BINARY_REGULAR_MAX = 1024 * 1024    # ... and binary non-LFS files above 1 MB
PAGE = 1000                         # tree entries per page, as the Hub
INVALID_TOKEN = "Invalid credentials in Authorization header"


class Reply(Exception):
    """Raised by a route to answer: status, JSON or bytes body, extra headers."""

    def __init__(self, status: int, body=None, headers: dict | None = None):
        self.status, self.body, self.headers = status, body, dict(headers or {})


def error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Reply:
    h = {"X-Error-Message": message, **(headers or {})}
    if code:
        h["X-Error-Code"] = code
    return Reply(status, {"error": message}, h)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls
    server_version = "FakeHub/1.0"

    def setup(self):
        super().setup()
        self.server.hub.connections.add(self.connection)

    def finish(self):
        self.server.hub.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:  # the client (or stop()) already closed it
            pass

    def log_message(self, *args):  # quiet: pytest shows failures, not access logs
        pass

    # -- plumbing ---------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        hub = self.server.hub
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.segments = [unquote(s) for s in url.path.split("/")[1:]]
        self.raw_path = url.path
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        hub.record(self.command, unquote(url.path), self.server.role, self.headers.get("Authorization"))
        try:
            with hub.lock:
                routes = StorageRoutes if self.server.role == "storage" else HubRoutes
                routes(self, hub).route()
            raise error(500, "no reply")
        except Reply as r:
            self._send(r)
        except _Drop:
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _send(self, r: Reply) -> None:
        body = r.body
        headers = {"X-Request-Id": f"req-{id(r):x}", **r.headers}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        body = body or b""
        self.send_response(r.status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_bytes(self, data: bytes, headers: dict, partial_cut: int | None = None) -> None:
        """200 or 206 (Range) with the file; `partial_cut`: send that many bytes, then drop."""
        start, status = 0, 200
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start, status = int(rng[6:].split("-")[0]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        chunk = data[start:]
        headers.update({"Content-Length": len(chunk), "Accept-Ranges": "bytes",
                        "Content-Type": "application/octet-stream"})
        if partial_cut is None or self.command == "HEAD":
            raise Reply(status, chunk, headers)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(chunk[:partial_cut])
        raise _Drop()


class _Drop(Exception):
    """Close the connection without (finishing) an answer: the host went away."""


class _Routes:
    def __init__(self, req: Handler, hub):
        self.req, self.hub, self.seg, self.q = req, hub, req.segments, req.query

    def json_body(self):
        try:
            return json.loads(self.req.body or b"{}")
        except ValueError:
            raise error(400, "Invalid JSON body") from None


class StorageRoutes(_Routes):
    """The storage host: signed URLs only, never a Hub token."""

    def route(self):
        if len(self.seg) != 2 or self.seg[0] != "lfs":
            raise Reply(404, b"NoSuchKey", {"Content-Type": "application/xml"})
        oid, req = self.seg[1], self.req
        what = "put" if req.command == "PUT" else "get"
        if not hmac.compare_digest(self.q.get("X-Amz-Signature", ""), self.hub.sign(what, oid)):
            raise Reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", {"Content-Type": "application/xml"})
        path = self.hub.root / "objects" / oid
        if req.command == "PUT":
            if hashlib.sha256(req.body).hexdigest() != oid:
                raise Reply(400, b"<Error><Code>BadDigest</Code></Error>", {"Content-Type": "application/xml"})
            path.write_bytes(req.body)
            raise Reply(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})
        if not path.exists():
            raise Reply(404, b"NoSuchKey", {"Content-Type": "application/xml"})
        cut = self.hub.cut.get(oid)
        if cut is not None and req.command == "GET":
            if cut < 0:              # already died once: the host is gone
                raise _Drop()
            self.hub.cut[oid] = -1
        data = path.read_bytes()
        req.send_bytes(data, {"ETag": f'"{oid}"'}, partial_cut=cut if req.command == "GET" else None)


class HubRoutes(_Routes):
    def route(self):
        seg, cmd = self.seg, self.req.command
        if self.hub.forced is not None:
            status, message = self.hub.forced
            raise error(status, message.replace("{auth}", self.req.headers.get("Authorization") or ""))
        self.user = self._user()
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if cmd == "GET" and not rest:
                self.model_info(repo_id, "main")
            if cmd == "GET" and len(rest) == 2 and rest[0] == "revision":
                self.model_info(repo_id, rest[1])
            if cmd == "GET" and len(rest) >= 2 and rest[0] == "tree":
                self.tree(repo_id, rest[1], "/".join(rest[2:]))
            if cmd == "POST" and len(rest) == 2 and rest[0] == "preupload":
                self.preupload(repo_id, rest[1])
            if cmd == "POST" and len(rest) == 2 and rest[0] == "commit":
                self.commit(repo_id, rest[1])
            if cmd == "POST" and len(rest) == 2 and rest[0] == "branch":
                self.branch(repo_id, rest[1])
        if seg == ["api", "repos", "create"] and cmd == "POST":
            self.create_repo()
        if seg == ["api", "validate-yaml"] and cmd == "POST":
            self.validate_yaml()
        if len(seg) >= 5 and seg[2] == "resolve" and cmd in ("GET", "HEAD"):
            # the file path keeps its slashes (the client quotes it with safe="/")
            path = unquote(self.req.raw_path.split("/", 5)[5])
            self.resolve(f"{seg[0]}/{seg[1]}", seg[3], path)
        if len(seg) >= 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and cmd == "POST":
            self.lfs(f"{seg[0]}/{seg[1][:-4]}", seg[5])
        raise error(404, "Sorry, we can't find the page you are looking for.")

    # -- access control ---------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.req.headers.get("Authorization")
        if not auth:
            return None
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token not in self.hub.tokens:
            raise error(401, INVALID_TOKEN)
        return self.hub.tokens[token]

    def _may_write(self, namespace: str) -> bool:
        return self.user is not None and (self.user == namespace or self.user in self.hub.orgs.get(namespace, ()))

    def readable(self, repo_id: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._may_write(repo_id.split("/")[0])):
            # Anonymous callers get 401, authenticated ones 404: the Hub never says "private".
            raise error(404 if self.user else 401, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str):
        repo = self.readable(repo_id)
        if not self._may_write(repo_id.split("/")[0]):
            raise error(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def revision(self, repo, rev: str):
        sha = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            raise error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    # -- reading ------------------------------------------------------------------------
    def model_info(self, repo_id: str, rev: str):
        repo = self.readable(repo_id)
        commit = self.revision(repo, rev)
        blobs = self.q.get("blobs", "").lower() == "true"
        siblings = []
        for path, b in sorted(commit.files.items()):
            s = {"rfilename": path}
            if blobs:
                s.update(size=b.size, blobId=b.oid)
                if b.lfs:
                    s["lfs"] = {"sha256": b.sha256, "size": b.size, "pointerSize": len(b.pointer)}
            siblings.append(s)
        raise Reply(200, {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                          "author": repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                          "createdAt": repo.created, "private": repo.private, "gated": repo.gated,
                          "disabled": False, "downloads": 0, "likes": 0, "tags": [], "library_name": None,
                          "siblings": siblings, "spaces": [], "usedStorage": sum(b.size for b in commit.files.values())})

    def tree(self, repo_id: str, rev: str, base: str):
        commit = self.revision(self.readable(repo_id), rev)
        recursive = self.q.get("recursive", "").lower() == "true"
        prefix = base.rstrip("/") + "/" if base else ""
        entries: dict[str, dict] = {}
        for path, b in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    entries[d] = {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{d}".encode()).hexdigest(),
                                  "size": 0, "path": d}
            if recursive or len(parts) == 1:
                e = {"type": "file", "oid": b.oid, "size": b.size, "path": path}
                if b.lfs:
                    e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": len(b.pointer)}
                entries[path] = e
        if base and not entries:
            raise error(404, f"{base} does not exist on {rev}", "EntryNotFound")
        ordered = [entries[k] for k in sorted(entries)]
        start = int(self.q.get("cursor", "0"))
        page, headers = ordered[start:start + PAGE], {}
        if start + PAGE < len(ordered):
            nxt = f"{self.hub.endpoint}{self.req.raw_path}?recursive={str(recursive).lower()}&cursor={start + PAGE}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        raise Reply(200, page, headers)

    def resolve(self, repo_id: str, rev: str, path: str):
        repo = self.readable(repo_id)
        if repo.gated and self.user not in repo.allowed and not self._may_write(repo_id.split("/")[0]):
            if self.user is None:
                raise error(401, f"Access to model {repo_id} is restricted. You must have access to it and be "
                                 "authenticated to access it. Please log in.", "GatedRepo")
            raise error(403, f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                             f"Visit {self.hub.endpoint}/{repo_id} to ask for access.", "GatedRepo")
        commit = self.revision(repo, rev)
        blob = commit.files.get(path)
        common = {"X-Repo-Commit": commit.sha}
        if blob is None:
            raise error(404, "Entry not found", "EntryNotFound", common)
        if blob.lfs:
            # Like the Hub: a redirect to signed storage; the metadata travels on the redirect.
            location = f"{self.hub.storage}/lfs/{blob.sha256}?X-Amz-Signature={self.hub.sign('get', blob.sha256)}"
            raise Reply(302, f"Found. Redirecting to {location}".encode(), {
                **common, "Location": location, "ETag": f'"{blob.oid}"', "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": blob.size, "Content-Type": "text/plain; charset=utf-8"})
        cut = self.hub.cut.get(blob.sha256)
        if cut is not None and self.req.command == "GET":
            if cut < 0:
                raise _Drop()
            self.hub.cut[blob.sha256] = -1
        self.req.send_bytes(self.hub.read(blob), {**common, "ETag": f'"{blob.oid}"'},
                            partial_cut=cut if self.req.command == "GET" else None)

    # -- writing --------------------------------------------------------------------------
    def create_repo(self):
        body = self.json_body()
        if self.user is None:
            raise error(401, "You must be authenticated to create a repository")
        if body.get("type", "model") != "model":
            raise error(400, "This test Hub only hosts model repos")
        namespace, name = body.get("organization") or self.user, body.get("name") or ""
        if not name or "/" in name:
            raise error(400, "Invalid repo name")
        repo_id = f"{namespace}/{name}"
        if not self._may_write(namespace):
            raise error(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            raise Reply(409, {"error": "You already created this model repo", "url": url})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.create(repo_id, private=private)
        raise Reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def branch(self, repo_id: str, name: str):
        repo = self.writable(repo_id)
        if name in repo.branches:
            raise error(409, "Reference already exists")
        start = self.json_body().get("startingPoint") or "main"
        repo.branches[name] = self.revision(repo, start).sha
        raise Reply(200, {})

    def validate_yaml(self):
        import yaml

        content = self.json_body().get("content", "")
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content[4:content.index("\n---", 3)]) or {}
            except (ValueError, yaml.YAMLError) as e:
                meta, errors = {}, [{"message": f"Invalid YAML: {e}"}]
            if not isinstance(meta, dict):
                errors.append({"message": "Metadata must be a mapping"})
            else:
                for key, kind in (("license", str), ("library_name", str), ("tags", list), ("base_model", (str, list))):
                    if key in meta and not isinstance(meta[key], kind):
                        errors.append({"message": f'"{key}" must be a {kind}'})
                if not all(isinstance(t, str) for t in meta.get("tags") or []):
                    errors.append({"message": '"tags" must be a list of strings'})
        raise Reply(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, repo_id: str, rev: str):
        repo = self.writable(repo_id)
        head = self.revision(repo, rev)
        out = []
        for f in self.json_body().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.hub.must_be_lfs(repo, rev, f["path"], sample, int(f["size"]))
            old = head.files.get(f["path"])
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if old is not None:
                entry["oid"] = old.sha256 if old.lfs else old.oid
            out.append(entry)
        raise Reply(200, {"files": out, "commitOid": head.sha})

    def lfs(self, repo_id: str, action: str):
        self.writable(repo_id)
        body = self.json_body()
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        if action == "verify":
            path = self.hub.root / "objects" / body.get("oid", "")
            if not path.is_file() or path.stat().st_size != body.get("size"):
                raise error(404, "Object not found")
            raise Reply(200, {"message": "Object verified"}, lfs_json)
        if action != "batch" or body.get("operation") != "upload" or "basic" not in body.get("transfers", []):
            raise error(400, "Only basic LFS uploads are supported here")
        objects = []
        for o in body.get("objects", []):
            oid, size = o["oid"], o["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (self.hub.root / "objects" / oid).is_file():  # already stored: nothing to upload
                put = f"{self.hub.storage}/lfs/{oid}?X-Amz-Signature={self.hub.sign('put', oid)}"
                entry["actions"] = {"upload": {"href": put, "expires_in": 86400},
                                    "verify": {"href": f"{self.hub.endpoint}/{quote(repo_id)}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        raise Reply(200, {"transfer": "basic", "objects": objects}, lfs_json)

    def commit(self, repo_id: str, rev: str):
        repo = self.writable(repo_id)
        if self.q.get("create_pr"):
            raise error(400, "Pull requests are not supported by this test Hub")
        if rev not in repo.branches:
            raise error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise error(400, "The first line must be the commit header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[rev]:
            raise error(412, "A commit has happened since. Please refresh and try again.")
        add, delete = {}, set()
        for line in lines[1:]:
            key, v = line.get("key"), line.get("value", {})
            if key == "file":
                data = base64.b64decode(v["content"])
                if len(data) > REGULAR_MAX or (len(data) > BINARY_REGULAR_MAX and b"\0" in data[:512]):
                    raise error(400, f"Your push was rejected because {v['path']} must be stored with LFS")
                add[v["path"]] = self.hub.store(data, False)
            elif key == "lfsFile":
                path = self.hub.root / "objects" / v["oid"]
                if not path.is_file() or (v.get("size") is not None and path.stat().st_size != v["size"]):
                    raise error(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                     f"does not exist ({v['path']})")
                add[v["path"]] = self.hub.lfs_blob(v["oid"])
            elif key in ("deletedFile", "deletedFolder"):
                delete.add(v["path"])
            else:
                raise error(400, f"Unknown commit operation {key!r}")
        sha = self.hub.commit(repo, rev, add, delete, header.get("summary") or "Upload")
        raise Reply(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}",
                          "hookOutput": "", "pullRequestUrl": None})
