"""AUTOMATIC1111's image-embedded embeddings (PNG and WebP), read and written without torch.

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
import hashlib
import io
import json
import warnings
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, features

from ..errors import FormatError, TextinvError, UnsupportedFormatError

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
_MIN_PREVIEW_HEIGHT = 16  # the band is h rows tall; tiny heights make very wide, fragile bands
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LCG_A, _LCG_C, _MASK32 = 1664525, 1013904223, 0xFFFFFFFF

_NO_EMBEDDING_HINT = ("It has no sd-ti-embedding text chunk and no readable pixel side band: "
                      "a plain preview, or re-saved with lossy compression.")


def image_kind(data: bytes) -> str | None:
    """"png" or "webp" by magic bytes, else None."""
    if data[:8] == _PNG_MAGIC:
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
        band = _extract_side_band(rgb, source)
        del rgb
        return _parse_json(_inflate(band, source), source, "pixel side band")
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


def _extract_side_band(rgb: np.ndarray, source: str) -> bytes:
    """The zlib bytes hidden in the side band (not yet inflated)."""
    nib = _crop_black(rgb) & 0x0F
    separators = np.flatnonzero(nib.max(axis=0).max(axis=1) == 0)  # all-black columns
    if separators.size < 2:
        raise FormatError(f"{source}: no embedding found in this image.", _NO_EMBEDDING_HINT)
    low, high = nib[:, :separators[0]], nib[:, separators[-1] + 1:]
    if low.size == 0 or low.shape != high.shape:
        raise FormatError(f"{source}: no embedding found in this image.", _NO_EMBEDDING_HINT)
    key = _lcg_key(low.size).reshape(low.shape)
    # in place on nib (our own copy): a band can be half of a 4 Mpx image, so no temporaries
    low ^= key
    high ^= key
    high <<= 4
    high |= low
    return high.tobytes()


def _inflate(blob: bytes, source: str) -> bytes:
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
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN are judged by Embedding
        return np.array(level, dtype=np.float64).astype(np.float32).reshape(shape)


_KEY_BLOCK = 1 << 16


@lru_cache(maxsize=1)  # the writer's self-check asks again for the same n
def _lcg_key(n: int) -> np.ndarray:
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


# -- writing -------------------------------------------------------------------------


def dump_png_embedding(data: dict, *, caption: str, preview=None) -> bytes:
    """A PNG carrying the embedding twice, like A1111's image embeddings: text chunk + side band."""
    payload = _to_json(data).encode("ascii")
    img = _embed_side_band(_preview_array(preview, caption), payload, data)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(payload).decode("ascii"))
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def dump_webp_embedding(data: dict, *, caption: str, preview=None) -> bytes:
    """A lossless WebP carrying the embedding in its side band (WebP has no text chunks)."""
    if not features.check("webp"):
        raise UnsupportedFormatError("This Pillow build cannot write WebP.", "Write a PNG instead.")
    payload = _to_json(data).encode("ascii")
    img = _embed_side_band(_preview_array(preview, caption), payload, data)
    buf = io.BytesIO()
    img.save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True)
    out = buf.getvalue()
    with Image.open(io.BytesIO(out)) as back:  # lossless must mean bit-exact, or the band is lost
        if not np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img)):
            raise UnsupportedFormatError("This Pillow's WebP encoder altered the pixels.",
                                         "Write a PNG instead.")
    return out


def _to_json(data: dict) -> str:
    """json.dumps exactly as A1111 writes it: default separators, tensors as TORCHTENSOR lists.

    float32 values become Python floats whose repr round-trips, so reading is bit-exact.
    """
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
            arr = np.asarray(obj)
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32)  # A1111's vectors are float32 tensors
            elif arr.dtype.kind not in "iub":
                raise TypeError(f"array of {arr.dtype}")
            return {TENSOR_KEY: arr.tolist()}
        raise TypeError(type(obj).__name__)

    if not isinstance(data, dict):
        raise UnsupportedFormatError("An image embedding holds a dict of embedding data.")
    try:
        return json.dumps(data, default=default)
    except (TypeError, ValueError) as e:
        raise UnsupportedFormatError(f"The embedding data cannot be stored as JSON ({e}).") from None


def _preview_array(preview, caption: str) -> np.ndarray:
    if preview is None:
        return _default_preview(caption)
    if isinstance(preview, Image.Image):
        arr = np.asarray(preview.convert("RGB"))
    else:
        arr = np.asarray(preview)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise UnsupportedFormatError(
                f"A preview must be an HxWx3 uint8 image, not {arr.dtype} {list(arr.shape)}.")
    h, w = arr.shape[:2]
    if h < _MIN_PREVIEW_HEIGHT or w < 1 or h * w > MAX_PIXELS // 2:
        raise UnsupportedFormatError(f"A {w}x{h} preview cannot carry an embedding.",
                                     f"Use a preview {_MIN_PREVIEW_HEIGHT}+ pixels tall and of "
                                     "ordinary size, or none for the default.")
    return np.ascontiguousarray(arr)


