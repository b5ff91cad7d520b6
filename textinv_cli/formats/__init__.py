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

from ..embedding import FAMILY_META, Embedding, holds_credential
from ..errors import FormatError, InvalidEmbeddingError, NotFoundError
from ..fsutil import DEFAULT_MAX_BYTES, hash_file
from ..untrusted import quoted
from . import layouts  # noqa: F401 - callers reach layouts through the package
from .a1111_names import A1111_NAME, FROM_FILE_NAME, a1111_word, token_for_a1111_file, usable_stem
from .folders import (EMBEDS, SDXL_FIRST, Part, embedding_files, first_half_name, is_first_half, pair_parts,
                      read_folder, read_part, sdxl_partner, sdxl_partner_name, sha256_of_files)
from .layouts import TOKEN_META
from .writers import WRITERS, FormatInfo, default_output_name, write_embedding

__all__ = ["FormatInfo", "WRITERS", "read_embedding", "write_embedding", "default_output_name", "file_sha256"]


def read_embedding(path: Path, *, token: str | None = None, key: str | None = None,
                   max_bytes: int | None = DEFAULT_MAX_BYTES, family: str | None = None) -> Embedding:
    """Read any supported file or folder. `token` renames; `key` picks among several tensors;
    `family` (--family) declares the family where the file does not say it (an SD3/Flux
    embedding holding only some encoders: a lone t5, clip_l or clip_g).

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
            return bundled.with_family(family) if family else bundled
    extra: dict[str, str] = {}
    named: str | None = None
    by_file_name = False
    if path.is_dir():
        parts, fmt, extra, named, sha = read_folder(path, key=key, token=token, max_bytes=max_bytes)
        container = "folder"
    else:
        part = read_part(path, key=key, token=token, max_bytes=max_bytes)
        parts, fmt, container, sha = [part], part.decoded.image_format or part.parsed.fmt, part.decoded.container, part.sha256
        pair = _sdxl_pair(path, part, key=key, token=token, max_bytes=max_bytes)
        if pair is not None:
            parts, fmt = list(pair), "diffusers-sdxl"
            extra["paired_with"] = pair[1].path.name if pair[0] is part else pair[0].path.name
        named, by_file_name = _file_token(path, part)
    vectors = {slot: arr for p in parts for slot, arr in p.parsed.vectors.items()}
    if set(vectors) == {"clip_g"} and family != "sd3" and parts[0].parsed.meta.get(FAMILY_META) != "sd3":
        partner = first_half_name(path) if not path.is_dir() else None
        raise FormatError(
            f"{path} holds only SDXL's second text encoder (1280 wide), half of a diffusers SDXL pair; "
            + (f"its first file {quoted(partner)} is not beside it." if partner else
               f"its first file ({SDXL_FIRST} or {EMBEDS}-steps-N.safetensors) is not beside it."),
            "Put both files of the pair in one folder and read either of them.")
    meta: dict[str, str] = {}
    for p in parts:
        meta.update(p.parsed.meta)
    meta.update(extra)
    tok = token or named or parts[0].parsed.token or _token_from_name(path)
    if not token and (by_file_name or not (named or parts[0].parsed.token)):
        meta["token_source"] = FROM_FILE_NAME
    if by_file_name and not token and parts[0].parsed.token:  # A1111's internal name, when not the token
        meta[A1111_NAME] = parts[0].parsed.token
    _refuse_credentials(path, tok, meta)
    meta.update(format=fmt, container=container, dtype=_stored_dtype(parts), file_sha256=sha)
    if family:
        meta["family_source"] = "--family"
    try:
        return Embedding(token=tok, vectors=vectors, meta=meta, family_declared=family)
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


def _sdxl_pair(path: Path, part: Part, **kw) -> tuple[Part, Part] | None:
    """The diffusers SDXL pair `path` is one file of (folders.sdxl_partner), or None when it
    is a file of its own. Never half of a pair: a first file whose folder holds the script's
    second files but not its partner, or a partner that names another token, is refused."""
    if part.parsed.fmt != "diffusers" or len(part.parsed.vectors) != 1:
        return None
    partner = sdxl_partner(path)
    if partner is None:
        if is_first_half(path) and set(part.parsed.vectors) != {"clip_g"}:
            raise FormatError(f"{path} is the first file of a diffusers SDXL pair, and its partner "
                              f"{quoted(sdxl_partner_name(path))} is not beside it.",
                              "Put both files in one folder and read either of them.")
        return None
    other = read_part(partner, within=path.parent, **kw)
    pair = pair_parts(part, other)
    if pair is None and other.parsed.fmt == "diffusers" and len(other.parsed.vectors) == 1:
        # SDXL's two encoders' halves (by width), but of different tokens
        if {*part.parsed.vectors, *other.parsed.vectors} == {"clip_l", "clip_g"}:
            raise FormatError(f"{path} and its SDXL partner {partner.name} name different tokens "
                              f"({quoted(part.parsed.token)} and {quoted(other.parsed.token)}); "
                              "diffusers writes one token into both, so neither is read as half a pair.",
                              "Put each file with its own partner (or rename one) and read it again.")
    return pair


def _file_token(path: Path, part: Part) -> tuple[str | None, bool]:
    """(token, taken from the file name) for a single file, by container (a1111_names):
    A1111's .pt/.bin take the word A1111 shows (the file stem); A1111 images keep their
    `name` (textinv's images carry the exact token beside the bare name, under
    textinv.token); (None, False): the layout's own token."""
    name = part.parsed.token
    if part.parsed.fmt != "a1111":
        return None, False
    if part.decoded.image_format:
        exact = part.decoded.obj.get(TOKEN_META) if isinstance(part.decoded.obj, dict) else None
        if isinstance(exact, str) and exact.strip() and name and a1111_word(exact) == name:
            return exact, False
        return None, False
    tok = token_for_a1111_file(path, name)
    return tok, tok is not None and tok != name


def _token_from_name(path: Path) -> str:
    """A1111 uses the file name as the prompt word when a file names no token; so do we."""
    stem = usable_stem(path)
    if stem is not None:
        return stem
    shown_stem = path.name if path.is_dir() else path.stem
    raise FormatError(f"{path} does not say which token it is for, and its name {quoted(shown_stem)} is not one.",
                      "Pass --token, e.g. --token '<my-concept>'.")


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
