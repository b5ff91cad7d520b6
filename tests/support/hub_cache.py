"""Hugging Face caches laid out the way hf_hub_download leaves them, built without any network.

The layout (huggingface_hub 2.4: file_download.py `_hf_hub_download_to_cache_dir`,
`_create_symlink`, `_cache_commit_hash_for_specific_revision`; utils/_shared_blobs.py):

    <cache>/models--OWNER--NAME/refs/main                the commit hash, no newline
    <cache>/models--OWNER--NAME/blobs/<etag>             the bytes (etag: the LFS sha256, or the git oid)
    <cache>/models--OWNER--NAME/snapshots/<commit>/PATH  relative link to ../../blobs/<etag>
    <cache>/blobs/<xx>/<xet hash>                        Xet-era clients: the bytes, in a store shared by
                                                         all repos (marked by .huggingface-shared-blobs
                                                         holding "1\\n"); the repo's blobs/<etag> is then
                                                         a relative link to it

and, unlike snapshot_download, no trees/<commit>.json listing (`tree=True` adds one, written by the
client's own writer, as snapshot_download leaves it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

# huggingface_hub gives its root logger a StreamHandler on sys.stderr when its logging module is
# first imported. Imported first inside a CliRunner call, that handler keeps the runner's stream,
# closed once the call ends, and every later test logging through it prints "--- Logging error ---".
# Import it here, at collection, where sys.stderr is the real one (hub_server's fixtures do the same
# by importing the client before any call).
import huggingface_hub.utils.logging  # noqa: E402,F401


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache in tmp (the client's constants point
    there); returns the cache folder (HF_HUB_CACHE). No server: nothing answers."""
    from tests.support.hub_server import client_env, use_client_env

    hf_home = tmp_path / "hf-home"
    use_client_env(monkeypatch, client_env(None, hf_home, offline=True))
    (hf_home / "hub").mkdir(parents=True)
    return hf_home / "hub"


def fake_commit(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def repo_dir(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def _link(target: Path, at: Path) -> None:
    """A relative link, as the client makes (os.path.relpath from the link's folder)."""
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, at.parent), at)


def hf_download_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                      ref: str | None = "main", xet: bool = False, copies: bool = False,
                      tree: bool = False) -> tuple[Path, str]:
    """Lay `files` out as hf_hub_download(repo_id, path) for each would; returns (snapshot folder, commit).

    xet: the blobs live in the cache-wide shared store. copies: no links at all (a file system
    without symlinks, where the client copies the blob into the snapshot)."""
    repo = repo_dir(cache, repo_id)
    commit = commit or fake_commit(repo_id + "".join(sorted(files)))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if xet:
            xet_hash = hashlib.sha256(b"xet" + data).hexdigest()
            store = Path(cache) / "blobs"
            store.mkdir(parents=True, exist_ok=True)
            (store / ".huggingface-shared-blobs").write_text("1\n")
            payload = store / xet_hash[:2] / xet_hash
            payload.parent.mkdir(parents=True, exist_ok=True)
            payload.write_bytes(data)
            if not blob.exists():
                _link(payload, blob)
        elif not blob.exists():
            blob.write_bytes(data)
        if copies:
            (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / path).write_bytes(data)
        else:
            _link(blob, snapshot / path)
    if ref:
        write_ref(cache, repo_id, ref, commit.encode())
    if tree:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        write_tree_cache(str(repo), commit, {p: TreeCacheEntry(size=len(d), blob_id=hashlib.sha1(d).hexdigest())
                                             for p, d in files.items()})
    return snapshot, commit


def write_ref(cache: Path, repo_id: str, ref: str, data: bytes) -> Path:
    path = repo_dir(cache, repo_id) / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
