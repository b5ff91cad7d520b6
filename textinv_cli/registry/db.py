"""The registry's SQLite side: schema, connections, transactions, and sqlite's errors turned
into RegistryErrors a person can act on. store.py holds the rules; this holds the plumbing.

Every write is one `BEGIN IMMEDIATE` transaction in WAL mode with a busy timeout, so
writers queue for the one write lock instead of failing or deadlocking on a read->write
upgrade (see the invariants at the top of store.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import sqlite3
import time
from pathlib import Path

from ..errors import RegistryError
from ..families import FAMILIES
from .versions import choose_active

# 1: the first schema. 2: `active`: which of the entries sharing a token a prompt's token
# means (store.py, "Versions"); a version-1 registry reads as before and is migrated at its first write.
SCHEMA_VERSION = 2
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
    created   TEXT NOT NULL,              -- ISO 8601, UTC
    active    INTEGER NOT NULL DEFAULT 0  -- 1: the entry a prompt's token means (store.choose_active)
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
    # A tampered database can hold bytes that are not UTF-8 in a TEXT column; sqlite3's default
    # would fail the whole query. Decoded this way they come back as lone surrogates, which
    # decode_row reports as damage (and `textinv rm` can still match: names.py).
    conn.text_factory = _text
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# -- reading rows back: a row is data from a file the user (or anyone) may have edited -----------

COLUMNS = ("name", "token", "family", "n_vectors", "widths", "sha256", "source", "origin",
           "meta", "tags", "created")
# Not in COLUMNS: a version-1 row has no such column, and a tampered value is no damage (a flag
# the store only prefers: choose_active). Written by the store itself.
ACTIVE = "active"
JSON_COLUMNS = ("widths", "origin", "meta", "tags")
SOURCES = ("trained", "pulled", "imported")
# textinv writes a few KB per column (names.py caps metadata at 512K characters). The
# caps bound what a tampered row can cost: json.loads is ~25x its input in memory for `[[],[],..`
# and recursive, so it runs only on text under MAX_JSON_CHARS and RecursionError is damage too.
MAX_JSON_CHARS = 1 << 20
MAX_DEPTH = 32
MAX_NAME_CHARS = 1000  # registration allows 200 bytes (embedding.safe_name); anything longer was written by hand
SHA_RE = re.compile(r"[0-9a-f]{64}")
_EMPTY = {"widths": dict, "origin": dict, "meta": dict, "tags": list}


def decode_row(row) -> tuple[dict, str | None]:
    """The row as Entry's field values, and what is wrong with it (None: nothing). Never raises:
    a damaged row must still list, and `textinv rm` must still remove it.

    A damaged column gets a harmless stand-in (text as text, {} / [] / 0 for the rest), so
    callers can show the entry; Registry.load refuses a damaged entry."""
    values: dict = {}
    problems: list[str] = []
    for c in COLUMNS:
        raw = row[c]
        if c in JSON_COLUMNS:
            value, problem = _json_column(raw, c)
        elif c == "n_vectors":
            ok = type(raw) is int and 0 < raw < 1 << 31
            value, problem = (raw if ok else 0), (None if ok else "n_vectors is not a count")
        else:
            value, problem = _text_column(raw, c)
        values[c] = value
        if problem:
            problems.append(problem)
    if not problems:
        if not SHA_RE.fullmatch(values["sha256"]):
            problems.append("its sha256 is not a sha256")
        if values["source"] not in SOURCES or values["family"] not in FAMILIES:
            problems.append("its source or family is unknown")
        if not values["token"].strip() or not values["name"].strip():
            problems.append("its name or token is empty")
    return values, "; ".join(problems) or None


def mark_active(conn: sqlite3.Connection, token: str | None = None) -> None:
    """Set `active` on the one row per token that versions.choose_active picks (all tokens, or
    one), clear it on the rest. Inside a write transaction."""
    where, args = ("WHERE token = ?", (token,)) if token is not None else ("", ())
    rows = conn.execute(f"SELECT rowid, * FROM embeddings {where}", args).fetchall()
    by_token: dict = {}
    for row in rows:
        by_token.setdefault(as_text(row["token"]), []).append(row)
    for group in by_token.values():
        chosen = choose_active([(active_flag(r), as_text(r["created"]), r["rowid"], decode_row(r)[1] is not None)
                                for r in group])
        for i, row in enumerate(group):
            conn.execute(f"UPDATE embeddings SET {ACTIVE} = ? WHERE rowid = ?", (int(i == chosen), row["rowid"]))


def active_flag(row) -> bool:
    """The row's `active` flag: 1 only; a version-1 row (no column) or anything else is 0."""
    return ACTIVE in row.keys() and type(row[ACTIVE]) is int and row[ACTIVE] == 1


