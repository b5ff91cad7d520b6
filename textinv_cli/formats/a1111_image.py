"""AUTOMATIC1111's image-embedded embeddings (PNG and WebP), read without torch (written by
a1111_image_writer).

stable-diffusion-webui keeps an embedding inside an image in two ways; its loader tries the
first and falls back to the second (we do the same):

1. A PNG text chunk ``sd-ti-embedding`` holding base64 of ``json.dumps(data)``, where every
   tensor is written as ``{"TORCHTENSOR": nested lists}`` (default separators, ASCII).
2. A "side band" in the pixels: ``zlib.compress(json, 9)`` is split into low and high
   nibbles; each nibble stream is repeated cyclically (numpy.resize) to fill an
   ``[h, w, 3]`` block (h = preview height, length rounded up past a multiple of h and then
   of 3h), XORed with ``(x % 255) & 0x0F`` for the LCG ``x = (1664525 x + 1013904223) mod
   2**32`` from seed 0, and pasted as columns: low block | 1 black column | preview |
   1 black column | high block. Dots drawn from the first vector's magnitudes decorate the
   blocks' high bits only; the reader masks them away. Reading: crop black borders (rows
   and columns without a pixel whose three channels are all > 0), keep low nibbles, take
   the first and last all-zero columns as separators, undo the XOR, join the nibbles,
   inflate. WebP (lossless) can only carry the side band.

Everything read is untrusted: sizes are capped before decoding, the zlib stream is
inflated with a hard output limit, JSON is parsed plainly (no object hooks) and tensors
are rebuilt by a strict shape check; every failure is a FormatError.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import FormatError, TextinvError

TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
# The largest embedding A1111 makes (75 vectors of SDXL's 768 + 1280) is ~154k numbers, ~4 MiB
# of JSON. Both caps hold with room to spare and keep a tiny zlib bomb in the side band from
# becoming hundreds of MiB of Python objects (each number is ~32 bytes once parsed).
MAX_JSON_BYTES = 8 * 1024 * 1024
MAX_JSON_ITEMS = 400_000
# Previews are ~0.3-2 Mpx with their side bands. Pillow holds 4 bytes a pixel and the band
# search a few copies: 4 Mpx keeps a small PNG claiming the maximum under ~64 MiB.
MAX_PIXELS = 2048 * 2048
MAX_FILE_BYTES = 128 * 1024 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LCG_A, _LCG_C, _MASK32 = 1664525, 1013904223, 0xFFFFFFFF

_NO_EMBEDDING_HINT = ("It has no sd-ti-embedding text chunk and no readable pixel side band: "
                      "a plain preview, or re-saved with lossy compression.")


def image_kind(data: bytes) -> str | None:
    """"png" or "webp" by magic bytes, else None."""
    if data[:8] == PNG_MAGIC:
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# -- reading -------------------------------------------------------------------------


def load_image_embedding(data: bytes, *, source: str) -> dict:
    """A1111's embedding data dict from PNG/WebP bytes; tensors become float32 arrays."""
    kind = image_kind(data)
    if kind is None:
        raise FormatError(f"{source} is not a PNG or WebP image.")
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(f"{source} is {len(data) // 2**20} MiB; an embedding image is far smaller.",
                          f"Images over {MAX_FILE_BYTES // 2**20} MiB are refused.")
    try:
        img = _open_image(data, kind, source)
        # PIL's .text loads the whole image (text chunks may follow IDAT), as A1111 does.
        text = img.text if kind == "png" else {}
        if TEXT_KEY in text:
            return _parse_json(_from_base64(text[TEXT_KEY], source), source, "sd-ti-embedding text chunk")
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        del img  # the decoded image is as large as the array: hold one at a time
        band = extract_side_band(rgb, source)
        del rgb
        return _parse_json(inflate_band(band, source), source, "pixel side band")
    except TextinvError:
        raise
    except Exception as e:  # PIL/zlib/numpy raise many types on corrupt input; all are "unreadable"
        detail = " ".join(str(e)[:160].split())  # one line, whatever the decoder said
        raise FormatError(f"{source}: unreadable {kind.upper()} image ({type(e).__name__}: {detail}).",
                          "The file is truncated or corrupt.") from None


