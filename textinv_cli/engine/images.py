"""Training images as every backend sees them: decoded to RGB, resized or centre-cropped.

Pure PIL/numpy so the torch and JAX backends preprocess identically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TextinvError


def open_rgb(path: Path):
    """The image as RGB; transparent pixels become white (what a viewer shows, not black)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            f.load()
            img = ImageOps.exif_transpose(f)  # phone photos store rotation in EXIF
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        raise TextinvError(f"Cannot read the image {path}: {e}",
                           "Remove or re-save it (PNG/JPEG), or move it out of the data folder.") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: scale to 8 bits before the RGB conversion clips it.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def preprocess(img, resolution: int, center_crop: bool) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """(uint8 [res, res, 3], original (h, w), crop top-left in resized pixels) of an RGB image.

    The crop coordinates are SDXL's micro-conditioning: where the crop starts in the image
    scaled so its shorter side is `resolution`; (0, 0) when the whole image is resized.
    """
    from PIL import Image

    w, h = img.size
    top = left = 0
    if center_crop:
        c = min(w, h)
        top, left = (h - c) // 2, (w - c) // 2
        img = img.crop((left, top, left + c, top + c))
        top, left = round(top * resolution / c), round(left * resolution / c)
    img = img.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8), (h, w), (top, left)
