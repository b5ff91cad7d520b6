"""textinv rm NAME: remove an embedding from the local registry."""

from __future__ import annotations

import typer


def rm(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name (see `textinv list`)."),
    json_out: bool = typer.Option(False, "--json", help="Print the removed entry as JSON."),
) -> None:
    """Remove an embedding from the local registry.

    Its stored copy goes too; the file it was imported from is not touched.
    """
    from ..console import console, print_json
    from ..registry import Registry

    entry = Registry().remove(name)
    if json_out:
        print_json({"removed": entry.to_json()})
        return
    console.print(f"Removed {entry.name} ({entry.token}, {entry.family}, sha256 {entry.short_sha})", markup=False)
