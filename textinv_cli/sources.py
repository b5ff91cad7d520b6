"""Where an embedding named on the command line comes from: a file, a folder, or the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .embedding import Embedding
from .errors import NotFoundError


@dataclass
class Source:
    embedding: Embedding
    kind: str               # "file" | "folder" | "registry"
    path: Path | None       # the file/folder, or the registry blob
    entry: object = None    # registry.Entry when kind == "registry"


def load_source(src: str, *, token: str | None = None, key: str | None = None,
                max_mib: float | None = None, family: str | None = None) -> Source:
    """A path that exists wins; then a URL is refused with what to do (hub/urls.py: pull a Hub
    repo, download anything else); otherwise the registry is asked by name or token.

    `max_mib` is --max-size, checked by fsutil.max_bytes_from_mib (nan, inf, 1e308 refused);
    `family` is --family (formats.read_embedding; for a registry entry, Embedding.with_family).
    """
    from . import formats
    from .fsutil import max_bytes_from_mib

    max_bytes = max_bytes_from_mib(max_mib)
    path = Path(src).expanduser()
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
    emb = reg.load(entry)
    if token:
        emb = Embedding(token, emb.vectors, emb.meta)
    if family:
        emb = emb.with_family(family)
    return Source(emb, "registry", reg.blob_path(entry.sha256), entry)


def _exists(path: Path) -> bool:
    """A name the OS cannot look up (too long, a NUL) is no file: it may still be a registry name."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
