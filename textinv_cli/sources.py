"""Where an embedding named on the command line comes from: a file, a folder, or the registry."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .embedding import Embedding
from .errors import NotFoundError
from .untrusted import escape


@dataclass
class Source:
    embedding: Embedding
    kind: str               # "file" | "folder" | "registry"
    path: Path | None       # the file/folder, or the registry blob
    entry: object = None    # registry.Entry when kind == "registry"
    note: str | None = None  # when SRC named both a path and a registry entry: which was used, and the other


def load_source(src: str, *, token: str | None = None, key: str | None = None,
                max_mib: float | None = None, family: str | None = None) -> Source:
    """A bare registry name (no path separator) means the entry, even where a file or folder of
    that name is in the current folder (training from ./gray registers `gray`: `inspect gray`
    means the embedding, not the photos); the note says so, and `./gray` reads the path. Else a
    path that exists wins; then a URL is refused with what to do (hub/urls.py: pull a Hub
    repo, download anything else); otherwise the registry is asked by name or token.

    `max_mib` is --max-size, checked by fsutil.max_bytes_from_mib (nan, inf, 1e308 refused);
    `family` is --family (formats.read_embedding; for a registry entry, Embedding.with_family).
    """
    from . import formats
    from .fsutil import max_bytes_from_mib

    max_bytes = max_bytes_from_mib(max_mib)
    path = Path(src).expanduser()
    if _exists(path) and _bare(src):
        named = _registered(src)
        if named is not None:
            other = "folder" if path.is_dir() else "file"
            note = (f"{escape(src)} is a registry entry and a {other} here; using the registry entry "
                    f"(for the {other}, pass {shlex.quote('./' + src)}).")
            print(f"Note: {note}", file=sys.stderr)  # the caller's stdout may be --json
            source = _from_registry(named, token=token, family=family)
            source.note = note
            return source
    if _exists(path):
        emb = formats.read_embedding(path, token=token, key=key, max_bytes=max_bytes, family=family)
        return Source(emb, "folder" if path.is_dir() else "file", path)
    from .hub.urls import refuse_url_source

    refuse_url_source(src)  # a registry name never holds "://" or a host/path
    from .registry.store import Registry

    reg = Registry()
    try:
        entry = reg.resolve(src)
    except NotFoundError as e:
        looks_like_path = any(c in src for c in "/\\") or Path(src).suffix != ""
        if looks_like_path:
            raise NotFoundError(f"{src} does not exist.", "Check the path, or give a registry name (textinv list).") from None
        raise e
    return _from_registry(entry, token=token, family=family)


def _from_registry(entry, *, token: str | None, family: str | None) -> Source:
    from .registry.store import Registry

    reg = Registry()
    emb = reg.load(entry)
    if token:
        emb = Embedding(token, emb.vectors, emb.meta)
    if family:
        emb = emb.with_family(family)
    return Source(emb, "registry", reg.blob_path(entry.sha256), entry)


def _bare(src: str) -> bool:
    """A plain name as typed, not a path: no separator, not ~ (./gray and gray/ are paths)."""
    return not any(c in src for c in "/\\") and not src.startswith("~") and src not in (".", "..")


def _registered(name: str):
    """The registry entry with this exact name, or None (never an error: the path is still there)."""
    from .errors import TextinvError
    from .registry.store import Registry

    try:
        return Registry().get(name)
    except TextinvError:
        return None


def _exists(path: Path) -> bool:
    """A name the OS cannot look up (too long, a NUL) is no file: it may still be a registry name."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
