"""Embeddings that live in more than one file: sd-concepts-library folders and the diffusers
SDXL pair (`learned_embeds.safetensors` + `learned_embeds_2.safetensors`).

File names matter here only to find the parts of a folder (that is how these tools lay
them out); what each part holds is still recognised by content.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import FormatError
from ..fsutil import DEFAULT_MAX_BYTES, folder_member, hash_file, read_capped, read_head
from ..untrusted import shown
from .detect import Decoded, decode
from .layouts import Parsed, parse_layout

EMBEDS = "learned_embeds"
SDXL_FIRST, SDXL_SECOND = f"{EMBEDS}.safetensors", f"{EMBEDS}_2.safetensors"
CONCEPT_BIN, CONCEPT_SAFE = f"{EMBEDS}.bin", f"{EMBEDS}.safetensors"
TOKEN_FILE, TYPE_FILE = "token_identifier.txt", "type_of_concept.txt"
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".png", ".webp")
TEXT_CAP = 4096  # token_identifier.txt / type_of_concept.txt hold a word, not a book
# What textinv writes as each folder format: the only members `convert --force` may replace.
FOLDER_MEMBERS = {"sd-concepts": (CONCEPT_BIN, TOKEN_FILE, TYPE_FILE), "diffusers-sdxl": (SDXL_FIRST, SDXL_SECOND)}


@dataclass
class Part:
    """One decoded and parsed file of an embedding."""

    path: Path
    decoded: Decoded
    parsed: Parsed
    data: bytes = field(repr=False)  # the bytes decoded: file_sha256 hashes exactly what was read

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class FolderRead(NamedTuple):
    parts: list[Part]
    fmt: str
    extra: dict[str, str]   # meta the folder adds (learnable_property)
    named: str | None       # the token token_identifier.txt names
    sha256: str             # of the embedding files' bytes, in embedding_files order


def read_part(path: Path, *, key: str | None, token: str | None, max_bytes: int | None,
              within: Path | None = None) -> Part:
    """Read and parse one file; `within`: it is a member of that folder (fsutil.open_regular)."""
    data = read_capped(path, max_bytes, within=within)
    decoded = decode(data, source=str(path))
    parsed = parse_layout(decoded.obj, source=str(path), key=key, token=token, metadata=decoded.metadata)
    return Part(path, decoded, parsed, data)


def sdxl_partner(path: Path) -> Path | None:
    """X.safetensors -> X_2.safetensors and back: the names diffusers' SDXL script writes.
    The partner is a member of the file's folder, under folder_member's rule."""
    if path.suffix != ".safetensors":
        return None
    stem = path.stem
    other = stem[:-2] + path.suffix if stem.endswith("_2") else f"{stem}_2{path.suffix}"
    return folder_member(path.parent, other)


def pair_parts(first: Part, second: Part) -> tuple[Part, Part] | None:
    """(clip_l part, clip_g part) when the two files are one SDXL embedding, else None.

    Two single-tensor diffusers files with the same token, the second encoder's part the
    wider one (1280 vs 768; 64 vs 32 in the built-in tiny models). Widths alone name the
    slots of a lone file, so the pair's slots are set here from which part is wider.
    """
    a, b = first.parsed, second.parsed
    if a.fmt != "diffusers" or b.fmt != "diffusers" or a.token != b.token:
        return None
    if len(a.vectors) != 1 or len(b.vectors) != 1:
        return None
    (va,), (vb,) = a.vectors.values(), b.vectors.values()
    if va.shape[1] == vb.shape[1]:
        return None
    if va.shape[1] > vb.shape[1]:
        first, second, a, b, va, vb = second, first, b, a, vb, va
    a.vectors, b.vectors = {"clip_l": va}, {"clip_g": vb}
    return first, second


def read_folder(path: Path, *, key: str | None, token: str | None,
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> FolderRead:
    """What the folder on disk holds. Every member is read under folder_member's rule."""
    first, second = folder_member(path, SDXL_FIRST), folder_member(path, SDXL_SECOND)
    if first and second:
        parts = [read_part(p, key=key, token=token, max_bytes=max_bytes, within=path) for p in (first, second)]
        sha = _sha_of_parts(parts)  # before pair_parts orders them by slot: the hash is in file order
        pair = pair_parts(*parts)
        if pair is None:
            raise FormatError(
                f"{path} has {SDXL_FIRST} and {SDXL_SECOND} but they are not one SDXL embedding "
                "(they need the same token key and widths 768 and 1280).")
        return FolderRead(list(pair), "diffusers-sdxl", {}, None, sha)
    embeds = folder_member(path, CONCEPT_SAFE) or folder_member(path, CONCEPT_BIN)
    if embeds is None:
        found = heapq.nsmallest(8, (e.name for e in _entries(path) if os.path.splitext(e.name)[1] in EMBEDDING_SUFFIXES))
        raise FormatError(
            f"{path} is a folder without {CONCEPT_BIN} or {CONCEPT_SAFE}.",
            ("Give the embedding file itself: " + ", ".join(shown(n, 40) for n in found) + ".") if found else
            "An embedding folder is an sd-concepts-library concept or a diffusers training output.")
    part = read_part(embeds, key=key, token=token, max_bytes=max_bytes, within=path)
    extra: dict[str, str] = {}
    named = _read_text(path, TOKEN_FILE)
    kind = _read_text(path, TYPE_FILE)
    if kind:
        extra["learnable_property"] = kind
    # sd-concepts-library: token_identifier.txt is what the concept page tells people to type.
    fmt = "sd-concepts" if (named or kind) and part.parsed.fmt == "diffusers" else part.parsed.fmt
    return FolderRead([part], fmt, extra, named, part.sha256)


