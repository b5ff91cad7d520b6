"""A run's loss curve, drawn twice without a plotting library: as a sparkline for the
terminal and as a small PNG (Pillow, which textinv already needs for images).

The training loss is one random batch per reading and jumps around; both drawings bin the
readings (the mean of each bin) so the trend shows. The eval loss is on one fixed batch and
is drawn as it is.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_BLOCKS = "_.-:=+*#"  # where the terminal's encoding has no block characters


def binned(points: list[tuple[int, float]], bins: int) -> list[tuple[int, float]]:
    """At most `bins` points: the readings cut into runs of consecutive steps, each its last
    step and mean value (every reading kept when there are few)."""
    pts = [(s, v) for s, v in points if math.isfinite(v)]
    if len(pts) <= bins:
        return pts
    out = []
    for i in range(bins):
        part = pts[i * len(pts) // bins:(i + 1) * len(pts) // bins]
        if part:
            out.append((part[-1][0], sum(v for _, v in part) / len(part)))
    return out


def sparkline(points: list[tuple[int, float]], width: int = 48, ascii_only: bool = False) -> str:
    """The values as one line of block characters, lowest to highest of their own range."""
    values = [v for _, v in binned(points, width)]
    if not values:
        return ""
    chars = ASCII_BLOCKS if ascii_only else BLOCKS
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return chars[len(chars) // 2] * len(values)
    return "".join(chars[min(len(chars) - 1, int((v - lo) / (hi - lo) * len(chars)))] for v in values)


def can_draw_blocks(encoding: str | None) -> bool:
    try:
        BLOCKS.encode(encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


# -- the PNG -------------------------------------------------------------------------------

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 360, 64, 16, 28, 36
LOSS_DOTS, LOSS_LINE, EVAL_LINE = (170, 200, 235), (31, 100, 180), (230, 120, 20)


def png_bytes(loss: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> bytes:
    """The curve as a PNG: loss readings (light dots), their binned mean (blue line) and the
    eval loss (orange line with points), steps on x, loss on y."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = [(s, v) for s, v in loss + evals if math.isfinite(v)]
    draw.text((LEFT, 8), title[:90], fill="black", font=font)
    if not pts:
        draw.text((LEFT, H // 2), "no loss readings yet", fill="gray", font=font)
        return _encode(img)
    s_lo, s_hi = min(s for s, _ in pts), max(s for s, _ in pts)
    v_lo, v_hi = min(v for _, v in pts), max(v for _, v in pts)
    if s_hi == s_lo:
        s_hi = s_lo + 1
    pad = (v_hi - v_lo) * 0.05 or abs(v_hi) * 0.05 or 1.0
    v_lo, v_hi = v_lo - pad, v_hi + pad

    def xy(s: float, v: float) -> tuple[float, float]:
        return (LEFT + (s - s_lo) / (s_hi - s_lo) * (W - LEFT - RIGHT),
                H - BOTTOM - (v - v_lo) / (v_hi - v_lo) * (H - TOP - BOTTOM))

    x0, y0, x1, y1 = LEFT, TOP, W - RIGHT, H - BOTTOM
    for i in range(5):  # horizontal grid lines with their values
        v = v_lo + (v_hi - v_lo) * i / 4
        y = xy(s_lo, v)[1]
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, y1 + 6), f"step {s_lo}", fill="black", font=font)
    draw.text((x1 - 60, y1 + 6), f"step {s_hi}", fill="black", font=font)
    good = [(s, v) for s, v in loss if math.isfinite(v)]
    for s, v in good:
        x, y = xy(s, v)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=LOSS_DOTS)
    mean = binned(good, max(2, min(60, len(good) // 4))) if len(good) >= 8 else good  # about 4 readings a point
    if len(mean) > 1:
        draw.line([xy(s, v) for s, v in mean], fill=LOSS_LINE, width=2)
    ev = [(s, v) for s, v in evals if math.isfinite(v)]
    if len(ev) > 1:
        draw.line([xy(s, v) for s, v in ev], fill=EVAL_LINE, width=2)
    for s, v in ev:
        x, y = xy(s, v)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=EVAL_LINE)
    legend = [("loss (binned mean)", LOSS_LINE)] + ([("eval loss", EVAL_LINE)] if ev else [])
    lx = x1 - 130
    for i, (label, color) in enumerate(legend):
        ly = y0 + 6 + 14 * i
        draw.line([(lx, ly + 6), (lx + 16, ly + 6)], fill=color, width=2)
        draw.text((lx + 22, ly), label, fill="black", font=font)
    return _encode(img)


def _encode(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, loss, evals, title: str) -> Path:
    from ..writes import atomic_write_bytes

    atomic_write_bytes(Path(path), png_bytes(loss, evals, title), force=True)
    return Path(path)
