"""textinv backends: the installed training/sampling backends and whether they can run."""

from __future__ import annotations

import typer


def backends(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the backends found through the textinv.backends entry points."""
    from dataclasses import asdict

    from ...engine import plugins
    from ..console import console, print_json

    infos = plugins.probe_all()
    if json_out:
        print_json([asdict(i) for i in infos])
        return
    if not infos:
        console.print("No backends installed.")
        for name, hint in plugins.INSTALL_HINTS.items():
            console.print(f"  {name}: {hint}", markup=False)
        return
    from rich.table import Table

    table = Table("backend", "version", "status", "devices")
    for i in infos:
        status = "ready" if i.available else f"unavailable: {i.reason}"
        table.add_row(i.name, i.version or "-", status, ", ".join(i.devices) or "-")
    console.print(table)
