"""Read and write every embedding format (ARCHITECTURE.md, "Formats"). The public API of textinv_cli.formats.

    read_embedding(path)                  file or folder -> Embedding (format detected by content)
    write_embedding(emb, out, fmt)        Embedding -> file/folder in one of WRITERS
    default_output_name(emb, fmt)         "cat-toy.safetensors", "cat-toy-sdxl/", ...
    file_sha256(path)                     of a file, or of a folder's embedding files

Nothing here imports torch: pickles are read by our restricted reader and written by our
own writer (writers.py), so convert/inspect work on a machine without an ML framework.
"""

from __future__ import annotations

from pathlib import Path

from ..embedding import Embedding, holds_credential, safe_name
from ..errors import FormatError, InvalidEmbeddingError, NotFoundError
from ..fsutil import DEFAULT_MAX_BYTES, hash_file
from ..untrusted import quoted
from . import layouts  # noqa: F401 - callers reach layouts through the package
from .folders import embedding_files, pair_parts, read_folder, read_part, sdxl_partner, sha256_of_files
from .writers import WRITERS, FormatInfo, default_output_name, write_embedding


# Stems that name a tool's convention, not a concept: never guess a token from them.
_GENERIC_STEMS = frozenset({"learned_embeds", "learned_embeds_2", "embedding", "embeddings", "model",
                            "pytorch_model", "diffusion_pytorch_model", "last", "image", "preview"})

__all__ = ["FormatInfo", "WRITERS", "read_embedding", "write_embedding", "default_output_name", "file_sha256"]


def read_embedding(path: Path, *, token: str | None = None, key: str | None = None,
                   max_bytes: int | None = DEFAULT_MAX_BYTES) -> Embedding:
    """Read any supported file or folder. `token` renames; `key` picks among several tensors.

    Every file is read through fsutil.open_regular/read_capped (regular files, bounded, a
    folder's members inside it); an access token is never taken as the token or metadata.
    """
    path = Path(path)
    if not _exists(path):
        raise NotFoundError(f"{path} does not exist.")
    if not path.is_dir():  # a LoRA bundling embeddings: its header and one bundle are read, never its body
        from .lora_bundle import read_bundled

        if (bundled := read_bundled(path, key=key, token=token, max_bytes=max_bytes)) is not None:
            _refuse_credentials(path, bundled.token, bundled.meta)
            return bundled
    extra: dict[str, str] = {}
    named: str | None = None
    if path.is_dir():
        parts, fmt, extra, named, sha = read_folder(path, key=key, token=token, max_bytes=max_bytes)
        container = "folder"
    else:
        part = read_part(path, key=key, token=token, max_bytes=max_bytes)
        parts, fmt, container, sha = [part], part.decoded.image_format or part.parsed.fmt, part.decoded.container, part.sha256
        partner = sdxl_partner(path) if part.parsed.fmt == "diffusers" else None
        if partner is not None:
            pair = pair_parts(part, read_part(partner, key=key, token=token, max_bytes=max_bytes, within=path.parent))
            if pair is not None:
                parts, fmt = list(pair), "diffusers-sdxl"
                extra["paired_with"] = partner.name
    vectors = {slot: arr for p in parts for slot, arr in p.parsed.vectors.items()}
    if set(vectors) == {"clip_g"}:
        raise FormatError(
            f"{path} holds only SDXL's second text encoder (1280 wide).",
            "It is half of a diffusers SDXL pair: read the folder, or learned_embeds.safetensors beside it.")
    meta: dict[str, str] = {}
    for p in parts:
        meta.update(p.parsed.meta)
    meta.update(extra)
    tok = token or named or parts[0].parsed.token or _token_from_name(path)
    if not (token or named or parts[0].parsed.token):
        meta["token_source"] = "file name"
    _refuse_credentials(path, tok, meta)
    meta.update(format=fmt, container=container, dtype=_stored_dtype(parts), file_sha256=sha)
    try:
        return Embedding(token=tok, vectors=vectors, meta=meta)
    except InvalidEmbeddingError as e:  # say which file, keep the advice
        raise InvalidEmbeddingError(f"{path}: {e.message}", e.hint) from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long to look up, a NUL in it
        return False


def _refuse_credentials(path: Path, tok: str, meta: dict) -> None:
    """An access token in a file (a token_identifier.txt linked to ~/.cache/huggingface/token,
    a metadata value) would be printed, registered and pushed: a token that holds one is
    refused without quoting it; metadata entries that hold one are dropped."""
    from ..redact import known_tokens

    known = known_tokens(ask_client=False)
    if holds_credential(tok, known):
        raise FormatError(f"{path}: the embedding's token looks like an access token (not shown); "
                          "textinv does not use it.", "Pass --token with the word to use in prompts.")
    for k in [k for k, v in meta.items() if holds_credential(k, known) or holds_credential(v, known)]:
        del meta[k]


def _token_from_name(path: Path) -> str:
    """A1111 uses the file name as the prompt word when a file names no token; so do we."""
    stem = path.name if path.is_dir() else path.stem
    usable = stem and not stem.startswith(".") and stem not in _GENERIC_STEMS and not _is_hex_digest(stem)
    if usable:
        try:
            safe_name(stem)
            return stem
        except InvalidEmbeddingError:
            pass
    raise FormatError(f"{path} does not say which token it is for, and its name {quoted(stem)} is not one.",
                      "Pass --token, e.g. --token '<my-concept>'.")


def _is_hex_digest(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _stored_dtype(parts) -> str:
    """The dtype the file stores its vectors in (before we widen to float32)."""
    found = set()
    for p in parts:
        dtypes = p.decoded.dtypes
        only = set(dtypes.values())
        for name in p.parsed.keys.values():
            found.add(dtypes.get(name) or (only.pop() if len(only) == 1 else "float32"))
    return "/".join(sorted(found)) or "float32"


def file_sha256(path: Path) -> str:
    """sha256 of a file; of a folder: of its embedding files' bytes in sorted order.
    Read as the readers read (fsutil.open_regular: regular files, members inside the folder)."""
    path = Path(path)
    if path.is_dir():
        files = embedding_files(path)
        if not files:
            raise FormatError(f"{path} holds no embedding files.")
        return sha256_of_files(files)
    if not _exists(path):
        raise NotFoundError(f"{path} does not exist.")
    return hash_file(path).hexdigest()
