"""`textinv list --repair` (textinv_cli/registry/repair.py): debris that crashes leave goes, damage is
reported with what to do, and an import running at the same moment is never hurt."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.helpers import random_embedding
from textinv_cli import fsutil
from textinv_cli.errors import NotFoundError
from textinv_cli.registry.store import Registry
from textinv_cli.registry.repair import GRACE_S

OLD = time.time() - GRACE_S - 60  # an mtime past the grace period


@pytest.fixture
def reg(textinv_home) -> Registry:
    reg = Registry()
    reg.add(random_embedding("<cat-toy>", seed=1), source="imported", origin={"path": "/data/cat.pt"})
    reg.add(random_embedding("<dog>", "sdxl", seed=2), source="pulled", origin={"repo": "me/dog", "commit": "c0"})
    return reg


def _orphan(reg: Registry, token: str, seed: int, *, old: bool) -> Path:
    """A blob no row uses, as a crash between blob write and commit leaves it."""
    emb = random_embedding(token, seed=seed)
    path = reg.blob_path(emb.content_sha256())
    path.write_bytes(emb.canonical_bytes())
    if old:
        os.utime(path, (OLD, OLD))
    return path


def _temp(reg: Registry, tag: str, *, old: bool) -> Path:
    """A temp file as writes.atomic_write_bytes names it, as a crash mid-write leaves it."""
    path = reg.blob_dir / f".{'ab' * 32}.safetensors.{tag}.tmp"
    path.write_bytes(b"half a blob")
    if old:
        os.utime(path, (OLD, OLD))
    return path


def _files(reg: Registry) -> set[str]:
    return {p.name for p in reg.blob_dir.iterdir()}


def _intact(reg: Registry) -> None:
    for e in reg.entries():
        assert reg.load(e).content_sha256() == e.sha256


def test_repair_removes_old_debris_keeps_recent_and_everything_else(reg):
    used = _files(reg)
    old_orphan, new_orphan = _orphan(reg, "<ghost>", 7, old=True), _orphan(reg, "<ghost2>", 8, old=False)
    old_temp, new_temp = _temp(reg, "x1", old=True), _temp(reg, "x2", old=False)
    notes = reg.blob_dir / "notes.txt"  # not something the registry writes: never touched
    notes.write_text("mine")
    os.utime(notes, (OLD, OLD))
    (reg.blob_dir / "sub").mkdir()

    report = reg.repair()
    assert report.ok and report.damaged == [] and report.database == "ok" and report.entries == 2
    assert report.removed_orphans == [old_orphan.name] and report.removed_temp_files == [old_temp.name]
    assert report.kept_recent == sorted([new_orphan.name, new_temp.name])
    assert report.freed_bytes == len(random_embedding("<ghost>", seed=7).canonical_bytes()) + len(b"half a blob")
    assert _files(reg) == used | {new_orphan.name, new_temp.name, "notes.txt", "sub"}
    _intact(reg)

    again = reg.repair()  # nothing left to do
    assert again.ok and again.removed_orphans == again.removed_temp_files == []


def test_debris_is_never_served(reg, cli):
    _orphan(reg, "<ghost>", 7, old=True)
    _temp(reg, "x", old=True)
    with pytest.raises(NotFoundError):
        reg.resolve("ghost")
    assert [d["name"] for d in json.loads(cli("list", "--json").stdout)] == ["cat-toy", "dog"]
    r = cli("convert", "ghost", "--to", "kohya")
    assert r.exit_code == 1 and "No embedding named 'ghost'" in r.stderr


def test_repair_cli_says_what_it_did(cli, reg):
    r = cli("list", "--repair")
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [f"Checked 2 entries and 2 files in {reg.blob_dir} (database: ok).",
                                     "Nothing to repair."]
    orphan, temp = _orphan(reg, "<ghost>", 7, old=True), _temp(reg, "x", old=True)
    recent = _temp(reg, "y", old=False)
    r = cli("list", "--repair")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[1].startswith("Removed 1 orphan blob and 1 stale temp file (")
    assert lines[2].startswith("Kept 1 unused file younger than 10 minutes") and len(lines) == 3
    assert not orphan.exists() and not temp.exists() and recent.exists()

    doc = json.loads(cli("list", "--repair", "--json").stdout)
    assert doc == {"root": str(reg.root), "database": "ok", "entries": 2, "files": 3, "removed_orphans": [],
                   "removed_temp_files": [], "freed_bytes": 0, "kept_recent": [recent.name], "not_removed": [],
                   "damaged": [], "ok": True}


def test_repair_reports_damaged_entries_and_exits_1(cli, reg):
    reg.add(random_embedding("<fine>", seed=3), source="imported", origin={})
    cat, dog = reg.get("cat-toy"), reg.get("dog")
    reg.blob_path(cat.sha256).unlink()
    reg.blob_path(dog.sha256).write_bytes(b"bit rot")
    with sqlite3.connect(reg.db_path) as conn:  # a row damaged by hand
        conn.execute("UPDATE embeddings SET tags = 'not json' WHERE name = 'fine'")
    conn.close()

    r = cli("list", "--repair")
    assert r.exit_code == 1
    damage = [line for line in r.stdout.splitlines() if line.startswith("Damaged: ")]
    rot = hashlib.sha256(b"bit rot").hexdigest()[:12]
    assert damage == [
        "Damaged: cat-toy: its stored copy is missing. Run `textinv rm cat-toy`, then add it again (from /data/cat.pt).",
        f"Damaged: dog: its stored copy is corrupt (sha256 {rot}, expected {dog.sha256[:12]}). "
        "Run `textinv rm dog`, then add it again (from me/dog).",
        "Damaged: fine: its tags column is not JSON. Run `textinv rm fine`, then add it again."]
    assert r.stderr.splitlines() == [
        "Error: 3 entries could not be repaired: cat-toy, dog, fine.",
        "For each: `textinv rm NAME`, then add it again from where it came (the report says where)."]
    assert reg.blob_path(dog.sha256).read_bytes() == b"bit rot"  # a row's blob is never an orphan

    r = cli("list", "--repair", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and doc["ok"] is False
    assert [(d["name"], d["problem"].split(" (")[0]) for d in doc["damaged"]] == [
        ("cat-toy", "its stored copy is missing"), ("dog", "its stored copy is corrupt"),
        ("fine", "its tags column is not JSON")]
    assert cli("rm", "cat-toy").exit_code == 0  # the way out it names works
    assert [d["name"] for d in json.loads(cli("list", "--repair", "--json").stdout)["damaged"]] == ["dog", "fine"]


def test_repair_without_a_registry_creates_and_deletes_nothing(cli, textinv_home):
    r = cli("list", "--repair")
    assert r.exit_code == 0 and "nothing to repair" in r.stdout
    assert list(textinv_home.iterdir()) == []
    # registry.db moved aside (as the damaged-database hint says): its blobs are no orphans yet
    blobs = textinv_home / "blobs"
    blobs.mkdir()
    orphan = blobs / f"{'c' * 64}.safetensors"
    orphan.write_bytes(b"an embedding")
    os.utime(orphan, (OLD, OLD))
    assert cli("list", "--repair", "--json").exit_code == 0 and orphan.exists()
    assert not (textinv_home / "registry.db").exists()


def test_repair_on_a_damaged_database_deletes_nothing(cli, reg, monkeypatch):
    # A damaged index may have lost rows, whose blobs would then look like orphans.
    orphan = _orphan(reg, "<ghost>", 7, old=True)
    real = Registry._connect

    class Damaged:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA integrity_check"):
                return self._conn.execute("SELECT 'row 3 missing from index embeddings_sha256'")
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    monkeypatch.setattr(Registry, "_connect", lambda self, path: Damaged(real(self, path)))
    r = cli("list", "--repair", "--json")
    assert r.exit_code == 1 and orphan.exists()
    doc = json.loads(r.stdout)
    assert doc["database"] == "row 3 missing from index embeddings_sha256" and doc["ok"] is False
    assert doc["removed_orphans"] == [] and doc["damaged"] == []
    assert r.stderr.splitlines()[0] == (f"Error: The registry database {reg.db_path} is damaged: "
                                        "row 3 missing from index embeddings_sha256.")
    assert "textinv import" in r.stderr.splitlines()[1]


def test_repair_takes_no_filters(cli, reg):
    r = cli("list", "--repair", "--family", "sd1")
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        "Error: --repair checks the whole registry; it does not take --family, --source, --tag, --search or --uis.",
        "Run `textinv list --repair` on its own."]


# -- repair racing an import in another process ------------------------------------------------
# Forced deterministically through the registry's stage hook: add() has written its blob and
# is about to wait for the write lock when "another process" repairs.

def _repair_at(monkeypatch, stage: str, grace_s: float | None = None) -> list:
    from textinv_cli.registry import store as registry

    reports, real = [], registry._crash_point

    def hook(name):
        if name == stage:
            monkeypatch.setattr(registry, "_crash_point", real)
            reports.append(Registry().repair(grace_s=grace_s))
        real(name)

    monkeypatch.setattr(registry, "_crash_point", hook)
    return reports


def test_repair_spares_the_blob_of_an_import_waiting_for_the_lock(reg, monkeypatch):
    reports = _repair_at(monkeypatch, "after-blob")
    emb = random_embedding("<new>", seed=9)
    entry, created = reg.add(emb, source="imported", origin={})
    assert reports[0].kept_recent == [f"{emb.content_sha256()}.safetensors"] and reports[0].removed_orphans == []
    assert created and reg.load(entry).content_sha256() == emb.content_sha256()


def test_repair_spares_an_old_orphan_that_an_import_is_reusing(reg, monkeypatch):
    old = _orphan(reg, "<new>", 9, old=True)  # left by an earlier crash; the same content again
    reports = _repair_at(monkeypatch, "after-blob")
    entry, created = reg.add(random_embedding("<new>", seed=9), source="imported", origin={})
    assert reports[0].kept_recent == [old.name] and reports[0].removed_orphans == []
    assert created and reg.load(entry).content_sha256() == entry.sha256


def test_import_paused_past_the_grace_period_still_ends_with_its_blob(reg, monkeypatch):
    # the worst case: repair judges the blob abandoned and deletes it; add's re-check under
    # the lock writes it again, so the row never lands without its blob
    reports = _repair_at(monkeypatch, "after-blob", grace_s=0)
    emb = random_embedding("<new>", seed=9)
    entry, created = reg.add(emb, source="imported", origin={})
    assert reports[0].removed_orphans == [f"{emb.content_sha256()}.safetensors"]
    assert created and reg.load(entry).content_sha256() == emb.content_sha256()


def test_import_whose_temp_file_repair_deleted_writes_it_again(reg, monkeypatch):
    real_replace, reports = os.replace, []

    def replace(src, dst):
        if not reports:  # the temp file is written and fsynced; a paused-then-resumed import
            reports.append(Registry().repair(grace_s=0))
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    emb = random_embedding("<new>", seed=9)
    entry, created = reg.add(emb, source="imported", origin={})
    assert len(reports[0].removed_temp_files) == 1
    assert created and reg.load(entry).content_sha256() == emb.content_sha256()
    assert [p for p in reg.blob_dir.iterdir() if p.name.endswith(".tmp")] == []