def _sha_of_parts(parts: list[Part]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.data)
    return h.hexdigest()


def _entries(path: Path):
    with os.scandir(path) as it:
        yield from it


def _read_text(folder: Path, name: str) -> str | None:
    """token_identifier.txt / type_of_concept.txt of a folder on disk (folder_member), or None."""
    path = folder_member(folder, name)
    return None if path is None else read_word(path, within=folder)


def read_word(path: Path, *, within: Path, label: str | None = None) -> str | None:
    """An sd-concepts side file's word (token_identifier.txt, type_of_concept.txt), read as a
    member of `within` and at most TEXT_CAP bytes (never trusting st_size); None when empty.
    The folder reader and `pull` (the Hub's copy of the same files) both read them here."""
    label = label or str(path)
    data = read_head(path, TEXT_CAP + 1, within=within)
    if len(data) > TEXT_CAP:
        raise FormatError(f"{label} is over {TEXT_CAP} bytes; it should hold a single word.")
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{label} is not UTF-8 text.") from None
    return text or None


def embedding_files(path: Path) -> list[Path]:
    """The files of a folder that hold its embedding, sorted (what its sha256 covers).

    The same choice read_folder makes: the SDXL pair, else learned_embeds.safetensors,
    else learned_embeds.bin; a folder with none of them falls back to every regular file
    that could be an embedding (no link, no hidden file), so the hash still means something.
    """
    first, second = folder_member(path, SDXL_FIRST), folder_member(path, SDXL_SECOND)
    if first and second:
        return [first, second]
    for name in (CONCEPT_SAFE, CONCEPT_BIN):
        if found := folder_member(path, name):
            return [found]
    return sorted(path / e.name for e in _entries(path) if e.is_file(follow_symlinks=False)
                  and os.path.splitext(e.name)[1] in EMBEDDING_SUFFIXES and not e.name.startswith("."))


def is_written_folder(path: Path, fmt: str) -> bool:
    """True when `path` is a folder `fmt` writes, as textinv writes it: its required embedding
    files and nothing but FOLDER_MEMBERS[fmt], all regular files. Only such a folder is a
    target `-o FOLDER --force` replaces; any other existing folder is one to write into."""
    members = FOLDER_MEMBERS.get(fmt)
    try:
        if members is None or not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        names = {e.name: e.is_file(follow_symlinks=False) for e in _entries(path)}
    except OSError:
        return False
    required = {CONCEPT_BIN} if fmt == "sd-concepts" else set(members)
    return required <= set(names) and all(ok and n in members for n, ok in names.items())


def sha256_of_files(files: list[Path]) -> str:
    """sha256 of the files' bytes in order; each one a member of its folder (fsutil.open_regular)."""
    h = hashlib.sha256()
    for p in files:
        hash_file(p, h, within=p.parent)
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------

def sdxl_pair_files(emb) -> dict[str, bytes]:
    """diffusers' SDXL script output: the same token key in both files."""
    from .layouts import diffusers_metadata
    from .safetensors_io import dump_safetensors

    meta = diffusers_metadata(emb)
    return {
        SDXL_FIRST: dump_safetensors({emb.token: emb.vectors["clip_l"]}, meta),
        SDXL_SECOND: dump_safetensors({emb.token: emb.vectors["clip_g"]}, meta),
    }


def concept_files(emb) -> dict[str, bytes]:
    """An sd-concepts-library folder. One vector is stored 1-D ([768]) as the library does."""
    from .pickle_writer import dump_torch_pickle

    (vec,) = emb.vectors.values()
    stored = vec[0] if vec.shape[0] == 1 else vec
    kind = emb.meta.get("learnable_property") or "object"
    return {
        CONCEPT_BIN: dump_torch_pickle({emb.token: stored}),
        TOKEN_FILE: emb.token.encode("utf-8"),
        TYPE_FILE: kind.encode("utf-8"),
    }
