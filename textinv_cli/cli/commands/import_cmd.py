"""textinv import FILE: register any readable embedding file or folder in the local registry."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..options import FAMILY_HELP, family_option, max_size_option


def import_embedding(
    # a str, not a Path: Path("https://x/y") collapses "//" and the URL could no longer be recognised
    src: str = typer.Argument(..., metavar="FILE", help="Embedding file or folder (any format textinv reads)."),
    name: str = typer.Option(None, "--name", metavar="NAME", help="Registry name (default: the token without brackets)."),
    token: str = typer.Option(None, "--token", metavar="TOKEN", help="Use this token instead of the one in the file (not an ordinary "
                                                                  "word such as cat: prompts would lose the word)."),
    key: str = typer.Option(None, "--key", metavar="KEY", help="Which tensor to take when the file holds several."),
    family: str = typer.Option(None, "--family", metavar="FAMILY", callback=family_option, help=FAMILY_HELP),
    tag: list[str] = typer.Option(None, "--tag", metavar="TAG", help="A tag to store with the entry (repeatable)."),
    max_size: float = typer.Option(None, "--max-size", metavar="MIB", callback=max_size_option,
                                   help="Accept input files up to this many MiB (default 64)."),
    json_out: bool = typer.Option(False, "--json", help="Print the registry entry as JSON."),
) -> None:
    """Add an embedding file or folder to the local registry.

    The embedding is stored in the registry's own canonical copy; importing identical
    content again only says where it already is.
    """
    from ..console import console, print_json
    from ...errors import NotFoundError
    from ...formats import read_embedding
    from ...fsutil import max_bytes_from_mib
    from ...registry.store import Registry
    from ...registry.versions import switch_note
    from ...untrusted import escape

    from ...hub.urls import refuse_url_source

    path = Path(src).expanduser()
    if not os.path.lexists(path):  # (Path.exists raises for a name too long to look up)
        refuse_url_source(src, "import")  # a URL: say how to get the file (or pull it from the Hub)
        raise NotFoundError(f"{path} does not exist.", "Check the path; `textinv import` takes a file or folder.")
    emb = read_embedding(path, token=token, key=key, max_bytes=max_bytes_from_mib(max_size), family=family)
    refuse_ordinary_word(emb.token, src, name)
    # the reader records the file's (or folder's embedding files') sha256 in meta
    origin = {"path": str(path.resolve()), "file_sha256": emb.meta.get("file_sha256")}
    registry = Registry()
    entry, created = registry.add(emb, name=name, source="imported", origin=origin, tags=tag or ())
    note = switch_note(entry, registry.versions(entry.token)) if created or not entry.active else None

    if json_out:
        print_json({"created": created, "entry": entry.to_json(), **({"note": note} if note else {})})
        return
    if created:
        # the token came from the file, the path may not be UTF-8: both shown escaped
        console.print(f"Imported {escape(entry.name)} ({escape(entry.token)}, {entry.family}, "
                      f"{_vectors(entry.n_vectors)}) from {escape(path)}", markup=False)
    else:
        console.print(f"Already registered as {entry.name} (sha256 {entry.short_sha}…)", markup=False)
        if name is not None and name != entry.name:  # say why --name had no effect
            console.print(f"Identical content is stored once; it was not added again as {name}.", markup=False)
    if note:  # another version of the token: which one prompts use, and how to switch
        console.print(note, markup=False)


def refuse_ordinary_word(token: str, src: str, name: str | None) -> None:
    """engine/prompt_tokens' rule; the hint is the same import with the token bracketed."""
    import shlex

    from ...engine import prompt_tokens

    prompt_tokens.refuse_ordinary_word(
        token, lambda tok: f"textinv import {shlex.quote(src)} --token {shlex.quote(tok)}"
        + (f" --name {shlex.quote(name)}" if name else ""), "Import")


def _vectors(n: int) -> str:
    return f"{n} vector" + ("" if n == 1 else "s")

