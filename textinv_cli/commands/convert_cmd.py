"""textinv convert SRC --to FORMAT: rewrite an embedding in another file format."""

from __future__ import annotations

from pathlib import Path

import typer


def convert(
    src: str = typer.Argument(..., metavar="SRC", help="A file, a folder, or a registry name."),
    to: str = typer.Option(..., "--to", help="Target format (see the README's table; e.g. safetensors, a1111, kohya)."),
    out: Path = typer.Option(None, "-o", "--output", help="Output file/folder, or an existing folder to write into."),
    token: str = typer.Option(None, "--token", help="Use this token instead of the one in the file."),
    key: str = typer.Option(None, "--key", help="Which tensor to take when the file holds several."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    max_size: float = typer.Option(None, "--max-size", help="Accept input files up to this many MiB (default 64)."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Convert an embedding between diffusers, A1111, kohya, PNG and sd-concepts formats."""
    from .. import formats
    from ..console import console, print_json
    from ..errors import TextinvError
    from ..sources import load_source

    if to not in formats.WRITERS:
        raise TextinvError(f"Unknown format {to!r}.", "Choose one of: " + ", ".join(formats.WRITERS) + ".")
    source = load_source(src, token=token, key=key, max_mib=max_size)
    emb = source.embedding
    target = _target_path(out, source, emb, to)
    written = formats.write_embedding(emb, target, to, force=force)
    info = formats.WRITERS[to]
    if json_out:
        print_json({"written": [str(p) for p in written], "format": to, "token": emb.token,
                    "family": emb.family, "vectors": emb.n_vectors})
        return
    for p in written:
        console.print(f"Wrote {p}", markup=False)
    console.print(f"  {info.description}: {emb.token}, {emb.family}, {emb.n_vectors} vector(s)", markup=False)


def _target_path(out: Path | None, source, emb, fmt: str) -> Path:
    """-o FILE as given; -o DIR or nothing: a name from the token, beside the source file."""
    from .. import formats

    if out is not None and not out.is_dir():
        return out
    if out is not None:
        folder = out
    elif source.kind in ("file", "folder"):
        folder = source.path.resolve().parent
    else:
        folder = Path.cwd()
    return folder / formats.default_output_name(emb, fmt).rstrip("/")
