"""Writing AUTOMATIC1111's image-embedded embeddings (PNG and WebP), without torch.

The layout (text chunk, pixel side band) is described in a1111_image, which reads it; the
writer checks its own output with that reader's band decoder before returning any bytes.

A1111 takes an image embedding's prompt word from its `name` field, and its own images carry
bare names (a1111_names): the `name` written is the bare word (`<cat-toy>` -> `cat-toy`), the
same word A1111 takes from the stem of every other file textinv writes. The exact token goes
beside it under `textinv.token` (A1111 reads only the fields it knows), so reading the image
back gives the token it was written with.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, features

from ..errors import FormatError, UnsupportedFormatError
from .layouts import TOKEN_META
from . import a1111_image as reading
from .a1111_names import a1111_word
from .a1111_image import TENSOR_KEY, TEXT_KEY, extract_side_band, inflate_band, lcg_key

_MIN_PREVIEW_HEIGHT = 16  # the band is h rows tall; tiny heights make very wide, fragile bands


def dump_png_embedding(data: dict, *, caption: str, preview=None) -> bytes:
    """A PNG carrying the embedding twice, like A1111's image embeddings: text chunk + side band."""
    data, caption = _bare_name(data), a1111_word(caption)
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
    data, caption = _bare_name(data), a1111_word(caption)
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


def _bare_name(data):
    """`data` with the bare word as `name` and the exact token under textinv.token when the
    two differ (see the module docstring); anything else unchanged."""
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or a1111_word(name) == name:
        return data
    return {**data, "name": a1111_word(name), TOKEN_META: name}


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
    if h < _MIN_PREVIEW_HEIGHT or w < 1 or h * w > reading.MAX_PIXELS // 2:
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
    key = lcg_key(low.size).reshape(low.shape)
    shades = _edge_style(data)
    low = low ^ _dots(low.shape, shades) ^ key
    high = high ^ _dots(high.shape, shades[::-1]) ^ key
    band = low.shape[1]
    if h * (2 * band + w + 2) > reading.MAX_PIXELS:  # readers (ours too) would refuse to decode it
        raise UnsupportedFormatError("The image with this embedding's side band would exceed "
                                     f"{reading.MAX_PIXELS:,} pixels.", "Use a smaller preview, or none.")
    canvas = np.zeros((h, 2 * band + w + 2, 3), np.uint8)
    canvas[:, :band] = low
    canvas[:, band + 1:band + 1 + w] = preview
    canvas[:, band + 2 + w:] = high
    try:  # a preview that defeats the crop/separator rules would silently lose the band
        ok = inflate_band(extract_side_band(canvas, "preview"), "preview") == payload
    except FormatError:
        ok = False
    if not ok:
        raise UnsupportedFormatError("This preview image cannot carry the embedding's side band.",
                                     "Use a larger preview, or none for the default.")
    return Image.fromarray(canvas, "RGB")
