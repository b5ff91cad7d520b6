"""Demo training images: one made-up concept drawn with PIL, no download and no backend.

`textinv tiny-model --images`, `make demo` and the tests train on these. The toy's look is
fixed and everything around it varies with the seed, so there is a concept to learn.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from ..errors import TextinvError
from .tiny import check_seed, publish_folder, refuse_occupied


def write_demo_images(out: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write `n` pictures of one made-up concept (a round red toy with ears and eyes) into
    `out` as 000.png, 001.png, ... and return `out`.

    Backgrounds, positions, sizes and poses vary with the seed; the toy's look does not,
    so there is a concept to learn. Image 1 is RGBA (toy on transparency), image 2
    grayscale and image 3 non-square (1.5 x size wide), so a trainer meets every case.
    Idempotent like the tiny models: an `out` holding exactly these images is returned.
    """
    seed = check_seed(seed)
    if not (isinstance(n, int) and n >= 1) or not (isinstance(size, int) and size >= 16):
        raise TextinvError(f"Need n >= 1 images of size >= 16 px (got n={n!r}, size={size!r}).")
    out = Path(out).expanduser().absolute()
    images = {f"{i:03d}.png": _demo_image(random.Random(seed * 1_000_003 + i), i, size) for i in range(n)}
    if _same_images(out, images):
        return out
    refuse_occupied(out, f"{n} demo images")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, img in images.items():
            img.save(tmp / name, format="PNG")
        publish_folder(tmp, out, lambda: _same_images(out, images), f"{n} demo images")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _same_images(out: Path, images: dict) -> bool:
    """Compare pixels, not bytes: another Pillow may compress the same pixels differently."""
    from PIL import Image

    try:
        if sorted(p.name for p in out.iterdir()) != sorted(images):
            return False
        for name, img in images.items():
            with Image.open(out / name) as f:
                if f.mode != img.mode or f.size != img.size or f.tobytes() != img.tobytes():
                    return False
    except OSError:
        return False
    return True


def _demo_image(rng: random.Random, i: int, size: int):
    from PIL import Image, ImageDraw

    w, h = (size * 3 // 2, size) if i == 3 else (size, size)
    rgba = i == 1
    bg = (0, 0, 0, 0) if rgba else tuple(rng.randint(60, 240) for _ in range(3)) + (255,)
    img = Image.new("RGBA", (w, h), bg)
    d = ImageDraw.Draw(img)
    if not rgba:  # some background clutter: stripes or a horizon, in a second colour
        other = tuple(rng.randint(40, 255) for _ in range(3)) + (255,)
        if rng.random() < 0.5:
            step = rng.randint(6, 14)
            for x in range(-h, w, step * 2):
                d.polygon([(x, h), (x + step, h), (x + step + h, 0), (x + h, 0)], fill=other)
        else:
            d.rectangle([0, int(h * rng.uniform(0.55, 0.8)), w, h], fill=other)
    r = int(min(w, h) * rng.uniform(0.18, 0.3))  # the toy: body, two ears, eyes, a yellow belly
    cx, cy = rng.randint(r + 2, w - r - 2), rng.randint(int(r * 1.6), h - r - 2)
    red, dark = (220, 40, 40, 255), (30, 20, 20, 255)
    for sx in (-1, 1):
        d.polygon([(cx + sx * r * 0.9, cy - r * 0.2), (cx + sx * r * 0.8, cy - r * 1.55),
                   (cx + sx * r * 0.15, cy - r * 0.85)], fill=red)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=red)
    d.ellipse([cx - r * 0.5, cy + r * 0.05, cx + r * 0.5, cy + r * 0.8], fill=(250, 210, 60, 255))
    e = max(1, r // 6)
    for sx in (-1, 1):
        ex, ey = cx + sx * r * 0.4, cy - r * 0.3
        d.ellipse([ex - e, ey - e, ex + e, ey + e], fill=dark)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rgba:
        return img
    return img.convert("L") if i == 2 else img.convert("RGB")
