"""The word AUTOMATIC1111 and Forge users type for an embedding, and the token textinv takes
from A1111's own files: one place for both rules.

Facts (AUTOMATIC1111/stable-diffusion-webui and lllyasviel/stable-diffusion-webui-forge,
modules/textual_inversion/textual_inversion.py, load_from_file): the prompt word is the file name without its extension for .pt, .bin and
.safetensors files (an internal `name` field is ignored), and the embedded `name` field for
.png/.webp images (the file name when it has none). A1111 builds names from letters, digits
and "._- " only (create_embedding), so its own images carry a bare name such as `cat-toy`.

textinv writes every container so that the word is the same, the bare token
(embedding.safe_name: `<cat-toy>` -> `cat-toy`): the default file stem, and the `name` of
the images it writes (a1111_image_writer). Reading an A1111 .pt/.bin, the token is the file
stem, as A1111 shows it, unless the stem is a tool's generic name (learned_embeds, ...) or
no usable name; the internal `name` stays in meta["name"] and, when it is not the token, in
meta["a1111_name"] (inspect and convert say so). A file textinv wrote under its
default name gives back its token unchanged (`<cat-toy>` in cat-toy.pt stays `<cat-toy>`),
except kohya-pt, which has no field for a token (A1111 asserts a one-tensor dict holds one key,
and turns every value of a clip_l + clip_g dict into a tensor): its token is the file stem,
the word A1111 uses.
"""

from __future__ import annotations

from pathlib import Path

from ..embedding import safe_name
from ..errors import InvalidEmbeddingError

# Stems that name a tool's convention, not a concept: never taken as a token.
GENERIC_STEMS = frozenset({"learned_embeds", "learned_embeds_2", "embedding", "embeddings", "model",
                           "pytorch_model", "diffusion_pytorch_model", "last", "image", "preview"})
# What A1111 loads from an embeddings folder: file suffix -> where the prompt word comes from.
STEM_SUFFIXES = (".pt", ".bin", ".safetensors")
IMAGE_FORMATS = ("a1111-png", "a1111-webp")
# The families A1111/Forge load embeddings of (string_to_param, one tensor, or clip_l + clip_g).
A1111_FAMILIES = ("sd1", "sd2", "sdxl")
# meta["token_source"] when the token is the file's name.
FROM_FILE_NAME = "file name"
# The meta key holding an A1111 file's internal `name` when the token (its file stem) differs:
# a fact about the source file, never written into another file (layouts.READ_ONLY_META).
A1111_NAME = "a1111_name"


def a1111_word(token: str) -> str:
    """The bare word for `token`: safe_name's form (brackets and outer spaces stripped); a
    token that is no usable name keeps its stripped text."""
    try:
        return safe_name(token)
    except InvalidEmbeddingError:
        return token.strip().strip("<>").strip() or token


def usable_stem(path: Path) -> str | None:
    """The file (or folder) name as a token, or None when it is hidden, a tool's generic
    name, a content hash (a cache blob) or no usable name (safe_name)."""
    stem = path.name if path.is_dir() else path.stem
    if not stem or stem.startswith(".") or stem in GENERIC_STEMS or _is_hex_digest(stem):
        return None
    try:
        safe_name(stem)
    except InvalidEmbeddingError:
        return None
    return stem


def token_for_a1111_file(path: Path, name: str | None) -> str | None:
    """The token of an A1111 .pt/.bin: what A1111 shows (the usable file stem), else `name`
    (also for names A1111 would not load, such as .ckpt or no suffix).

    When the stem is the bare form of `name` (a file textinv or A1111 wrote under its own
    name), `name` itself is kept, brackets and all, so round trips keep the token."""
    stem = usable_stem(path) if path.suffix.lower() in STEM_SUFFIXES else None  # A1111 loads no other
    if stem is None or (name is not None and a1111_word(name) == stem):
        return name
    return stem


def renamed_from(meta: dict) -> str | None:
    """meta[A1111_NAME]: the internal `name` of an A1111 file whose token was taken from its
    file name because the two differ (for a one-line note), else None."""
    return meta.get(A1111_NAME) or None


def trigger(fmt: str, family: str, token: str, written: Path) -> str | None:
    """What to type in A1111/Forge to use `written` (a file of format `fmt`), or None when
    A1111 cannot load it (folders, SD3/Flux, other suffixes)."""
    if family not in A1111_FAMILIES:
        return None
    if fmt in IMAGE_FORMATS:
        return a1111_word(token)
    if written.suffix in STEM_SUFFIXES and not written.is_dir():
        return written.stem
    return None


def _is_hex_digest(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)
