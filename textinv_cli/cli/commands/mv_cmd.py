"""textinv mv OLD NEW: rename a registry entry (its token, content and active state stay)."""

from __future__ import annotations

import typer


def mv(
    old: str = typer.Argument(..., metavar="OLD", help="Registry name now (see `textinv list`)."),
    new: str = typer.Argument(..., metavar="NEW", help="The new name (free; a plain name such as cat-toy-best)."),
    json_out: bool = typer.Option(False, "--json", help="Print the renamed entry as JSON."),
) -> None:
    """Rename a registry entry. Its token does not change: prompts type the token, or the new
    name as a word (as A1111 types an embedding's file name)."""
    from ..console import console, print_json
    from ...registry.names import display_name
    from ...registry.store import Registry
    from ...untrusted import shown

    entry = Registry().rename(old, new)
    if json_out:
        print_json({"renamed": old, "entry": entry.to_json()})
        return
    console.print(f"Renamed {shown(old)} to {display_name(entry.name)} ({shown(entry.token)}"
                  f"{', active' if entry.active else ''}).", markup=False)