def _default_preview(caption: str, size: int = 512) -> np.ndarray:
    """A dark gradient tinted by the caption, with the caption (token) written across it."""
    tint = np.frombuffer(hashlib.sha256(caption.encode("utf-8")).digest()[:3], np.uint8) / 255.0
    ramp = np.linspace(0.25, 0.8, size)[:, None, None]
    base = 40 + 120 * ramp * (0.4 + 0.6 * tint)  # never black: keeps the band's crop simple
    img = Image.fromarray(np.broadcast_to(base, (size, size, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    text = caption if caption.strip() else "embedding"
    font = _font(56)
    width = draw.textbbox((0, 0), text, font=font)[2] or 1
    if width > size * 0.9:
        font = _font(max(10, int(56 * size * 0.9 / width)))
    try:
        draw.text((size / 2, size / 2), text, font=font, fill=(255, 255, 255), anchor="mm")
    except (UnicodeError, ValueError):  # the bitmap fallback font is Latin-1 only
        draw.text((size / 2, size / 2), text.encode("ascii", "replace").decode(), font=font,
                  fill=(255, 255, 255), anchor="mm")
    return np.asarray(img)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1, FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _edge_style(data: dict) -> list[int]:
    """Dot shades A1111 derives from the first vector: |v[:1024]| scaled to 0..255."""
    first = None
    params = data.get("string_to_param")
    if isinstance(params, dict) and params:
        first = next(iter(params.values()))
    else:  # SDXL-style dicts: the first array-like value
        first = next((v for v in data.values() if hasattr(v, "__array__")), None)
    try:
        vec = np.abs(np.atleast_2d(np.asarray(first, dtype=np.float32)).astype(np.float64)[0][:1024])
    except (TypeError, ValueError, IndexError):
        return [0]
    peak = vec.max() if vec.size else 0.0
    if not np.isfinite(peak) or peak <= 0 or not np.isfinite(vec).all():
        return [0]
    return (vec / peak * 255).astype(np.uint8).tolist()


def _dots(shape: tuple, shades: list[int]) -> np.ndarray:
    """A1111's decoration: a staggered grid of 6 px dots in the given shades, high nibble only."""
    h, w = shape[0], shape[1]
    im = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, w, 8):
        for row, y in enumerate(range(-6, h, 8)):
            offset = 4 if row % 2 == 0 else 0
            shade = shades[i % len(shades)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    return np.asarray(im) & 0xF0


def _embed_side_band(preview: np.ndarray, payload: bytes, data: dict) -> Image.Image:
    """The preview with the zlib'd JSON in nibble columns on both sides (A1111's layout)."""
    packed = np.frombuffer(zlib.compress(payload, 9), np.uint8)
    h, w = preview.shape[:2]
    size = packed.size + (h - packed.size % h)  # always grows, even when already a multiple
    size += h * 3 - size % (h * 3)
    low = np.resize(packed & 0x0F, size).reshape(h, -1, 3)  # resize repeats the bytes cyclically
    high = np.resize(packed >> 4, size).reshape(h, -1, 3)
    key = _lcg_key(low.size).reshape(low.shape)
    shades = _edge_style(data)
    low = low ^ _dots(low.shape, shades) ^ key
    high = high ^ _dots(high.shape, shades[::-1]) ^ key
    band = low.shape[1]
    if h * (2 * band + w + 2) > MAX_PIXELS:  # readers (ours too) would refuse to decode it
        raise UnsupportedFormatError("The image with this embedding's side band would exceed "
                                     f"{MAX_PIXELS:,} pixels.", "Use a smaller preview, or none.")
    canvas = np.zeros((h, 2 * band + w + 2, 3), np.uint8)
    canvas[:, :band] = low
    canvas[:, band + 1:band + 1 + w] = preview
    canvas[:, band + 2 + w:] = high
    try:  # a preview that defeats the crop/separator rules would silently lose the band
        ok = _inflate(_extract_side_band(canvas, "preview"), "preview") == payload
    except FormatError:
        ok = False
    if not ok:
        raise UnsupportedFormatError("This preview image cannot carry the embedding's side band.",
                                     "Use a larger preview, or none for the default.")
    return Image.fromarray(canvas, "RGB")
