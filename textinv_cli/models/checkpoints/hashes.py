"""A model file's SHA-256, computed once per version of the file, and A1111's hashes of it.

    sha256_of(path, progress=None) -> str   the full hex digest; memo in
                                            $TEXTINV_HOME/models/hashes.json keyed by the real
                                            path, valid while size and mtime_ns are unchanged
    short_hash(sha256) -> str               A1111's "Model hash" (infotext, since 1.0): the
                                            first 10 hex characters of the full SHA-256
    legacy_model_hash(path) -> str          A1111's hash before 1.0 (8 hex characters of the
                                            SHA-256 of 64 KiB at offset 1 MiB), in older PNGs

Hashing SDXL (6.9 GB) takes tens of seconds, so a second run must not do it again: the memo
is a cache, never trusted for more than that. A damaged or unreadable memo is ignored (and
rewritten on the next store), a memo that cannot be written is skipped, and a file that changes
while it is hashed is not memoized.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ... import fsutil, writes
from ...errors import TextinvError

MEMO_NAME = "hashes.json"
MEMO_MAX_BYTES = 16 * 2**20
MEMO_MAX_ENTRIES = 10_000  # oldest dropped first: a memo line is ~200 bytes
CHUNK = 8 * 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def memo_path() -> Path:
    from ...registry.store import home

    return home() / "models" / MEMO_NAME


def sha256_of(path, progress: Callable[[int, int], None] | None = None) -> str:
    """The file's full SHA-256 (hex). `progress(bytes_done, total)` is called as the file is
    read (not at all on a memo hit). Reads go through fsutil.open_regular (no FIFO, device...)."""
    path = Path(path)
    real = os.path.realpath(path)
    fd, st = fsutil.open_regular(path)
    try:
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if (known := _remembered(real, st)) is not None:
            return known
        h, done = hashlib.sha256(), 0
        if progress is not None:
            progress(0, st.st_size)
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, max(done, st.st_size))
        after = os.fstat(fd)
    finally:
        os.close(fd)
    digest = h.hexdigest()
    if after.st_size == st.st_size == done and after.st_mtime_ns == st.st_mtime_ns:  # unchanged while read
        _store(real, {**key, "sha256": digest})
    return digest


def known_sha256(path) -> str | None:
    """The file's SHA-256 when the memo already holds it for the file as it is now (same size
    and mtime), else None; nothing of the file is read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _remembered(os.path.realpath(path), st)


def _remembered(real: str, st: os.stat_result) -> str | None:
    """The memo's hash of the file at `real` if it was taken of the file as it is now (the
    same size and mtime), else None."""
    hit = _load_memo().get(real)
    if hit is None or hit.get("size") != st.st_size or hit.get("mtime_ns") != st.st_mtime_ns:
        return None
    return hit["sha256"]


def short_hash(sha256: str) -> str:
    """A1111's short hash (its infotext "Model hash" and its model list): sha256[:10]."""
    if not _HEX64.match(sha256.lower()):
        raise ValueError("not a SHA-256 hex digest")
    return sha256.lower()[:10]


def legacy_model_hash(path) -> str:
    """A1111's model hash before 1.0: sha256 of the (up to) 64 KiB at offset 0x100000, 8 hex
    characters (what PNGs made by older versions carry as "Model hash"); a file shorter than
    1 MiB hashes the empty block, as A1111's did."""
    fd, _ = fsutil.open_regular(Path(path))
    try:
        block = os.pread(fd, 0x10000, 0x100000)
    finally:
        os.close(fd)
    return hashlib.sha256(block).hexdigest()[:8]


def _load_memo() -> dict[str, dict]:
    """The memo's valid entries; {} when it is missing, unreadable or damaged."""
    try:
        raw = fsutil.read_capped(memo_path(), MEMO_MAX_BYTES)
        data = json.loads(raw)
    except (TextinvError, OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if isinstance(v, dict) and type(v.get("size")) is int and type(v.get("mtime_ns")) is int
            and isinstance(v.get("sha256"), str) and _HEX64.match(v["sha256"])}


def _store(real: str, entry: dict) -> None:
    memo = _load_memo()
    memo.pop(real, None)
    memo[real] = entry  # last in: the newest entry survives the cap
    while len(memo) > MEMO_MAX_ENTRIES:
        del memo[next(iter(memo))]
    path = memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writes.atomic_write_bytes(path, json.dumps(memo, indent=0, sort_keys=False).encode(), force=True)
    except (OSError, TextinvError):  # a read-only or full home: the hash is right, only not remembered
        pass
