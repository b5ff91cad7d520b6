"""Versions: several registry entries may share a token; one of them is *active*.

The model (the one rule for every command):
- A name is unique; a token is unique among *active* entries. A prompt's `<cat-toy>` means
  the active entry with that token; `sample --use NAME` picks another for one run, `textinv
  use NAME` makes it the active one for good.
- Registering a token that is already registered (train, import, pull) adds a new version
  and makes it active. Without --name it is named after the token, then NAME-v2, NAME-v3...:
  the first free one. Identical content is stored once and changes nothing.
- Removing the active entry makes the newest remaining version active.
- Which one is active is `choose_active`'s rule, applied to the rows' `active` flags: the
  flagged one, else the newest (created, then insertion order). A version-1 registry (no
  flags) and a tampered one (several flagged) still read deterministically, and `list` says
  which one is active for every shared token.

Pure Python and no registry imports, so db.py (the migration) and store.py share it.
"""

from __future__ import annotations

import re
import shlex

_VERSIONED = re.compile(r"(.+)-v(\d{1,6})")


def choose_active(candidates) -> int | None:
    """Index of the active one of the rows sharing a token: (flagged, created, rowid, damaged)
    tuples. Damaged rows are never active; None when all are damaged."""
    best = None
    for i, (flagged, created, rowid, damaged) in enumerate(candidates):
        if damaged:
            continue
        key = (bool(flagged), str(created), int(rowid))
        if best is None or key > best[0]:
            best = (key, i)
    return None if best is None else best[1]


def next_name(base: str, taken) -> str:
    """The first free version name after `base`: cat-toy -> cat-toy-v2; cat-toy-v2 -> cat-toy-v3."""
    m = _VERSIONED.fullmatch(base)
    stem, n = (m[1], int(m[2]) + 1) if m else (base, 2)
    while f"{stem}-v{n}" in taken:
        n += 1
    return f"{stem}-v{n}"


def use_command(name: str) -> str:
    from .names import display_name

    return f"textinv use {shlex.quote(display_name(name))}"


def switch_note(entry, versions) -> str | None:
    """One line after `entry` was registered or made active, when other entries share its
    token: which one prompts now use and how to go back. None when it is the only one."""
    from ..untrusted import shown
    from .names import display_name

    others = [v for v in versions if v.name != entry.name and not v.damaged]
    if not others:
        return None
    listed = ", ".join(display_name(v.name) for v in others[:5]) + (", ..." if len(others) > 5 else "")
    newest_other = max(others, key=lambda v: v.created)
    if entry.active:
        return (f"{display_name(entry.name)} is now the active {shown(entry.token)} (prompts with "
                f"{shown(entry.token)} use it); also registered: {listed}. "
                f"Switch back with `{use_command(newest_other.name)}`.")
    active = next((v for v in others if v.active), None)
    return (f"{display_name(entry.name)} is not the active {shown(entry.token)}: prompts use "
            f"{display_name(active.name) if active else '?'}. Use this one with `{use_command(entry.name)}`, "
            f"or for one run with `{sample_command(entry)}`.")


def sample_command(entry) -> str:
    """A sample command that uses `entry` for one run: its token in the prompt, --use its name."""
    from .names import display_name

    return (f"textinv sample {shlex.quote('a photo of ' + entry.token)} "
            f"--use {shlex.quote(display_name(entry.name))}")
