"""A full or read-only disk under the registry: a clear RegistryError (one line of what, one of
what to do), and nothing half-written: no row, no blob, no temp file left by the failed write."""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile

import pytest

from tests.support.helpers import random_embedding
from textinv_cli.registry import db as registry_db
from textinv_cli.errors import RegistryError
from textinv_cli.registry.store import Registry


@pytest.fixture
def reg(textinv_home) -> Registry:
    """A registry that already holds one entry, so a failed write has something to spoil."""
    reg = Registry()
    reg.add(random_embedding("<kept>", seed=1), source="imported", origin={})
    return reg


def _unchanged(reg: Registry) -> None:
    """Only the entry from before, intact; blobs/ holds its blob and nothing else."""
    kept = reg.get("kept")
    assert [e.name for e in reg.entries()] == ["kept"]
    assert reg.load(kept).content_sha256() == kept.sha256
    assert sorted(p.name for p in reg.blob_dir.iterdir()) == [f"{kept.sha256}.safetensors"]


def _raise(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return fail


class _FailingCommit:
    """A connection whose COMMIT of a write fails the way sqlite reports a full disk.
    A commit with nothing to write still succeeds, as it does on a full disk."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql, *args):
        if sql == "COMMIT" and self._conn.total_changes:
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _connect_with(monkeypatch, setup):
    real = Registry._connect

    def connect(self, db_path):
        conn = real(self, db_path)
        return setup(conn) or conn

    monkeypatch.setattr(Registry, "_connect", connect)


def _disk_full_at_insert(conn):
    # a real SQLITE_FULL: the database may not grow by a single page
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {max(pages, 1)}")


FAULTS = {
    # at the blob write (writes.atomic_write_bytes): what the OS says
    "ENOSPC at the blob's fsync": ("full", lambda mp: mp.setattr(os, "fsync", _raise(errno.ENOSPC))),
    "EDQUOT at the blob's write": ("full", lambda mp: mp.setattr(tempfile, "mkstemp", _raise(errno.EDQUOT))),
    "EROFS at the blob's temp file": ("readonly", lambda mp: mp.setattr(tempfile, "mkstemp", _raise(errno.EROFS))),
    # at the database: what sqlite says
    "SQLITE_FULL at the insert": ("full", lambda mp: _connect_with(mp, _disk_full_at_insert)),
    "disk full at the commit": ("full", lambda mp: _connect_with(mp, _FailingCommit)),
    "SQLITE_READONLY at the write": ("readonly", lambda mp: _connect_with(
        mp, lambda conn: conn.execute("PRAGMA query_only = 1"))),
    "read-only registry files": ("readonly", lambda mp: mp.setattr(os, "access", lambda *a, **k: False)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_add_on_a_full_or_read_only_registry(reg, monkeypatch, fault):
    why, inject = FAULTS[fault]
    emb = random_embedding("<new>", "sdxl", seed=2, meta={"note": "x" * 20000})  # > 1 page of row
    with monkeypatch.context() as mp:
        inject(mp)
        with pytest.raises(RegistryError) as err:
            reg.add(emb, source="imported", origin={})
    said = {"full": "the disk is full", "readonly": "it is read-only"}[why]
    assert err.value.message == (f"Cannot write to the registry at {reg.root}: {said}; "
                                 "nothing was registered or changed.")
    assert "TEXTINV_HOME" in err.value.hint and "\n" not in err.value.hint
    if fault == "SQLITE_READONLY at the write":
        # sqlite alone refuses (the files look writable): the blob written before cannot be
        # taken back without the write lock; it stays an orphan, unserved, until a repair
        assert reg.get("new") is None and reg.repair(grace_s=0).removed_orphans == [
            f"{emb.content_sha256()}.safetensors"]
    _unchanged(reg)
    entry, created = reg.add(emb, source="imported", origin={})  # the same add works once the fault is gone
    assert created and reg.load(entry).content_sha256() == emb.content_sha256()


def test_import_on_a_full_disk_says_so_in_two_lines(cli, reg, tmp_path, monkeypatch):
    src = tmp_path / "new.safetensors"
    from textinv_cli.formats import write_embedding

    write_embedding(random_embedding("<new>", seed=2), src, "safetensors")
    monkeypatch.setattr(os, "fsync", _raise(errno.ENOSPC))
    r = cli("import", src)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"Error: Cannot write to the registry at {reg.root}: the disk is full; nothing was registered or changed.",
        "Free some disk space, or set TEXTINV_HOME to a folder on another disk."]
    monkeypatch.undo()
    _unchanged(reg)


def test_rm_on_a_full_disk_keeps_the_entry(cli, reg, monkeypatch):
    _connect_with(monkeypatch, _FailingCommit)
    r = cli("rm", "kept")
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 2 and "the disk is full" in r.stderr
    monkeypatch.undo()
    _unchanged(reg)


def test_rm_that_cannot_delete_the_blob_leaves_an_orphan_for_repair(reg, monkeypatch):
    kept = reg.get("kept")
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", _raise(errno.EROFS))
    assert reg.remove("kept") == kept  # the row is gone: that is what rm promised
    assert reg.entries() == [] and reg.blob_path(kept.sha256).exists()
    report = reg.repair(grace_s=0)  # still read-only: repair says what it could not do
    assert not report.ok and report.not_removed == [
        {"file": f"{kept.sha256}.safetensors", "error": os.strerror(errno.EROFS)}]
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert reg.repair(grace_s=0).removed_orphans == [f"{kept.sha256}.safetensors"]
    assert list(reg.blob_dir.iterdir()) == []


def test_repair_that_cannot_delete_exits_1(cli, reg, monkeypatch):
    orphan = reg.blob_dir / f"{'0' * 64}.safetensors"
    orphan.write_bytes(b"left by a crash")
    os.utime(orphan, (0, 0))
    monkeypatch.setattr(os, "unlink", _raise(errno.EROFS))
    r = cli("list", "--repair")
    assert r.exit_code == 1
    assert f"Could not remove {orphan.name}: Read-only file system." in r.stdout
    assert r.stderr.splitlines() == [f"Error: 1 unused file in {reg.blob_dir} could not be removed.",
                                     "Check the folder's permissions, then run `textinv list --repair` again."]


@pytest.mark.parametrize("message, name, expect", [
    ("database or disk is full", "SQLITE_FULL", "the disk is full"),
    ("attempt to write a readonly database", "SQLITE_READONLY", "it is read-only"),
    ("attempt to write a readonly database", "", "it is read-only"),  # sqlite without error names
    ("database is locked", "SQLITE_BUSY", "stayed busy"),
    ("disk I/O error", "SQLITE_IOERR", "cannot be used: disk I/O error"),
])
def test_sqlite_errors_become_one_clear_registry_error(tmp_path, message, name, expect):
    e = sqlite3.OperationalError(message)
    if name:
        e.sqlite_errorname = name
    with pytest.raises(RegistryError) as err:
        with registry_db.guard(tmp_path, tmp_path / "registry.db"):
            raise e
    assert expect in err.value.message and "\n" not in err.value.message and err.value.hint

