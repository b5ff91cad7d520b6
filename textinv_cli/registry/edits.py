"""Changing a registered entry in place: which version is active (`textinv use`), its name
(`textinv mv`), its tags (`textinv tag`). Each is one write transaction (store.py's rules);
content and blobs never change here.
"""

from __future__ import annotations

import json

from . import db as registry_db
from ..errors import RegistryError
from .db import ACTIVE
from .entry import Entry, entries_from_rows, entry_from_row, with_active
from .names import check_name, check_tag, display_name, readd_hint


def _row(reg, conn, name: str):
    row = registry_db.find_row(conn, name)
    if row is None:
        raise reg.not_found(name, reg.entries())
    return row


def _undamaged(entry: Entry, what: str) -> Entry:
    if entry.damaged:
        raise RegistryError(f"{display_name(entry.name)} is damaged ({entry.damaged}); {what}.",
                            readd_hint(entry.name, entry.origin))
    return entry


def use(reg, name: str) -> tuple[Entry, Entry | None]:
    """Make `name` the active entry of its token; (it, the one that was active before, if another)."""
    with reg.transaction() as conn:
        row = _row(reg, conn, name)
        entry = _undamaged(with_active(conn, entry_from_row(row)), "it cannot be used")
        rows = conn.execute("SELECT rowid, * FROM embeddings WHERE token = ?", (row["token"],)).fetchall()
        before = next((e for e in entries_from_rows(rows) if e.active), None)
        conn.execute(f"UPDATE embeddings SET {ACTIVE} = (rowid = ?) WHERE token = ?", (row["rowid"], row["token"]))
        entry.active = True
    return entry, (before if before is not None and before.name != entry.name else None)


def rename(reg, old: str, new: str) -> Entry:
    """Give the entry `old` the name `new` (free, and allowed by names.check_name)."""
    from ..redact import known_tokens

    new = check_name(new, known=known_tokens())
    with reg.transaction() as conn:
        row = _row(reg, conn, old)
        if registry_db.as_text(row["name"]) != new:
            clash = conn.execute("SELECT * FROM embeddings WHERE name = ?", (new,)).fetchone()
            if clash is not None:
                raise reg.clash_error(new, entry_from_row(clash), renaming=registry_db.as_text(row["name"]))
            conn.execute("UPDATE embeddings SET name = ? WHERE rowid = ?", (new, row["rowid"]))
        row = conn.execute("SELECT rowid, * FROM embeddings WHERE rowid = ?", (row["rowid"],)).fetchone()
        return with_active(conn, entry_from_row(row))


def set_tags(reg, name: str, add=(), remove=()) -> Entry:
    """Add and remove tags of an entry (each tag once, in the order first given)."""
    add, remove = [check_tag(t) for t in add], {check_tag(t) for t in remove}
    with reg.transaction() as conn:
        row = _row(reg, conn, name)
        entry = _undamaged(entry_from_row(row), "its tags cannot change")
        entry.tags = [t for t in dict.fromkeys([*entry.tags, *add]) if t not in remove]
        conn.execute("UPDATE embeddings SET tags = ? WHERE rowid = ?", (json.dumps(entry.tags), row["rowid"]))
        return with_active(conn, entry)
