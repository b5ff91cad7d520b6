"""The registry (ARCHITECTURE.md, "Registry"): API behaviour, integrity checks, and real multi-process writes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.helpers import random_embedding
from tests.support.registry_worker import assert_consistent, run_together
from textinv_cli.errors import InvalidEmbeddingError, NotFoundError, RegistryError
from textinv_cli.registry.store import CRASH_ENV, Entry, Registry, home
from textinv_cli.registry import db as registry_db

WORKER = Path(__file__).parent / "support" / "registry_worker.py"


@pytest.fixture
def reg(textinv_home) -> Registry:
    return Registry()


def _rows(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "registry.db") as conn:
        return conn.execute("SELECT name, sha256 FROM embeddings ORDER BY name").fetchall()


def _blobs(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").glob("*.safetensors")}


# -- location -------------------------------------------------------------------------

def test_textinv_home_overrides_location(textinv_home, tmp_path, monkeypatch):
    assert home() == textinv_home
    assert Registry().root == textinv_home
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("TEXTINV_HOME", str(other))
    Registry().add(random_embedding(), source="imported", origin={})
    assert (other / "registry.db").is_file() and len(_blobs(other)) == 1
    assert not (textinv_home / "registry.db").exists()


def test_default_location_is_platform_data_dir(monkeypatch):
    import platformdirs

    monkeypatch.delenv("TEXTINV_HOME")
    assert home() == Path(platformdirs.user_data_dir("textinv"))


def test_missing_registry_reads_as_empty_and_creates_nothing(tmp_path):
    reg = Registry(tmp_path / "none")
    assert reg.entries() == [] and reg.get("x") is None
    with pytest.raises(NotFoundError, match="empty"):
        reg.resolve("x")
    with pytest.raises(NotFoundError):
        reg.remove("x")
    assert not (tmp_path / "none").exists()


# -- add / get / load -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_add_then_load_round_trips(reg, family):
    emb = random_embedding("<cat-toy>", family, n=3, meta={"step": "500"})
    entry, created = reg.add(emb, source="trained", origin={"run": "r1"}, tags=["cats", "toy"])
    assert created
    assert (entry.name, entry.token, entry.family, entry.n_vectors) == ("cat-toy", "<cat-toy>", family, 3)
    assert entry.widths == emb.widths and entry.sha256 == emb.content_sha256()
    assert (entry.source, entry.origin, entry.meta, entry.tags) == ("trained", {"run": "r1"}, {"step": "500"},
                                                                      ["cats", "toy"])
    assert entry.created.endswith("Z") and "T" in entry.created
    assert reg.get("cat-toy") == entry
    blob = reg.blob_path(entry.sha256)
    assert blob == reg.root / "blobs" / f"{entry.sha256}.safetensors"
    assert blob.read_bytes() == emb.canonical_bytes()
    back = reg.load("cat-toy")
    assert back.token == "<cat-toy>" and back.meta == {"step": "500"}
    assert back.vectors.keys() == emb.vectors.keys()
    for slot in emb.vectors:
        np.testing.assert_array_equal(back.vectors[slot], emb.vectors[slot])
    assert reg.load(entry).content_sha256() == entry.sha256


def test_database_settings(reg):
    reg.add(random_embedding(), source="imported", origin={})
    with sqlite3.connect(reg.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == registry_db.SCHEMA_VERSION


def test_to_json_is_plain_json(reg):
    entry, _ = reg.add(random_embedding(meta={"format": "a1111"}), source="pulled",
                       origin={"repo": "sd-concepts-library/cat-toy", "commit": "abc"})
    doc = json.loads(json.dumps(entry.to_json()))
    assert doc["name"] == "cat-toy" and doc["origin"]["commit"] == "abc" and doc["meta"]["format"] == "a1111"
    assert set(doc) == {"active", "name", "token", "family", "n_vectors", "widths", "sha256", "source", "origin",
                        "meta", "tags", "created"}
    assert Entry(**doc) == entry


def test_identical_content_is_stored_once(reg):
    first, created = reg.add(random_embedding(seed=1), source="imported", origin={"path": "/a"})
    again, created2 = reg.add(random_embedding(seed=1, meta={"other": "meta"}), name="another-name",
                              source="pulled", origin={"path": "/b"})
    assert created and not created2
    assert again == first  # nothing changed: same name, origin, created time
    assert [e.name for e in reg.entries()] == ["cat-toy"] and len(_blobs(reg.root)) == 1


def test_a_taken_name_makes_the_next_version_unless_named_explicitly(reg):
    first, _ = reg.add(random_embedding(seed=1), source="imported", origin={})
    second, created = reg.add(random_embedding(seed=2), source="imported", origin={})
    assert created and second.name == "cat-toy-v2" and second.active and second.token == first.token
    assert [(e.name, e.active) for e in reg.entries()] == [("cat-toy", False), ("cat-toy-v2", True)]
    with pytest.raises(RegistryError) as err:  # an explicit --name that is taken: refused, a free one named
        reg.add(random_embedding(seed=3), name="cat-toy", source="imported", origin={})
    assert "'cat-toy'" in err.value.message and "--name cat-toy-v3" in err.value.hint
    assert len(_blobs(reg.root)) == 2  # the refused content left nothing behind
    third, _ = reg.add(random_embedding(seed=3), name="cat-toy", on_taken="version", source="trained", origin={})
    assert third.name == "cat-toy-v3" and reg.resolve("<cat-toy>").name == "cat-toy-v3"


def test_use_rename_tags_and_rm_keep_one_active_entry_per_token(reg):
    reg.add(random_embedding(seed=1), source="imported", origin={})
    reg.add(random_embedding(seed=2), source="imported", origin={})
    entry, before = reg.use("cat-toy")
    assert entry.active and before.name == "cat-toy-v2" and reg.resolve("<cat-toy>").name == "cat-toy"
    assert reg.use("cat-toy") [1] is None  # already active: nothing switched
    renamed = reg.rename("cat-toy", "kitty")
    assert renamed.name == "kitty" and renamed.active and reg.get("cat-toy") is None
    with pytest.raises(RegistryError, match="already taken"):
        reg.rename("kitty", "cat-toy-v2")
    assert reg.set_tags("kitty", ["toy", "orange", "toy"]).tags == ["toy", "orange"]
    assert reg.set_tags("kitty", remove=["toy"]).tags == ["orange"] and reg.get("kitty").tags == ["orange"]
    reg.remove("kitty")  # the active one goes: the newest remaining version takes over
    assert reg.get("cat-toy-v2").active and reg.resolve("cat-toy").name == "cat-toy-v2"


def test_a_version_1_registry_reads_and_migrates_with_one_active_entry_per_token(reg):
    """Before versions, two entries could share a token: the newest becomes the active one."""
    rows = []
    for seed, name, created in ((2, "new", "2024-06-01T00:00:00Z"), (1, "old", "2024-01-01T00:00:00Z")):
        e, _ = reg.add(random_embedding(seed=seed), name=name, source="imported", origin={})
        rows.append([json.dumps(v) if k in registry_db.JSON_COLUMNS else created if k == "created" else v
                     for k, v in e.to_json().items() if k in registry_db.COLUMNS])
    reg.db_path.unlink()
    with sqlite3.connect(reg.db_path) as conn:  # schema 1, as textinv wrote it: no active column
        conn.execute("CREATE TABLE embeddings (name TEXT PRIMARY KEY, token TEXT NOT NULL, family TEXT NOT NULL,"
                     " n_vectors INTEGER NOT NULL, widths TEXT NOT NULL, sha256 TEXT NOT NULL, source TEXT NOT NULL,"
                     " origin TEXT NOT NULL, meta TEXT NOT NULL, tags TEXT NOT NULL, created TEXT NOT NULL)")
        conn.executemany("INSERT INTO embeddings VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("PRAGMA user_version = 1")
    assert [(e.name, e.active) for e in reg.entries()] == [("new", True), ("old", False)]  # read as is
    reg.add(random_embedding("<dog>", seed=3), source="imported", origin={})  # the first write migrates
    with sqlite3.connect(reg.db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == registry_db.SCHEMA_VERSION
        assert dict(conn.execute("SELECT name, active FROM embeddings")) == {"new": 1, "old": 0, "dog": 1}


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "<>", "a\\b", " ", "x\x00y", "a\nb"])
def test_bad_names_are_refused_before_anything_is_written(reg, bad):
    with pytest.raises(InvalidEmbeddingError):
        reg.add(random_embedding(), name=bad, source="imported", origin={})
    with pytest.raises(InvalidEmbeddingError):
        reg.add(random_embedding(token=f"<{bad}>" if bad.strip() else "<x/../y>"), source="imported", origin={})
    assert not reg.root.joinpath("blobs").exists() or not any(reg.root.joinpath("blobs").iterdir())
    assert reg.entries() == []


def test_unknown_source_is_a_bug(reg):
    with pytest.raises(ValueError):
        reg.add(random_embedding(), source="downloaded", origin={})


# -- resolve / entries / remove -----------------------------------------------------------

def test_resolve_by_name_token_or_bare_token(reg):
    reg.add(random_embedding("<cat-toy>", seed=1), name="kitty", source="imported", origin={})
    assert reg.resolve("kitty").name == "kitty"
    assert reg.resolve("<cat-toy>").name == "kitty"
    assert reg.resolve("cat-toy").name == "kitty"


def test_resolve_a_shared_token_gives_its_active_entry(reg):
    reg.add(random_embedding("<cat-toy>", seed=1), source="imported", origin={})
    reg.add(random_embedding("<cat-toy>", seed=2), name="cat-toy-v2", source="imported", origin={})
    assert reg.resolve("cat-toy").name == "cat-toy"  # a name wins over tokens
    assert reg.resolve("<cat-toy>").name == "cat-toy-v2"  # the newest registration is active


def test_resolve_unknown_suggests_close_names(reg):
    reg.add(random_embedding("<cat-toy>"), source="imported", origin={})
    reg.add(random_embedding("<dog>", seed=3), source="imported", origin={})
    with pytest.raises(NotFoundError) as err:
        reg.resolve("cat-tyo")
    assert "'cat-tyo'" in err.value.message
    assert "cat-toy" in err.value.hint and "dog" not in err.value.hint and "textinv list" in err.value.hint


def test_entries_sorted_and_filtered(reg):
    reg.add(random_embedding("<zeta>", "sdxl", seed=1), source="pulled", origin={})
    reg.add(random_embedding("<alpha>", "sd1", seed=2), source="imported", origin={})
    reg.add(random_embedding("<mid>", "sd2", seed=3), source="trained", origin={})
    reg.add(random_embedding("<beta>", "sd1", seed=4), source="trained", origin={})
    assert [e.name for e in reg.entries()] == ["alpha", "beta", "mid", "zeta"]
    assert [e.name for e in reg.entries(family="sd1")] == ["alpha", "beta"]
    assert [e.name for e in reg.entries(source="trained")] == ["beta", "mid"]
    assert [e.name for e in reg.entries(family="sd1", source="trained")] == ["beta"]
    assert reg.entries(family="sdxl", source="imported") == []


def test_remove_deletes_row_and_blob(reg):
    entry, _ = reg.add(random_embedding(), source="imported", origin={})
    keep, _ = reg.add(random_embedding("<dog>", seed=5), source="imported", origin={})
    removed = reg.remove("cat-toy")
    assert removed == entry
    assert reg.get("cat-toy") is None and not reg.blob_path(entry.sha256).exists()
    assert reg.load("dog").content_sha256() == keep.sha256


def test_remove_keeps_a_blob_another_row_uses(reg):
    entry, _ = reg.add(random_embedding(), source="imported", origin={})
    with sqlite3.connect(reg.db_path) as conn:  # e.g. written by a future version
        conn.execute("INSERT INTO embeddings SELECT 'alias', token, family, n_vectors, widths, sha256, source,"
                     " origin, meta, tags, created, 0 FROM embeddings WHERE name = 'cat-toy'")
    reg.remove("cat-toy")
    assert reg.blob_path(entry.sha256).exists() and reg.load("alias").content_sha256() == entry.sha256
    reg.remove("alias")
    assert not reg.blob_path(entry.sha256).exists()


def test_remove_unknown_suggests_close_names(reg):
    reg.add(random_embedding(), source="imported", origin={})
    with pytest.raises(NotFoundError) as err:
        reg.remove("cat-tot")
    assert "cat-toy" in err.value.hint
    assert [e.name for e in reg.entries()] == ["cat-toy"]


# -- integrity ------------------------------------------------------------------------------

def test_load_refuses_a_corrupt_blob(reg):
    entry, _ = reg.add(random_embedding(), source="imported", origin={"path": "/data/cat.pt"})
    blob = reg.blob_path(entry.sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="corrupt") as err:
        reg.load("cat-toy")
    assert "textinv rm cat-toy" in err.value.hint and "/data/cat.pt" in err.value.hint


def test_load_reports_a_missing_blob(reg):
    entry, _ = reg.add(random_embedding(), source="imported", origin={})
    reg.blob_path(entry.sha256).unlink()
    with pytest.raises(RegistryError, match="missing"):
        reg.load("cat-toy")


def test_orphans_and_temp_files_are_tolerated(reg):
    orphan = random_embedding("<orphan>", seed=9)
    reg.root.joinpath("blobs").mkdir(parents=True)
    reg.blob_path(orphan.content_sha256()).write_bytes(orphan.canonical_bytes())
    reg.root.joinpath("blobs", ".x.safetensors.abc.tmp").write_bytes(b"half a blob")
    reg.add(random_embedding(), source="imported", origin={})
    assert [e.name for e in reg.entries()] == ["cat-toy"]
    reg.remove("cat-toy")
    assert reg.blob_path(orphan.content_sha256()).exists()  # rm touches only its own blob
    entry, created = reg.add(orphan, source="imported", origin={})  # an orphan is simply reused
    assert created and reg.load(entry).token == "<orphan>"


def test_add_replaces_a_damaged_orphan_blob(reg):
    emb = random_embedding()
    reg.root.joinpath("blobs").mkdir(parents=True)
    reg.blob_path(emb.content_sha256()).write_bytes(b"garbage")
    reg.add(emb, source="imported", origin={})
    assert reg.load("cat-toy").content_sha256() == emb.content_sha256()


def test_blob_path_refuses_non_hashes(reg):
    with pytest.raises(RegistryError):
        reg.blob_path("../../etc/passwd")


def test_newer_schema_is_refused(reg):
    reg.add(random_embedding(), source="imported", origin={})
    with sqlite3.connect(reg.db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError, match="newer"):
        reg.entries()
    with pytest.raises(RegistryError, match="newer"):
        reg.add(random_embedding("<dog>", seed=4), source="imported", origin={})


def test_damaged_database_is_a_clear_error(reg):
    reg.root.mkdir(parents=True, exist_ok=True)
    reg.db_path.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(RegistryError, match="damaged"):
        reg.entries()
    with pytest.raises(RegistryError, match="damaged"):
        reg.add(random_embedding(), source="imported", origin={})


def test_unusable_location_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RegistryError, match="Cannot create"):
        Registry(tmp_path / "file" / "reg").add(random_embedding(), source="imported", origin={})


# -- several processes ------------------------------------------------------------------------

def _ok(results):
    for rc, out, err in results:
        assert rc == 0, err
    return [[json.loads(line) for line in out.splitlines() if line.strip()] for _, out, _ in results]


@pytest.mark.parametrize("workers", [2, 4])
def test_processes_adding_different_embeddings_at_once(tmp_path, textinv_home, workers):
    # A fresh registry: the processes also race to create the database and switch it to WAL.
    jobs = [["add", f"w{i}", str(100 * i), "8", "--family", "sdxl" if i % 2 else "sd1"] for i in range(workers)]
    outputs = _ok(run_together(jobs, tmp_path / "barrier"))
    assert all(all(r["created"] for r in out) and len(out) == 8 for out in outputs)
    rows = assert_consistent(textinv_home)
    assert sorted(name for name, _ in rows) == sorted(f"w{i}-{j}" for i in range(workers) for j in range(8))


def test_processes_adding_identical_embeddings_at_once(tmp_path, textinv_home):
    jobs = [["add", "same", "7", "8"], ["add", "same", "7", "8"]]
    outputs = _ok(run_together(jobs, tmp_path / "barrier"))
    rows = assert_consistent(textinv_home)
    assert sorted(name for name, _ in rows) == sorted(f"same-{j}" for j in range(8))
    for j in range(8):  # each embedding was created by exactly one of the two
        assert sum(out[j]["created"] for out in outputs) == 1
    assert len(_blobs(textinv_home)) == 8


def test_rm_racing_add_never_leaves_a_row_without_its_blob(tmp_path, textinv_home):
    jobs = [["churn", "<race>", "3", "30", "--remove"], ["churn", "<race>", "3", "30"]]
    outputs = _ok(run_together(jobs, tmp_path / "barrier"))
    assert [out[-1]["blobless"] for out in outputs] == [[], []]  # checked after every step
    assert_consistent(textinv_home)
    # the adder may finish last or not; either way one more add must find things coherent
    entry, _ = Registry().add(random_embedding("<race>", seed=3), source="imported", origin={})
    assert Registry().load(entry).content_sha256() == entry.sha256


# The two interleavings that could leave a row without its blob, forced deterministically
# through the registry's stage hook (the subprocess race above hits them only by chance).

def test_add_landing_between_rm_commit_and_blob_cleanup_keeps_its_blob(reg, monkeypatch):
    from textinv_cli.registry import store as registry

    emb = random_embedding()
    reg.add(emb, source="imported", origin={})
    other = Registry(reg.root)  # "another process"
    real = registry._crash_point

    def stage(name):
        if name == "before-unlink":  # rm has committed the row deletion; the blob is still there
            monkeypatch.setattr(registry, "_crash_point", real)
            assert other.add(emb, source="imported", origin={})[1]
        real(name)

    monkeypatch.setattr(registry, "_crash_point", stage)
    reg.remove("cat-toy")
    assert [e.name for e in reg.entries()] == ["cat-toy"]
    assert reg.load("cat-toy").content_sha256() == emb.content_sha256()


def test_add_whose_blob_vanishes_before_it_locks_rewrites_it(reg, monkeypatch):
    from textinv_cli.registry import store as registry

    emb = random_embedding()
    other = Registry(reg.root)
    real = registry._crash_point

    def stage(name):
        if name == "after-blob":  # meanwhile another process adds and removes the same content
            monkeypatch.setattr(registry, "_crash_point", real)
            other.add(emb, source="imported", origin={})
            other.remove("cat-toy")
            assert not reg.blob_path(emb.content_sha256()).exists()
        real(name)

    monkeypatch.setattr(registry, "_crash_point", stage)
    entry, created = reg.add(emb, source="imported", origin={})
    assert created and reg.load(entry).content_sha256() == emb.content_sha256()


# -- crashes ----------------------------------------------------------------------------------

def _crash_worker(textinv_home, stage, *args):
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TEXTINV_HOME": str(textinv_home), CRASH_ENV: stage})
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it really died at the hook


@pytest.mark.parametrize("stage", ["after-blob", "before-commit"])
def test_killed_while_adding_leaves_the_old_state(textinv_home, stage):
    kept, _ = Registry().add(random_embedding("<kept>", seed=1), source="imported", origin={})
    _crash_worker(textinv_home, stage, "add", "lost", "50", "1")
    rows = assert_consistent(textinv_home)
    assert rows == [("kept", kept.sha256)]
    lost = random_embedding("<lost-0>", seed=50)
    assert reg_blob_exists(textinv_home, lost.content_sha256())  # at worst an orphan blob
    entry, created = Registry().add(lost, source="imported", origin={})  # and it can be added again
    assert created and Registry().load(entry).content_sha256() == lost.content_sha256()


def test_killed_while_removing_leaves_at_worst_an_orphan(textinv_home):
    entry, _ = Registry().add(random_embedding(), source="imported", origin={})
    _crash_worker(textinv_home, "before-unlink", "remove", "cat-toy")
    assert assert_consistent(textinv_home) == []
    assert reg_blob_exists(textinv_home, entry.sha256)


def test_killed_at_a_random_moment(tmp_path, textinv_home):
    proc = subprocess.Popen([sys.executable, str(WORKER), "add", "many", "0", "10000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(5):  # let it get well into its loop, then kill it wherever it is
            assert proc.stdout.readline(), "worker died on its own"
        time.sleep(0.013)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    rows = assert_consistent(textinv_home)
    assert len(rows) >= 5


def reg_blob_exists(root: Path, sha: str) -> bool:
    return Registry(root).blob_path(sha).is_file()