def _open_image(data: bytes, kind: str, source: str) -> Image.Image:
    """Open with only the expected decoder, check the pixel count, then decode fully."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except Image.DecompressionBombError:
        raise FormatError(f"{source} claims an enormous image size; refusing to decode it.") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise FormatError(f"{source} claims {w}x{h} pixels; refusing to decode it.",
                          f"Embedding images are small; the limit is {MAX_PIXELS:,} pixels.")
    img.load()  # truncation and CRC errors surface here, before any embedding is trusted
    return img


def _from_base64(value: str, source: str) -> bytes:
    compact = "".join(value.split())
    if len(compact) > MAX_JSON_BYTES * 4 // 3 + 4:
        raise FormatError(f"{source}: the sd-ti-embedding text chunk is too large.")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{source}: the sd-ti-embedding text chunk is not valid base64.",
                          "The image metadata is damaged.") from None


def _crop_black(rgb: np.ndarray) -> np.ndarray:
    """Trim outer rows/columns with no pixel whose channels are all non-zero (A1111's crop)."""
    # (rgb > 0).all(axis=2), channel by channel: no full-size boolean copy, and numpy
    # reduces a length-3 inner axis an order of magnitude slower than this
    lit = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > 0
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if cols.size == 0:  # nothing lit: A1111 keeps the whole image
        return rgb
    return rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def extract_side_band(rgb: np.ndarray, source: str) -> bytes:
    """The zlib bytes hidden in the side band (not yet inflated)."""
    nib = _crop_black(rgb) & 0x0F
    separators = np.flatnonzero(nib.max(axis=0).max(axis=1) == 0)  # all-black columns
    if separators.size < 2:
        raise FormatError(f"{source}: no embedding found in this image.", _NO_EMBEDDING_HINT)
    low, high = nib[:, :separators[0]], nib[:, separators[-1] + 1:]
    if low.size == 0 or low.shape != high.shape:
        raise FormatError(f"{source}: no embedding found in this image.", _NO_EMBEDDING_HINT)
    key = lcg_key(low.size).reshape(low.shape)
    # in place on nib (our own copy): a band can be half of a 4 Mpx image, so no temporaries
    low ^= key
    high ^= key
    high <<= 4
    high |= low
    return high.tobytes()


def inflate_band(blob: bytes, source: str) -> bytes:
    """zlib-decompress with a hard output cap; trailing padding (the band's repeat) is ignored."""
    # A zlib stream starts with CMF/FLG: deflate method and a header checksum. Without it the
    # "band" is just dark columns of an ordinary image.
    if len(blob) < 2 or blob[0] & 0x0F != 8 or (blob[0] << 8 | blob[1]) % 31:
        raise FormatError(f"{source}: no embedding found in this image.", _NO_EMBEDDING_HINT)
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(blob, MAX_JSON_BYTES)
    except zlib.error as e:
        raise FormatError(f"{source}: the embedding in the pixel side band is damaged ({e}).",
                          "Was the image resized or re-saved with lossy compression?") from None
    if not inflater.eof:
        if inflater.unconsumed_tail or len(out) >= MAX_JSON_BYTES:
            raise FormatError(f"{source}: the pixel side band inflates to more than "
                              f"{MAX_JSON_BYTES // 2**20} MiB; refusing it (a zlib bomb?).")
        raise FormatError(f"{source}: the embedding in the pixel side band is incomplete.",
                          "Was the image cropped?")
    return out


def _parse_json(raw: bytes, source: str, where: str) -> dict:
    if len(raw) > MAX_JSON_BYTES:
        raise FormatError(f"{source}: the {where} holds more than {MAX_JSON_BYTES // 2**20} MiB.")
    if raw.count(b",") > MAX_JSON_ITEMS:  # counted before parsing: that is where memory goes
        raise FormatError(f"{source}: the {where} holds more than {MAX_JSON_ITEMS:,} values; "
                          "an embedding has far fewer.")
    try:
        obj = json.loads(raw)  # plain parsing only: dicts, lists, str, numbers, null
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{source}: the {where} is not valid embedding JSON ({type(e).__name__}).",
                          "The embedding data is damaged.") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{source}: the {where} holds a JSON {type(obj).__name__}, "
                          "not an embedding dict.")
    try:
        return _revive(obj, source)
    except RecursionError:
        raise FormatError(f"{source}: the {where} is nested too deeply to be an embedding.") from None


