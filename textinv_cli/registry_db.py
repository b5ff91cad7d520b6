"""The registry's SQLite side: schema, connections, transactions, and sqlite's errors turned
into RegistryErrors a person can act on. registry.py holds the rules; this holds the plumbing.

Every write is one `BEGIN IMMEDIATE` transaction in WAL mode with a busy timeout, so
writers queue for the one write lock instead of failing or deadlocking on a read->write
upgrade (see the invariants at the top of registry.py).
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import time
from pathlib import Path

from .errors import RegistryError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE embeddings (
    name      TEXT PRIMARY KEY,
    token     TEXT NOT NULL,
    family    TEXT NOT NULL,
    n_vectors INTEGER NOT NULL,
    widths    TEXT NOT NULL,              -- JSON {slot: width}
    sha256    TEXT NOT NULL,              -- of the blob = Embedding.content_sha256()
    source    TEXT NOT NULL CHECK (source IN ('trained', 'pulled', 'imported')),
    origin    TEXT NOT NULL,              -- JSON: file path + sha256, hub repo + commit, run + config
    meta      TEXT NOT NULL,              -- JSON: the embedding's meta dict
    tags      TEXT NOT NULL,              -- JSON list
    created   TEXT NOT NULL               -- ISO 8601, UTC
);
CREATE INDEX embeddings_sha256 ON embeddings (sha256);
CREATE INDEX embeddings_token ON embeddings (token);
"""

NOTHING_CHANGED = "nothing was registered or changed"
_ERRNO_WHY = {errno.ENOSPC: "full", errno.EDQUOT: "full",
              errno.EROFS: "readonly", errno.EACCES: "readonly", errno.EPERM: "readonly"}
# Each blob is a whole embedding (safetensors), so a new index can be refilled from them;
# but once rows are gone, `list --repair` sees those blobs as orphans.
DAMAGED_DB_HINT = ("Move registry.db aside to start afresh, then `textinv import` the files in blobs/ "
                   "you want to keep (before any `textinv list --repair`).")


def connect(db_path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


def unwritable(root: Path, why: str | OSError) -> RegistryError:
    """The one wording for "the registry cannot be written to", whether sqlite or a blob
    write found out. `why`: "full", "readonly", or the OSError of the write."""
    if isinstance(why, OSError):
        why = _ERRNO_WHY.get(why.errno, why.strerror or str(why))
    reason = {"full": "the disk is full", "readonly": "it is read-only"}.get(why, why)
    hint = {"full": "Free some disk space, or set TEXTINV_HOME to a folder on another disk.",
            "readonly": f"Make {root} writable, or set TEXTINV_HOME to a writable folder."}.get(
        why, "Check the folder's permissions and free space, or set TEXTINV_HOME to another folder.")
    return RegistryError(f"Cannot write to the registry at {root}: {reason}; {NOTHING_CHANGED}.", hint)


@contextlib.contextmanager
def guard(root: Path, db_path: Path):
    """sqlite errors become RegistryErrors that say which file and what to do."""
    try:
        yield
    except sqlite3.OperationalError as e:
        # The error name is stable across sqlite versions; the message text is the fallback.
        code, text = getattr(e, "sqlite_errorname", "") or "", str(e)
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text or "busy" in text:
            raise RegistryError(f"The registry at {root} stayed busy for {BUSY_TIMEOUT_S:.0f} s.",
                                "Another textinv process is writing to it; try again.") from None
        if code.startswith("SQLITE_FULL") or "disk is full" in text:
            raise unwritable(root, "full") from None
        if code.startswith("SQLITE_READONLY") or "readonly" in text:
            raise unwritable(root, "readonly") from None
        raise RegistryError(f"The registry database {db_path} cannot be used: {e}.",
                            "Check the folder's permissions and free space.") from None
    except sqlite3.DatabaseError as e:
        raise RegistryError(
            f"The registry database {db_path} is damaged: {e}.",
            DAMAGED_DB_HINT) from None


def check_version(root: Path, conn: sqlite3.Connection) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RegistryError(
            f"The registry at {root} was written by a newer textinv (schema {version}).",
            "Upgrade textinv: pip install -U textinv.")
    return version


@contextlib.contextmanager
def read(root: Path, db_path: Path, connect_fn=connect):
    """A connection for reading, or None when there is no registry yet (= empty)."""
    if not db_path.exists():
        yield None
        return
    with guard(root, db_path):
        conn = connect_fn(db_path)
        try:
            yield conn if check_version(root, conn) > 0 else None
        finally:
            conn.close()


@contextlib.contextmanager
def write(root: Path, db_path: Path, connect_fn=connect):
    """One BEGIN IMMEDIATE transaction: committed when the block ends, rolled back if it raises."""
    with guard(root, db_path):
        conn = connect_fn(db_path)
        try:
            enable_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                if check_version(root, conn) < SCHEMA_VERSION:
                    migrate(conn)
                yield conn
            except BaseException:
                if conn.in_transaction:  # sqlite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")  # a failed COMMIT leaves the transaction open: close() rolls it back
        finally:
            conn.close()


def enable_wal(conn: sqlite3.Connection) -> None:
    # WAL is a property of the file, set once. While several processes create the
    # registry at the same moment, switching can report "locked" without waiting
    # on the busy handler, so retry within the same budget.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; runs inside the write transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
