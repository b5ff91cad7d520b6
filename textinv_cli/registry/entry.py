"""A registered embedding as the registry reports it: one row of registry.db, decoded.

Apart from the store so that `textinv list --repair` (repair.py) reads rows the same way
without importing the store that calls it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass

from . import db as registry_db
from .names import display_name, rm_command


@dataclass
class Entry:
    name: str
    token: str
    family: str
    n_vectors: int
    widths: dict           # {slot: width}
    sha256: str            # of the blob, = Embedding.content_sha256()
    source: str            # trained / pulled / imported
    origin: dict           # {"path", "file_sha256"} | {"repo", "commit"} | {"run", "config"}
    meta: dict             # the embedding's meta dict
    tags: list
    created: str           # ISO 8601 UTC, e.g. 2024-05-01T12:34:56Z
    # Whether a prompt's token means this entry (versions.py); set by the store, which sees
    # the other rows sharing the token.
    active: bool = False
    # What is wrong with the row it was read from (db.decode_row), or None. A damaged
    # entry is listed and can be removed, but never loaded.
    damaged: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        if out["damaged"] is None:
            del out["damaged"]
        return out

    @property
    def damage_note(self) -> str:
        """One line for `list`: which entry is damaged, why, and the command that removes it."""
        return f"{display_name(self.name)} is damaged ({self.damaged}): remove it with `{rm_command(self.name)}`."

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]


def entry_from_row(row: sqlite3.Row) -> Entry:
    """Never raises: a damaged row becomes an Entry with `damaged` set (see db.decode_row)."""
    values, damaged = registry_db.decode_row(row)
    return Entry(**values, damaged=damaged)


def entries_from_rows(rows) -> list[Entry]:
    """The rows (read with their rowid) as Entries, in order, each token's active one marked
    (versions.choose_active over the rows given: pass all rows of a token)."""
    from .versions import choose_active

    entries = [entry_from_row(r) for r in rows]
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(registry_db.as_text(row["token"]), []).append(i)
    for members in groups.values():
        chosen = choose_active([(registry_db.active_flag(rows[i]), entries[i].created, rows[i]["rowid"],
                                 entries[i].damaged is not None) for i in members])
        if chosen is not None:
            entries[members[chosen]].active = True
    return entries


def with_active(conn: sqlite3.Connection, entry: Entry) -> Entry:
    """`entry` with `active` as all the rows sharing its token decide."""
    rows = conn.execute("SELECT rowid, * FROM embeddings WHERE token = ?",
                        (registry_db.sql_text(entry.token) or "",)).fetchall()
    entry.active = any(e.active and e.name == entry.name for e in entries_from_rows(rows))
    return entry