def as_text(raw) -> str:
    """A column's value as text, whatever a tampered row stored there (BLOB, number, NULL)."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "surrogateescape")
    return raw if isinstance(raw, str) else "" if raw is None else str(raw)


def _text_column(raw, column: str) -> tuple[str, str | None]:
    if not isinstance(raw, str) or sql_text(raw) is None:  # a BLOB, a number, NULL; bytes not UTF-8
        return as_text(raw), f"its {column} is not text"
    from ..untrusted import unsafe_chars

    if column in ("name", "token") and unsafe_chars(raw):
        return raw, f"its {column} holds invisible, control or non-UTF-8 characters"
    if column in ("name", "token") and len(raw) > MAX_NAME_CHARS:
        return raw, f"its {column} is {len(raw)} characters long"
    return raw, None


def _json_column(raw, column: str):
    empty = _EMPTY[column]()
    if not isinstance(raw, str) or sql_text(raw) is None:  # a BLOB, a number, bytes that are not UTF-8
        return empty, f"its {column} column is not JSON text"
    if len(raw) > MAX_JSON_CHARS:
        return empty, f"its {column} column is {len(raw) / 2**20:.1f} MiB (at most {MAX_JSON_CHARS >> 20} MiB)"
    try:
        value = json.loads(raw)
    except RecursionError:
        return empty, f"its {column} column is nested too deeply"
    except ValueError:  # JSONDecodeError, and ints past Python's digit limit
        return empty, f"its {column} column is not JSON"
    if not _shape_ok(value, column):
        return empty, f"its {column} column does not hold the expected {empty.__class__.__name__}"
    return value, None


def _shape_ok(value, column: str) -> bool:
    """widths {str: int}, meta {str: str}, tags [str], origin {str: any JSON at most MAX_DEPTH deep}."""
    if column == "widths":
        return isinstance(value, dict) and all(type(v) is int and v > 0 for v in value.values())
    if column == "meta":  # lone surrogates ("\ud800" in the JSON) could not go into a pushed file
        return isinstance(value, dict) and all(isinstance(v, str) and sql_text(k + v) is not None
                                               for k, v in value.items())
    if column == "tags":
        return isinstance(value, list) and all(isinstance(v, str) and sql_text(v) is not None for v in value)
    if not isinstance(value, dict):
        return False
    stack = [(value, 1)]  # iterative: the value may be ~1000 deep (json.loads' own limit)
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def sql_text(text: str) -> str | None:
    """`text` if sqlite can bind it; None for a str with lone surrogates (a non-UTF-8 argv)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return None


def find_row(conn: sqlite3.Connection, name: str):
    """The row named `name`, else the one row whose name is shown as `name` (escaped, maybe cut:
    names.display_name), so a row with an untypeable name can still be named. None if
    there is no such row; RegistryError if several rows show the same."""
    from .names import matches_shown
    from ..untrusted import quoted

    text = sql_text(name)
    if text is not None:
        row = conn.execute("SELECT rowid, * FROM embeddings WHERE name = ?", (text,)).fetchone()
        if row is not None:
            return row
    hits = [r["rowid"] for r in conn.execute("SELECT rowid, name FROM embeddings")
            if r["name"] != name and matches_shown(as_text(r["name"]), name)]
    if len(hits) > 1:
        raise RegistryError(f"{len(hits)} registry entries are shown as {quoted(name)}.",
                            DAMAGED_DB_HINT)
    return conn.execute("SELECT rowid, * FROM embeddings WHERE rowid = ?", hits).fetchone() if hits else None


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
    elif version == 1:
        # Version 1 had no notion of an active entry: the rows that share a token get one, the
        # one the store's rule picks (the newest), and `list` says so for every shared token.
        conn.execute(f"ALTER TABLE embeddings ADD COLUMN {ACTIVE} INTEGER NOT NULL DEFAULT 0")
        mark_active(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
