"""Recognise a file by its bytes and decode its container into plain Python data.

Detection never looks at the file name: people rename `.pt` to `.bin`, save kohya files
as `learned_embeds.safetensors`, and download HTML error pages or Git LFS pointers under
the real name. The container (safetensors, torch zip pickle, PNG, WebP) is sniffed from
magic bytes; the layout inside it is recognised by `layouts.parse_layout`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..fsutil import DEFAULT_MAX_BYTES, read_capped
from .layouts import key_text
from .safetensors_io import MAX_HEADER, load_tagged

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # every binary pickle (protocol >= 2) starts with PROTO


@dataclass
class Decoded:
    """What a container held, before anyone decides which layout it is."""

    obj: object                                   # dict / array / ... with tensors as numpy arrays
    container: str                                # safetensors | pickle | png | webp
    metadata: dict[str, str] = field(default_factory=dict)   # safetensors __metadata__
    dtypes: dict[str, str] = field(default_factory=dict)     # tensor name -> stored dtype
    image_format: str | None = None               # a1111-png / a1111-webp when from an image


def sniff(data: bytes) -> str:
    """safetensors | pickle | png | webp | lfs | raw-pickle | unknown (by content only).

    raw-pickle: a pickle outside a zip, or torch's older tar of pickles (both legacy)."""
    from .a1111_image import image_kind

    if data.startswith(LFS_POINTER):
        return "lfs"
    if data.startswith(_ZIP_MAGIC):
        # torch >= 1.6 saves a zip archive. Any zip goes to the pickle reader, whose
        # error then says precisely what a non-torch or damaged archive lacks.
        return "pickle"
    kind = image_kind(data)
    if kind:
        return kind
    # A safetensors file starts with a little-endian u64 header length and then '{'.
    # Accept any plausible length here (even one past the end of the file) so a
    # truncated file gets the strict reader's precise message, not "unrecognised".
    if len(data) >= 9 and data[8:9] == b"{" and struct.unpack("<Q", data[:8])[0] <= MAX_HEADER:
        return "safetensors"
    if data.startswith(_PICKLE_PROTO):
        return "raw-pickle"
    from .pickle_reader import looks_like_legacy_tar, looks_like_raw_pickle

    return "raw-pickle" if looks_like_raw_pickle(data) or looks_like_legacy_tar(data) else "unknown"


def decode(data: bytes, *, source: str) -> Decoded:
    """Decode a container or raise FormatError/UnsafeFileError saying what to do."""
    kind = sniff(data)
    if kind == "safetensors":
        tensors, meta, tags = load_tagged(data, source)
        return Decoded(tensors, "safetensors", meta, {k: _TAG_NAMES.get(t, t.lower()) for k, t in tags.items()})
    if kind == "pickle":
        from .pickle_reader import load_torch_pickle

        obj = load_torch_pickle(data, source=source)
        return Decoded(obj, "pickle", {}, _array_dtypes(obj, _path_budget(data)))
    if kind in ("png", "webp"):
        from .a1111_image import load_image_embedding

        obj = load_image_embedding(data, source=source)
        return Decoded(obj, kind, {}, _array_dtypes(obj, _path_budget(data)), image_format=f"a1111-{kind}")
    if kind == "lfs":
        raise FormatError(
            f"{source} is a Git LFS pointer, not the embedding itself.",
            "Run `git lfs pull` in the repository you cloned, or download the real file "
            "(on the Hub: the file's download link, or `textinv pull`).")
    if kind == "raw-pickle":
        from .pickle_reader import load_torch_pickle

        load_torch_pickle(data, source=source)  # refuses: names an unsafe global, else "legacy"
        raise FormatError(
            f"{source} is a raw (legacy, non-zip) pickle; textinv does not run pickle code from such files.",
            "Only torch zip archives (torch >= 1.6 `torch.save`) are read, with a restricted reader. "
            "Re-save it in an environment you trust, ideally as .safetensors.")
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise FormatError(f"{source} is an HTML page, not an embedding.",
                          "The download probably failed or returned a login/error page; download it again.")
    raise FormatError(
        f"{source} is not a recognised embedding file ({len(data)} bytes).",
        "textinv reads safetensors, torch .pt/.bin (zip) and A1111 PNG/WebP embeddings, "
        "and sd-concepts / diffusers folders.")


def read_decoded(path: Path, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Decoded:
    """Read (size-capped: refused before reading) and decode one file."""
    return decode(read_capped(path, max_bytes), source=str(path))


# safetensors headers keep the stored tag (load_tagged reports it before BF16 is widened)
_TAG_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# The layouts look at most this deep (string_to_param._parameters.<name>.<slot> in a pickled
# ParameterDict); no path deeper than that is ever looked up.
_PATH_DEPTH = 4


def _path_budget(data: bytes) -> int:
    """Characters of dotted paths (plus nodes visited) _array_dtypes may produce for a file.

    A tree reaches each array once, so its paths total at most _PATH_DEPTH times its keys'
    characters, all in the file. A pickle can reference one dict (or one 1 KB key string)
    from many places, so a 1.5 KB DAG names 2^30 arrays with ever-longer paths (3 GB); the
    budget keeps the walk proportional to the file."""
    return _PATH_DEPTH * len(data) + 65536


def _array_dtypes(obj, budget: int) -> dict[str, str]:
    """Dtypes of the arrays in a decoded pickle/image dict, keyed by their dotted path.

    bfloat16 in a .pt arrives widened to float32 by the pickle reader, so a pickle's bf16
    reports as float32; safetensors headers keep the real tag (above). The walk stops when
    `budget` is spent: a path it did not reach just has no entry, and callers fall back to
    the one dtype the file uses (formats._stored_dtype), so a hostile file costs
    O(size) and a real one loses nothing."""
    out: dict[str, str] = {}
    stack = [(obj, "", 0)]
    while stack and budget > 0:
        node, path, depth = stack.pop()
        budget -= 1
        if isinstance(node, np.ndarray):
            out[path or "tensor"] = node.dtype.name
        elif isinstance(node, dict) and depth < _PATH_DEPTH:
            children = []
            for k, v in node.items():  # in order; pushed reversed so they pop in order
                child = f"{path}.{key_text(k)}" if path else key_text(k)
                budget -= 1 + len(child)
                if budget <= 0:
                    break
                children.append((v, child, depth + 1))
            stack.extend(reversed(children))
    return out
