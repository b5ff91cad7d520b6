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

    entry = Registry().remove(name)
    if json_out:
        print_json({"removed": entry.to_json()})
        return
    # NAME may be the escaped form `list` shows (a damaged row's name can hold anything): print
    # the row's values escaped too, never raw.
    console.print(f"Removed {display_name(entry.name)} ({shown(entry.token)}, {shown(entry.family)}, "
                  f"sha256 {shown(entry.short_sha)})", markup=False)
