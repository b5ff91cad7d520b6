"""textinv convert SRC --to FORMAT: rewrite an embedding in another file format."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..options import FAMILY_HELP, family_option, max_size_option


def convert(
    src: str = typer.Argument(..., metavar="SRC", help="A file, a folder, or a registry name."),
    to: str = typer.Option(..., "--to", help="Target format (see the README's table; e.g. safetensors, a1111, kohya)."),
    out: str = typer.Option(None, "-o", "--output", metavar="PATH",
                            help="Output file/folder, or a folder to write into (an existing one, or a path ending in /, "
                                 "created if needed). Into a folder: cat-toy.safetensors, kohya/cat-toy.safetensors, ... "
                                 "(one path per format; the file name is the A1111/ComfyUI prompt word)."),
    token: str = typer.Option(None, "--token", help="Use this token instead of the one in the file."),
    key: str = typer.Option(None, "--key", help="Which tensor to take when the file holds several."),
    family: str = typer.Option(None, "--family", metavar="FAMILY", callback=family_option, help=FAMILY_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output (a file, or a folder this format wrote)."),
    max_size: float = typer.Option(None, "--max-size", callback=max_size_option,
                                   help="Accept input files up to this many MiB (default 64)."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Convert an embedding between diffusers, A1111, kohya, PNG and sd-concepts formats."""
    from ... import formats
    from ...formats import a1111_names
    from ..console import console, print_json
    from ...errors import TextinvError
    from ...sources import load_source
    from ...untrusted import escape, quoted

    if to not in formats.WRITERS:
        raise TextinvError(f"Unknown format {quoted(to)}.", "Choose one of: " + ", ".join(formats.WRITERS) + ".")
    from ...embedding import width_note
    from ..console import err_console

    source = load_source(src, token=token, key=key, max_mib=max_size, family=family)
    emb = source.embedding
    odd_width = width_note(emb)  # converted all the same (the user may know better), but said first
    if odd_width:
        err_console.print(f"Warning: {odd_width}", markup=False, style="yellow")
    target, create = _target_path(out, source, emb, to)
    written = _write(emb, target, to, force, create=create)
    info = formats.WRITERS[to]
    # what A1111/Forge users type for the written file, and whether the token is the source's file
    # name rather than its internal name (formats/a1111_names.py has both rules)
    trigger = a1111_names.trigger(to, emb.family, emb.token, written[0])
    renamed = a1111_names.renamed_from(emb.meta)
    if json_out:
        print_json({"written": [str(p) for p in written], "format": to, "token": emb.token,
                    "family": emb.family, "vectors": emb.n_vectors, "a1111_trigger": trigger,
                    "a1111_name": renamed})
        return
    for p in written:  # a path may hold a name that is not UTF-8, a token anything: shown escaped
        console.print(f"Wrote {escape(p)}", markup=False)
    console.print(f"  {info.description}: {escape(emb.token)}, {emb.family}, {emb.n_vectors} vector(s)", markup=False)
    if renamed is not None:
        console.print(f"  Token {quoted(emb.token)} is the source's file name, as A1111 shows it; "
                      f"its internal name is {quoted(renamed)}.", markup=False)
    if trigger is not None:
        console.print(f"  In A1111/Forge type: {escape(trigger)}", markup=False)


def _target_path(out: str | None, source, emb, fmt: str) -> tuple[Path, bool]:
    """Where convert writes, and whether folders may be created for it.

    -o PATH: PATH itself, unless it is a folder to write into: a path ending in "/" (created,
    with its parents, when it does not exist: `-o out/` as the README writes it), or an
    existing folder that is not one this format writes (an sd-concepts folder textinv wrote is
    the target of `-o FOLDER --to sd-concepts --force`; a plain folder never is). Into a
    folder, or beside the source without -o, the path comes from the token through
    formats.writers.default_output_path (embedding.safe_name; one path per format, kohya's in
    kohya/): plain names, never "." or a path, so the target is always new inside that folder.
    """
    from ...formats.folders import is_written_folder
    from ...formats.writers import default_output_path

    if out is not None:
        path = Path(out)
        into = out.endswith(("/", os.sep)) or os.path.basename(out) in (".", "..")
        is_dir = os.path.isdir(path)  # False, not an OSError, for a name too long to look up
        if not into and not (is_dir and not is_written_folder(path, fmt)):
            return path, False
        folder = path
    elif source.kind in ("file", "folder"):
        folder = source.path.resolve().parent
    else:
        folder = Path.cwd()
    return folder / default_output_path(emb, fmt).rstrip("/"), True


def _write(emb, target: Path, fmt: str, force: bool, *, create: bool) -> list[Path]:
    """formats.write_embedding, creating the folders it goes into first (`create`: `-o out/`,
    a format's own folder such as kohya/); a write that is refused (a format that cannot hold
    the family, an existing file) leaves no new empty folder behind."""
    from ... import formats
    from ...writes import check_new_folder

    created = []
    folder = target.parent
    while create and not os.path.lexists(folder):
        created.append(folder)
        folder = folder.parent
    if created:  # a file in the way, /proc, a read-only parent: said in words before any work
        check_new_folder(created[0], "the output folder", "Give -o a folder that can be created, or a file name "
                                                          "(without the trailing /).")
    for path in reversed(created):
        path.mkdir()
    try:
        return formats.write_embedding(emb, target, fmt, force=force)
    except BaseException:
        for path in created:  # innermost first; only while empty
            try:
                path.rmdir()
            except OSError:
                break
        raise
