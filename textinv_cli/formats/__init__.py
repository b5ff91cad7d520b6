"""Read and write every embedding format (ARCHITECTURE.md, "Formats"). The public API of textinv_cli.formats.

    read_embedding(path)                  file or folder -> Embedding (format detected by content)
    write_embedding(emb, out, fmt)        Embedding -> file/folder in one of WRITERS
    default_output_name(emb, fmt)         "cat-toy.safetensors", "cat-toy-sdxl/", ...
    file_sha256(path)                     of a file, or of a folder's embedding files

Nothing here imports torch: pickles are read by our restricted reader and written by our
own writer, so convert/inspect work on a machine without an ML framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..embedding import FAMILY_NAMES, Embedding, holds_credential, safe_name
from ..errors import FormatError, InvalidEmbeddingError, NotFoundError, OutputExistsError, UnsupportedFormatError
from ..families import FAMILIES, SINGLE_SLOT_FAMILIES
from ..fsutil import DEFAULT_MAX_BYTES, atomic_write_bytes, atomic_write_dir, check_writable_target, hash_file
from ..untrusted import quoted
from . import layouts
from .folders import FOLDER_MEMBERS, embedding_files, pair_parts, read_folder, read_part, sdxl_partner, sha256_of_files


@dataclass(frozen=True)
class FormatInfo:
    name: str
    description: str
    suffix: str                 # "" for folders
    families: frozenset[str]    # which of sd1/sd2/sdxl it can hold


_SINGLE = frozenset(SINGLE_SLOT_FAMILIES)
_ALL = frozenset(FAMILIES)
WRITERS: dict[str, FormatInfo] = {i.name: i for i in (
    FormatInfo("safetensors", "diffusers safetensors {token: [n, w]}", ".safetensors", _SINGLE),
    FormatInfo("bin", "diffusers .bin (torch pickle) {token: [n, w]}", ".bin", _SINGLE),
    FormatInfo("diffusers-sdxl", "diffusers SDXL folder (learned_embeds + learned_embeds_2)", "", frozenset({"sdxl"})),
    FormatInfo("a1111", "AUTOMATIC1111 .pt (string_to_param)", ".pt", _SINGLE),
    FormatInfo("kohya", "kohya sd-scripts safetensors (emb_params / clip_l + clip_g)", ".safetensors", _ALL),
    FormatInfo("kohya-pt", "kohya sd-scripts .pt (emb_params / clip_l + clip_g)", ".pt", _ALL),
    FormatInfo("a1111-png", "AUTOMATIC1111 PNG embedding (sd-ti-embedding chunk)", ".png", _SINGLE),
    FormatInfo("a1111-webp", "AUTOMATIC1111 WebP embedding", ".webp", _SINGLE),
    FormatInfo("sd-concepts", "sd-concepts-library folder (learned_embeds.bin + token_identifier.txt)", "", _SINGLE),
)}

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


def write_embedding(emb: Embedding, out: Path, fmt: str, *, force: bool = False) -> list[Path]:
    """Write `emb` as `fmt` at `out` (a file, or a folder for folder formats), atomically.

    Returns the written paths: [out] for both files and folders. Refuses before writing
    anything when the format cannot hold the embedding or `out` exists without `force`.
    """
    info = WRITERS.get(fmt)
    if info is None:
        raise UnsupportedFormatError(f"Unknown format {fmt!r}.", "Choose one of: " + ", ".join(WRITERS) + ".")
    if emb.family not in info.families:
        able = [n for n, i in WRITERS.items() if emb.family in i.families]
        raise UnsupportedFormatError(
            f"The {fmt} format cannot hold a {FAMILY_NAMES[emb.family]} embedding ({', '.join(emb.widths)}).",
            "Formats that can: " + ", ".join(able) + ".")
    out = Path(out)
    members = FOLDER_MEMBERS.get(fmt) if not info.suffix else None
    # fsutil's rule: an existing target needs --force and is replaced only when it is what is
    # written here (a file for a file; for a folder, one holding only this format's members)
    check_writable_target(out, force, members=members)
    payload = _encode(emb, fmt)  # everything is built before the first byte is written
    if isinstance(payload, dict):
        atomic_write_dir(out, payload, force=force)  # refuses, right before its swap, a folder holding more
    else:
        atomic_write_bytes(out, payload, force=force)
    return [out]


def _encode(emb: Embedding, fmt: str) -> bytes | dict[str, bytes]:
    from .safetensors_io import dump_safetensors

    if fmt == "safetensors":
        return dump_safetensors(layouts.diffusers_dict(emb), layouts.diffusers_metadata(emb))
    if fmt == "kohya":
        return dump_safetensors(layouts.kohya_dict(emb), layouts.kohya_metadata(emb))
    if fmt in ("a1111-png", "a1111-webp"):
        from . import a1111_image_writer as writer

        dump = writer.dump_png_embedding if fmt == "a1111-png" else writer.dump_webp_embedding
        return dump(layouts.a1111_dict(emb), caption=emb.token)
    if fmt in ("diffusers-sdxl", "sd-concepts"):
        from .folders import concept_files, sdxl_pair_files

        return sdxl_pair_files(emb) if fmt == "diffusers-sdxl" else concept_files(emb)
    from .pickle_writer import dump_torch_pickle

    data = {"bin": layouts.diffusers_dict, "a1111": layouts.a1111_dict, "kohya-pt": layouts.kohya_dict}[fmt](emb)
    return dump_torch_pickle(data)


def default_output_name(emb: Embedding, fmt: str) -> str:
    """A file name from the token ("cat-toy.pt"); folders end in "/". Refuses unsafe tokens
    (embedding.safe_name): the name is one plain path component, never ".", ".." or a path."""
    info = WRITERS.get(fmt)
    if info is None:
        raise UnsupportedFormatError(f"Unknown format {fmt!r}.", "Choose one of: " + ", ".join(WRITERS) + ".")
    name = safe_name(emb.token, "Pass -o with a file name, or --token with a plain word such as cat-toy.")
    if fmt == "diffusers-sdxl":
        return f"{name}-sdxl/"
    if not info.suffix:
        return f"{name}/"
    return name + info.suffix


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
