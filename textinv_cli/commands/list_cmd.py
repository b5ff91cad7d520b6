"""textinv list: the embeddings in the local registry, as a table or JSON."""

from __future__ import annotations

from enum import Enum

import typer


class Family(str, Enum):
    sd1 = "sd1"
    sd2 = "sd2"
    sdxl = "sdxl"


class Source(str, Enum):
    trained = "trained"
    pulled = "pulled"
    imported = "imported"


def list_embeddings(
    family: Family = typer.Option(None, "--family", help="Only this model family."),
    source: Source = typer.Option(None, "--source", help="Only embeddings that were trained, pulled or imported."),
    json_out: bool = typer.Option(False, "--json", help="Print the entries as a JSON list."),
) -> None:
    """List the embeddings in the local registry."""
    from ..console import console, print_json
    from ..registry import Registry, home

    entries = Registry().entries(family=family.value if family else None,
                                 source=source.value if source else None)
    if json_out:
        print_json([e.to_json() for e in entries])
        return
    if not entries:
        if family or source:
            chosen = " ".join(f"--{k} {v.value}" for k, v in (("family", family), ("source", source)) if v)
            console.print(f"No registered embeddings match {chosen}. Run `textinv list` to see them all.",
                          markup=False)
        else:
            console.print(f"No embeddings registered yet (registry: {home()}). Add one with "
                          "`textinv import FILE`, `textinv pull REPO` or `textinv train`.", markup=False)
        return

    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (("name", "left"), ("token", "left"), ("family", "left"), ("vectors", "right"),
                         ("source", "left"), ("sha256", "left"), ("created", "left")):
        # names and tokens fold rather than get cut: a user copies them into other commands
        table.add_column(col, justify=justify, no_wrap=col in ("name", "token", "sha256", "created"),
                         overflow="fold" if col in ("name", "token") else "ellipsis")
    for e in entries:
        # Text(...) so a name like "[style]" is shown as typed, not parsed as rich markup
        table.add_row(*(Text(str(v)) for v in (e.name, e.token, e.family, e.n_vectors, e.source,
                                                 e.short_sha, _minutes(e.created))))
    console.print(table)
    console.print(f"{len(entries)} embedding{'s' if len(entries) != 1 else ''}", style="dim")


def _minutes(created: str) -> str:
    """2024-05-01T12:34:56Z -> 2024-05-01 12:34 (UTC): enough to tell entries apart in a table."""
    return created.replace("T", " ")[:16]
