"""textinv tag NAME TAG...: add (or --remove) tags of a registry entry; `list --tag` filters by them."""

from __future__ import annotations

from typing import List

import typer


def tag(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name (see `textinv list`)."),
    tags: List[str] = typer.Argument(..., metavar="TAG...", help="Tags to add (or remove, with --remove)."),
    remove: bool = typer.Option(False, "--remove", help="Remove these tags instead of adding them."),
    json_out: bool = typer.Option(False, "--json", help="Print the entry as JSON."),
) -> None:
    """Add tags to a registry entry, or remove them with --remove.

    Tags show in `textinv list`, which filters by them (--tag) and searches them (--search).
    """
    from ..console import console, print_json
    from ...registry.names import display_name
    from ...registry.store import Registry
    from ...untrusted import shown

    entry = Registry().set_tags(name, remove=tags) if remove else Registry().set_tags(name, add=tags)
    if json_out:
        print_json(entry.to_json())
        return
    now = ", ".join(shown(t) for t in entry.tags) or "none"
    console.print(f"{display_name(entry.name)}: tags {now}.", markup=False)
