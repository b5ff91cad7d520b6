"""Embeddings that live in more than one file: sd-concepts-library folders and the diffusers
SDXL pair (`learned_embeds.safetensors` + `learned_embeds_2.safetensors`).

File names matter here only to find the parts of a folder (that is how these tools lay
them out); what each part holds is still recognised by content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..fsutil import DEFAULT_MAX_BYTES
from .detect import Decoded, read_decoded
from .layouts import Parsed, parse_layout

EMBEDS = "learned_embeds"
SDXL_FIRST, SDXL_SECOND = f"{EMBEDS}.safetensors", f"{EMBEDS}_2.safetensors"
CONCEPT_BIN, CONCEPT_SAFE = f"{EMBEDS}.bin", f"{EMBEDS}.safetensors"
TOKEN_FILE, TYPE_FILE = "token_identifier.txt", "type_of_concept.txt"
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".png", ".webp")
TEXT_CAP = 4096  # token_identifier.txt / type_of_concept.txt hold a word, not a book


@dataclass
class Part:
    """One decoded and parsed file of an embedding."""

    path: Path
    decoded: Decoded
    parsed: Parsed


def read_part(path: Path, *, key: str | None, token: str | None, max_bytes: int | None) -> Part:
    decoded = read_decoded(path, max_bytes=max_bytes)
    parsed = parse_layout(decoded.obj, source=str(path), key=key, token=token, metadata=decoded.metadata)
    return Part(path, decoded, parsed)


def sdxl_partner(path: Path) -> Path | None:
    """X.safetensors -> X_2.safetensors and back: the names diffusers' SDXL script writes."""
    if path.suffix != ".safetensors":
        return None
    stem = path.stem
    other = path.with_name(stem[:-2] + path.suffix) if stem.endswith("_2") else path.with_name(f"{stem}_2{path.suffix}")
    return other if other.is_file() else None


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
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> tuple[list[Part], str, dict[str, str], str | None]:
    """(parts, format, extra meta, token named by the folder) for a folder on disk."""
    first, second = path / SDXL_FIRST, path / SDXL_SECOND
    if first.is_file() and second.is_file():
        parts = [read_part(p, key=key, token=token, max_bytes=max_bytes) for p in (first, second)]
        pair = pair_parts(*parts)
        if pair is None:
            raise FormatError(
                f"{path} has {SDXL_FIRST} and {SDXL_SECOND} but they are not one SDXL embedding "
                "(they need the same token key and widths 768 and 1280).")
        return list(pair), "diffusers-sdxl", {}, None
    embeds = next((path / n for n in (CONCEPT_SAFE, CONCEPT_BIN) if (path / n).is_file()), None)
    if embeds is None:
        found = sorted(p.name for p in path.iterdir() if p.suffix in EMBEDDING_SUFFIXES)[:8]
        raise FormatError(
            f"{path} is a folder without {CONCEPT_BIN} or {CONCEPT_SAFE}.",
            ("Give the embedding file itself: " + ", ".join(found) + ".") if found else
            "An embedding folder is an sd-concepts-library concept or a diffusers training output.")
    part = read_part(embeds, key=key, token=token, max_bytes=max_bytes)
    extra: dict[str, str] = {}
    named = _read_text(path / TOKEN_FILE)
    kind = _read_text(path / TYPE_FILE)
    if kind:
        extra["learnable_property"] = kind
    # sd-concepts-library: token_identifier.txt is what the concept page tells people to type.
    fmt = "sd-concepts" if (named or kind) and part.parsed.fmt == "diffusers" else part.parsed.fmt
    return [part], fmt, extra, named


def _read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    if path.stat().st_size > TEXT_CAP:
        raise FormatError(f"{path} is {path.stat().st_size} bytes; it should hold a single word.")
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8 text.") from None
    return text or None


def embedding_files(path: Path) -> list[Path]:
    """The files of a folder that hold its embedding, sorted (what its sha256 covers).

    The same choice read_folder makes: the SDXL pair, else learned_embeds.safetensors,
    else learned_embeds.bin; a folder with none of them falls back to every file that
    could be an embedding, so the hash still means something.
    """
    if (path / SDXL_FIRST).is_file() and (path / SDXL_SECOND).is_file():
        return [path / SDXL_FIRST, path / SDXL_SECOND]
    for name in (CONCEPT_SAFE, CONCEPT_BIN):
        if (path / name).is_file():
            return [path / name]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in EMBEDDING_SUFFIXES
                  and not p.name.startswith("."))


def sha256_of_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
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