def _revive(node, source: str):
    """Turn every dict holding TORCHTENSOR into an array, as A1111's decoder hook does."""
    if isinstance(node, dict):
        if TENSOR_KEY in node:
            return _tensor(node[TENSOR_KEY], source)
        return {k: _revive(v, source) for k, v in node.items()}
    if isinstance(node, list):
        return [_revive(v, source) for v in node]
    return node


def _tensor(value, source: str) -> np.ndarray:
    """float32 array from nested lists; the nesting must be rectangular and all numbers."""
    shape, level = [], [value]
    while level and isinstance(level[0], list):
        n = len(level[0])
        if any(not isinstance(item, list) or len(item) != n for item in level):
            raise FormatError(f"{source}: a TORCHTENSOR has rows of different lengths.",
                              "The embedding data is damaged.")
        shape.append(n)
        level = [x for item in level for x in item]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in level):
        raise FormatError(f"{source}: a TORCHTENSOR holds values that are not numbers.",
                          "The embedding data is damaged.")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN are judged by Embedding
            return np.array(level, dtype=np.float64).astype(np.float32).reshape(shape)
    except OverflowError:  # an integer literal past float64's range (JSON allows 4300 digits)
        raise FormatError(f"{source}: a TORCHTENSOR holds an integer too large for any float.",
                          "The embedding data is damaged.") from None


_KEY_BLOCK = 1 << 16


@lru_cache(maxsize=1)  # the writer's self-check (a1111_image_writer) asks again for the same n
def lcg_key(n: int) -> np.ndarray:
    """The first n XOR nibbles of A1111's LCG, vectorised by jumping ahead (read-only).

    Built block by block, so a band of millions of nibbles costs one byte each, not the
    four of a full table of LCG states.
    """
    k = min(n, _KEY_BLOCK)
    states = np.empty(k, dtype=np.uint32)
    x, done = 0, min(k, 64)
    for i in range(done):  # seed the table step by step...
        x = (_LCG_A * x + _LCG_C) & _MASK32
        states[i] = x
    while done < k:  # ...then x[i + d] = A_d * x[i] + C_d doubles it each round
        a_d, c_d = _lcg_jump(done)
        m = min(done, k - done)
        # uint32 arithmetic wraps mod 2**32: exactly the LCG's modulus
        states[done:done + m] = states[:m] * np.uint32(a_d) + np.uint32(c_d)
        done += m
    key = np.empty(n, dtype=np.uint8)
    a_k, c_k = (np.uint32(v) for v in _lcg_jump(k))
    for start in range(0, n, k):  # each block is the previous one advanced k steps
        if start:
            states = states * a_k + c_k
        m = min(k, n - start)
        key[start:start + m] = (states[:m] % np.uint32(255)) & np.uint32(0x0F)
    key.flags.writeable = False
    return key


def _lcg_jump(k: int) -> tuple[int, int]:
    """(A_k, C_k) with LCG^k(x) = A_k x + C_k mod 2**32, by squaring the affine map."""
    a_k, c_k, a, c = 1, 0, _LCG_A, _LCG_C
    while k:
        if k & 1:
            a_k, c_k = (a_k * a) & _MASK32, (c_k * a + c) & _MASK32
        a, c = (a * a) & _MASK32, (c * a + c) & _MASK32
        k >>= 1
    return a_k, c_k
