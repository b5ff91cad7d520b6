"""textinv use NAME: make a registry entry the one its token means in prompts (registry/versions.py)."""

from __future__ import annotations

import typer


def use(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name of the version to make active (see `textinv list`)."),
    json_out: bool = typer.Option(False, "--json", help="Print the entry (and the one it replaced) as JSON."),
) -> None:
    """Make NAME the active entry of its token: prompts with the token use it from now on.

    Several entries share a token when it was trained or imported again (cat-toy, cat-toy-v2);
    `textinv sample ... --use NAME` picks one for a single run instead.
    """
    import shlex

    from ..console import console, print_json
    from ...registry.names import display_name
    from ...registry.store import Registry
    from ...registry.versions import use_command
    from ...untrusted import shown

    entry, before = Registry().use(name)
    if json_out:
        print_json({"active": entry.to_json(), "replaced": before.to_json() if before else None})
        return
    if before is None:
        console.print(f"{display_name(entry.name)} is the active {shown(entry.token)} (nothing changed).", markup=False)
    else:
        console.print(f"{display_name(entry.name)} is now the active {shown(entry.token)} (was "
                      f"{display_name(before.name)}; switch back with `{use_command(before.name)}`).", markup=False)
    console.print(f"Try: textinv sample {shlex.quote('a photo of ' + entry.token)}", markup=False)
