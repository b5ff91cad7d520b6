"""The local registry: an SQLite index plus a content-addressed blob store (ARCHITECTURE.md, "Registry").

Layout under `home()`:
    registry.db                      one row per embedding (name is the key)
    blobs/<sha256>.safetensors       Embedding.canonical_bytes(), named by their sha256

Why it is safe with several processes and with crashes:
- The database runs in WAL mode with a busy timeout, and every write happens inside
  `BEGIN IMMEDIATE`, so writers queue for the one write lock instead of failing or
  deadlocking on a read->write upgrade.
- A blob is written (temp + fsync + rename) before the row that points at it commits,
  so a crash leaves at worst an orphan blob, never a row without its blob.
- Blobs are only ever deleted while holding the write lock and after the row deletion
  has committed; a writer that is about to insert a row re-checks its blob under that
  same lock. So `rm` racing an `add` of the same content cannot leave a row blobless.
- Orphan blobs and temp files left by a crash are never served (only rows lead to blobs);
  `textinv list --repair` (registry/repair.py) removes them under the same write lock.
- A full or read-only disk, at the blob write or at the commit, is a RegistryError, and
  the add takes back the blob it wrote: nothing is registered, nothing is left behind.

What may be registered (names, tokens, metadata) is registry/names.py's rule, checked before
anything is written. What is read back is never trusted: registry.db is a file anyone can
edit, so a row is decoded without raising (db.decode_row) and a damaged one becomes
an Entry with `damaged` set, listed and removable (by the name as `list` shows it), never loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shlex
import signal
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from . import db as registry_db
from ..errors import NotFoundError, RegistryError
from .db import ACTIVE, COLUMNS as _COLUMNS, JSON_COLUMNS as _JSON_COLUMNS, SHA_RE, SOURCES
from . import edits
from .entry import Entry, entries_from_rows, entry_from_row, with_active
from .names import check_name, check_tag, check_token, clean_meta, display_name, readd_hint, rm_command
from .versions import next_name
from ..untrusted import quoted, shown

if TYPE_CHECKING:  # numpy comes with Embedding; keep `import textinv_cli.registry.store` light
    from ..embedding import Embedding

DB_NAME = "registry.db"
BLOB_DIR = "blobs"
# Test hook: tests/registry_worker.py sets this to SIGKILL the process at a named point of
# a write, to prove a crash there leaves a consistent registry. Unset in normal use.
CRASH_ENV = "TEXTINV_REGISTRY_CRASH_AT"


def home() -> Path:
    """Where the registry lives: $TEXTINV_HOME, else the platform's user data folder."""
    env = os.environ.get("TEXTINV_HOME", "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("textinv"))


def _crash_point(stage: str) -> None:
    if os.environ.get(CRASH_ENV) == stage:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # microseconds: versions registered within one second keep their order


class Registry:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else home()
        self.db_path = self.root / DB_NAME
        self.blob_dir = self.root / BLOB_DIR

    # -- public API -----------------------------------------------------------
    def add(self, emb, *, name: str | None = None, source: str, origin: dict,
            tags=(), on_taken: str = "error") -> tuple[Entry, bool]:
        """Register `emb`; (entry, True) if new, (existing entry, False) if the content is known.

        The new entry becomes the active one for its token (versions.py). Without `name` it is
        named after the token, or the next free version name (cat-toy-v2) when that is taken;
        a taken `name` is a RegistryError, or with on_taken="version" the next free version
        name (a finished training run is registered, whatever took its name meanwhile)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        # Validate before anything touches the disk: a bad token or name must write nothing.
        # The token first: it is also the default name, and --token fixes both.
        from ..redact import known_tokens

        secrets = known_tokens()
        check_token(emb.token, secrets)
        versioned = name is None or on_taken == "version"
        name = check_name(name if name is not None else emb.token, known=secrets)
        meta = clean_meta(emb.meta, secrets)
        tags = list(dict.fromkeys(check_tag(t) for t in tags))
        data = emb.canonical_bytes()
        sha = hashlib.sha256(data).hexdigest()

        # Cheap read-only checks first, so the common "already there" / "name taken"
        # cases neither fsync a blob nor leave an orphan. They are repeated under the lock.
        known, clash = self._precheck(sha, name)
        if known is not None:
            return known, False
        if clash is not None and not versioned:
            raise self.clash_error(name, clash)

        self._ensure_dirs()
        self._check_writable()
        wrote = self._write_blob(sha, data)  # outside the lock: fsync is the slow part
        _crash_point("after-blob")
        entry = Entry(name=name, token=emb.token, family=emb.family, n_vectors=emb.n_vectors,
                      widths=dict(emb.widths), sha256=sha, source=source, origin=dict(origin or {}),
                      meta=meta, tags=tags, created=_now())
        try:
            return self._insert(entry, data, versioned=versioned)
        except RegistryError:
            # e.g. the disk filled up at the commit: take back the blob this call added
            # (a name clash has already done so under the lock).
            if wrote and self.blob_path(sha).exists():
                self._drop_blob_if_unused(sha)
            raise

    def _insert(self, entry: Entry, data: bytes, *, versioned: bool) -> tuple[Entry, bool]:
        """The locked half of add(): re-check everything, then insert the row, active."""
        sha, name = entry.sha256, entry.name
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM embeddings WHERE sha256 = ? ORDER BY name LIMIT 1",
                               (sha,)).fetchone()
            if row is not None:  # another process registered the same content meanwhile
                return with_active(conn, entry_from_row(row)), False
            row = conn.execute("SELECT * FROM embeddings WHERE name = ?", (name,)).fetchone()
            if row is not None and versioned:  # the next free version name, chosen under the lock
                taken = {registry_db.as_text(r["name"]) for r in conn.execute("SELECT name FROM embeddings")}
                entry.name = name = check_name(next_name(name, taken))
            elif row is not None:
                self._unlink_blob_if_unused(conn, sha)  # we hold the lock: no one can need it now
                raise self.clash_error(name, entry_from_row(row))
            if not self.blob_path(sha).is_file():  # a concurrent `rm` removed it after we wrote it
                self._write_blob(sha, data)
            conn.execute(
                f"INSERT INTO embeddings ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                tuple(json.dumps(getattr(entry, c), sort_keys=True) if c in _JSON_COLUMNS
                      else getattr(entry, c) for c in _COLUMNS))
            # the newest registration of a token is the one its prompts mean (versions.py)
            conn.execute(f"UPDATE embeddings SET {ACTIVE} = (name = ?) WHERE token = ?", (name, entry.token))
            entry.active = True
            _crash_point("before-commit")
        return entry, True

    def get(self, name: str) -> Entry | None:
        """By name, or by the name as `list` shows it (a damaged row's name may not be typeable)."""
        with self._read() as conn:
            if conn is None:
                return None
            row = registry_db.find_row(conn, name)
            return with_active(conn, entry_from_row(row)) if row is not None else None

    def resolve(self, name_or_token: str) -> Entry:
        """By name; else the active entry of a token ("<cat-toy>"); else of a token without brackets."""
        entry = self.get(name_or_token)
        if entry is not None:
            return entry
        everything = self.entries()
        wanted = name_or_token.strip()
        for match in (lambda e: e.token == wanted,
                      lambda e: e.token.strip().strip("<>").strip() == wanted.strip("<>").strip()):
            hits = [e for e in everything if match(e) and e.active]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:  # "cat" for both <cat> and cat: different tokens
                raise RegistryError(
                    f"{quoted(name_or_token)} could mean the tokens "
                    + ", ".join(shown(e.token) for e in hits[:10]) + ".",
                    f"Name the entry instead: {', '.join(display_name(e.name) for e in hits[:10])}.")
        raise self.not_found(name_or_token, everything)

    def versions(self, token: str) -> list[Entry]:
        """Every entry with this token, oldest first; the active one has `active` set."""
        return sorted((e for e in self.entries() if e.token == token), key=lambda e: e.created)

    def load(self, name_or_entry) -> Embedding:
        """The embedding from its blob, after checking the blob still has the recorded sha256."""
        from ..embedding import FAMILY_META, Embedding
        from ..errors import TextinvError
        from ..formats.safetensors_io import load_safetensors

        entry = name_or_entry if isinstance(name_or_entry, Entry) else self.resolve(name_or_entry)
        fix = readd_hint(entry.name, entry.origin)
        if entry.damaged:
            raise RegistryError(f"The registry entry '{display_name(entry.name)}' is damaged: {entry.damaged}.", fix)
        path = self.blob_path(entry.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"The stored copy of '{display_name(entry.name)}' is missing ({path}).", fix) from None
        except OSError as e:
            raise RegistryError(f"Cannot read the stored copy of '{display_name(entry.name)}': {e}.", fix) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256:
            raise RegistryError(
                f"The stored copy of '{display_name(entry.name)}' is corrupt: its sha256 is {actual[:12]}, "
                f"expected {entry.sha256[:12]} ({path}).", fix)
        try:
            tensors, meta = load_safetensors(data, source=str(path))
            # The blob (hash-checked) holds the family where the slots do not say it
            return Embedding(token=meta.get("textinv.token", entry.token), vectors=tensors,
                             meta=dict(entry.meta), family_declared=meta.get(FAMILY_META) or None)
        except TextinvError as e:  # hash matched, so only a bug could get here; say where
            raise RegistryError(f"The stored copy of '{display_name(entry.name)}' cannot be read: {e.message}",
                                fix) from None

    def entries(self, *, family: str | None = None, source: str | None = None) -> list[Entry]:
        with self._read() as conn:
            if conn is None:
                return []
            out = entries_from_rows(conn.execute("SELECT rowid, * FROM embeddings ORDER BY name").fetchall())
        return [e for e in out if (family is None or e.family == family) and (source is None or e.source == source)]

    # -- changing an entry: edits.py ---------------------------------------------------------
    def use(self, name: str) -> tuple[Entry, Entry | None]:
        """Make `name` the active entry of its token; (it, the one that was active before)."""
        return edits.use(self, name)

    def rename(self, old: str, new: str) -> Entry:
        """Give the entry `old` the name `new` (free, and allowed by names.check_name)."""
        return edits.rename(self, old, new)

    def set_tags(self, name: str, add=(), remove=()) -> Entry:
        """Add and remove tags of an entry (each tag once, in the order first given)."""
        return edits.set_tags(self, name, add, remove)

    def remove(self, name: str) -> Entry:
        """Delete the row; the blob goes too unless another row still points at it."""
        if not self.db_path.exists():
            raise self.not_found(name, [])
        with self.transaction() as conn:
            row = registry_db.find_row(conn, name)
            entry = entry_from_row(row) if row is not None else None
            if row is not None:  # by rowid: a damaged row's name may not even be bindable text
                entry = with_active(conn, entry)
                conn.execute("DELETE FROM embeddings WHERE rowid = ?", (row["rowid"],))
                if entry.active:  # the newest remaining version takes over (versions.py)
                    registry_db.mark_active(conn, row["token"])
        if entry is None:
            raise self.not_found(name, self.entries())
        if not SHA_RE.fullmatch(entry.sha256):
            return entry  # a damaged row that names no blob: nothing more to delete
        # The deletion is committed; only now may the blob go (a crash before this point
        # must leave the row AND its blob). A second locked step, because an `add` of the
        # same content may have slipped in between and now needs the blob.
        _crash_point("before-unlink")
        with self.transaction() as conn:
            self._unlink_blob_if_unused(conn, entry.sha256)
        return entry

    def repair(self, *, grace_s: float | None = None):
        """Remove what crashes leave behind and report damage; see repair.py."""
        from .repair import GRACE_S, repair

        return repair(self, grace_s=GRACE_S if grace_s is None else grace_s)

    def blob_path(self, sha256: str) -> Path:
        if not SHA_RE.match(sha256 or ""):  # a damaged row must never steer a path
            raise RegistryError(f"Invalid sha256 in the registry: {quoted(sha256)}.",
                                "Find the damaged entry with `textinv list --repair`, and remove it as it says.")
        return self.blob_dir / f"{sha256}.safetensors"

    # -- internals --------------------------------------------------------------
    def _precheck(self, sha: str, name: str) -> tuple[Entry | None, Entry | None]:
        """(row with this content, row holding this name), from one read snapshot: read
        separately, a concurrent add of the same content could look like a name clash."""
        with self._read() as conn:
            if conn is None:
                return None, None
            conn.execute("BEGIN")
            try:
                known = conn.execute("SELECT * FROM embeddings WHERE sha256 = ? ORDER BY name LIMIT 1",
                                     (sha,)).fetchone()
                clash = conn.execute("SELECT * FROM embeddings WHERE name = ?", (name,)).fetchone()
                known_entry = with_active(conn, entry_from_row(known)) if known else None
            finally:
                conn.execute("COMMIT")
            return known_entry, (entry_from_row(clash) if clash else None)

    def clash_error(self, name: str, existing: Entry, *, renaming: str | None = None) -> RegistryError:
        free = self.free_name(name)
        return RegistryError(
            f"The name {quoted(name)} is already taken by a different embedding "
            f"({shown(existing.token)}, sha256 {shown(existing.short_sha)}, {shown(existing.source)} "
            f"{shown(existing.created)}).",
            (f"Pick a free name: `textinv mv {shlex.quote(display_name(renaming))} {shlex.quote(display_name(free))}`, "
             f"or `{rm_command(name)}` first." if renaming is not None else
             f"Pass --name {shlex.quote(display_name(free))} (or leave --name out: the next free version name is "
             f"taken), or `{rm_command(name)}` first."))

    def free_name(self, name: str) -> str:
        """The name itself when free, else the next free version name (versions.next_name)."""
        taken = {e.name for e in self.entries()}
        return name if name not in taken else next_name(name, taken)

    def not_found(self, name: str, entries: list[Entry]) -> NotFoundError:
        if not entries:
            return NotFoundError(
                f"No embedding named {quoted(name)}: the registry is empty.",
                "Add one with `textinv import FILE`, `textinv pull REPO` or `textinv train`.")
        by_key = {e.name: e.name for e in entries}
        by_key.update({e.token: e.name for e in entries if e.token not in by_key})
        close = []
        for key in difflib.get_close_matches(name, list(by_key), n=5, cutoff=0.6):
            if by_key[key] not in close:
                close.append(by_key[key])
        hint = (f"Did you mean: {', '.join(map(display_name, close))}? " if close else "") \
            + "See `textinv list` for all names."
        return NotFoundError(f"No embedding named {quoted(name)} in the registry.", hint)

    def _ensure_dirs(self) -> None:
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"Cannot create the registry at {self.root}: {e.strerror or e}.",
                                "Set TEXTINV_HOME to a writable folder.") from None

    def _check_writable(self) -> None:
        """Refuse a read-only registry before writing a blob: if sqlite refused the row
        afterwards, the blob could not be taken back (that needs the write lock) and would
        stay as an orphan until `textinv list --repair`."""
        for path in (self.blob_dir, self.db_path):
            if path.exists() and not os.access(path, os.W_OK):
                raise registry_db.unwritable(self.root, "readonly")

    def _write_blob(self, sha: str, data: bytes) -> bool:
        """Content-addressed, so an existing intact blob is already right; a damaged one is
        replaced. True if this call wrote it. A write that fails writes nothing (the temp
        file goes) and says why: a full or read-only disk is a RegistryError."""
        from ..writes import atomic_write_bytes

        path = self.blob_path(sha)
        with contextlib.suppress(OSError):
            if hashlib.sha256(path.read_bytes()).hexdigest() == sha:
                # Mark it fresh: `list --repair` spares recent blobs, and this one (maybe an
                # orphan until now) is about to get its row.
                os.utime(path)
                return False
        try:
            try:
                atomic_write_bytes(path, data, force=True)
            except FileNotFoundError:
                # Our temp file vanished before the rename: only a repair that judged it
                # abandoned (this process paused past the grace period) does that. Once more.
                atomic_write_bytes(path, data, force=True)
        except OSError as e:
            raise registry_db.unwritable(self.root, e) from None
        return True

    def _unlink_blob_if_unused(self, conn: sqlite3.Connection, sha: str) -> None:
        """Only called inside a write transaction, so no row can start using the blob meanwhile.
        A blob that cannot be deleted (read-only disk) stays as an orphan, which is harmless:
        nothing serves it and `textinv list --repair` removes it later."""
        if conn.execute("SELECT 1 FROM embeddings WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() is None:
            with contextlib.suppress(OSError):
                self.blob_path(sha).unlink()

    def _drop_blob_if_unused(self, sha: str) -> None:
        """Best effort after a failed add: the error being reported matters more than the orphan."""
        with contextlib.suppress(RegistryError):
            with self.transaction() as conn:
                self._unlink_blob_if_unused(conn, sha)

    def _connect(self, db_path: Path) -> sqlite3.Connection:  # tests wrap it to inject sqlite faults
        return registry_db.connect(db_path)

    def _read(self):
        """A connection for reading, or None when there is no registry yet (= empty)."""
        return registry_db.read(self.root, self.db_path, self._connect)

    @contextlib.contextmanager
    def transaction(self):
        """One BEGIN IMMEDIATE transaction under the registry's write lock: committed when the block
        ends, rolled back if it raises. Public for `list --repair` (repair.py), which must hold it too."""
        self._ensure_dirs()
        with registry_db.write(self.root, self.db_path, self._connect) as conn:
            yield conn
