"""textinv rm NAME: remove an embedding from the local registry."""

from __future__ import annotations

import typer


def rm(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name (see `textinv list`)."),
    json_out: bool = typer.Option(False, "--json", help="Print the removed entry as JSON."),
) -> None:
    """Remove an embedding from the local registry.

    Its stored copy goes too; the file it was imported from is not touched. NAME may also be
    the name as `textinv list` shows it (escaped), for an entry whose name cannot be typed.
    """
    from ..console import console, print_json
    from ...registry.store import Registry, display_name
    from ...untrusted import shown

    registry = Registry()
    entry = registry.remove(name)
    # the active version went: the newest remaining one of its token takes over (registry/versions.py)
    now = next((e for e in registry.versions(entry.token) if e.active), None) if entry.active else None
    if json_out:
        print_json({"removed": entry.to_json(), **({"active": now.to_json()} if now else {})})
        return
    # NAME may be the escaped form `list` shows (a damaged row's name can hold anything): print
    # the row's values escaped too, never raw.
    console.print(f"Removed {display_name(entry.name)} ({shown(entry.token)}, {shown(entry.family)}, "
                  f"sha256 {shown(entry.short_sha)})", markup=False)
    if now is not None:
        console.print(f"{display_name(now.name)} is now the active {shown(now.token)} (the newest remaining version).",
                      markup=False)
