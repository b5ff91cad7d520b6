"""Generated images as A1111 writes them: `NNNNN-<seed>.png` with a `parameters` text chunk
(prompt, negative prompt, steps, sampler, CFG, seed, size, model, TI hashes). Shared by
every backend's sampler and validation images; `sample --grid`'s contact sheet too.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

from ..errors import OutputExistsError, TextinvError
from ..fsutil import atomic_write_bytes


def next_number(out_dir: Path) -> int:
    """One past the highest leading number of a file name in the folder (A1111's numbering)."""
    heads = (os.path.splitext(name)[0].split("-")[0] for name in os.listdir(out_dir))
    return max((int(h) for h in heads if h.isascii() and h.isdigit()), default=-1) + 1


def encode_png(image, text: str) -> bytes:
    """The PNG bytes of a PIL image with A1111's `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def save_pngs(images, out_dir: Path, seeds: list[int], texts: list[str]) -> list[Path]:
    """A batch's images, numbered in seed order. The PNG encoding (zlib, which releases the
    GIL) runs in threads: a batch of 8 at 512 px costs ~0.5 s on one core, a quarter of what
    rendering them takes on a fast GPU."""
    from concurrent.futures import ThreadPoolExecutor

    images = list(images)
    if len(images) <= 1:
        blobs = [encode_png(im, t) for im, t in zip(images, texts)]
    else:
        with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1)) as pool:
            blobs = list(pool.map(encode_png, images, texts))
    return [_write_numbered(data, out_dir, seed) for data, seed in zip(blobs, seeds)]


def _write_numbered(data: bytes, out_dir: Path, seed: int) -> Path:
    number = next_number(out_dir)
    for _ in range(1000):  # another sampler writing into the same folder took the number: take the next
        path = out_dir / f"{number:05d}-{seed}.png"
        try:
            atomic_write_bytes(path, data)
            return path
        except OutputExistsError:
            number += 1
    raise TextinvError(f"Could not find a free file name in {out_dir}.", "Pick another folder with -o.")


def _quote(value) -> str:
    """A1111's infotext quoting: JSON-quote a value holding a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(request, *, seed: int, width: int, height: int, model_name: str, sampler: str) -> str:
    """A1111's `parameters` text: prompt, `Negative prompt: ...`, then `Key: value, ...`.

    Keys, order and quoting follow A1111's create_infotext; TI hashes are `name: shorthash`
    joined by ", " with ':' and ',' removed from names, as A1111 writes them.
    """
    from .. import __version__

    hashes = [f"{(ref.name or ref.token.strip('<>')).replace(':', '').replace(',', '')}: {ref.short_hash}"
              for ref in request.embeddings if ref.short_hash]
    params = {"Steps": request.steps, "Sampler": sampler,
              "CFG scale": float(request.guidance), "Seed": seed, "Size": f"{width}x{height}",
              "Model": model_name, "TI hashes": ", ".join(hashes) or None, "Version": f"textinv {__version__}"}
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {request.negative}" if request.negative else ""
    return f"{request.prompt}{negative}\n{line}".strip()


def model_label(model: str) -> str:
    """What the infotext and messages call a model: a folder's name, or the Hub id as given."""
    path = Path(model)
    return path.name if path.is_dir() else str(model)


def validation_text(spec, *, prompt: str, index: int, resolution: int, vectors: dict) -> str:
    """The `parameters` block of validation image `index` of a run: the settings the
    backends' validation renders with (DDIM, CFG 7.5, no negative prompt, seed + index) and,
    as A1111's TI hashes, the trained embedding as it is at that step (the short content
    hash the registry would give these vectors; `vectors`: slot -> float32 [n, width])."""
    from ..embedding import Embedding
    from .spec import EmbeddingRef, SampleRequest

    short = Embedding(token=spec.token, vectors=dict(vectors)).content_sha256()[:12]
    ref = EmbeddingRef(token=spec.token, vectors=vectors, short_hash=short, name=spec.name or "")
    seed = spec.seed + index
    request = SampleRequest(prompt=prompt, model=spec.model, out_dir="", embeddings=[ref],
                            steps=spec.validate_steps, scheduler="ddim", guidance=7.5, seed=seed)
    return infotext(request, seed=seed, width=resolution, height=resolution, model_name=model_label(spec.model),
                    sampler="DDIM")


def grid_rows(n: int) -> int:
    """A1111's default grid shape (n_rows -1): round(sqrt(n)) rows, at most n."""
    return max(1, min(n, round(math.sqrt(n))))


def write_grid(paths: list, out_dir: Path) -> Path:
    """One PNG of the images at `paths` in A1111's default grid (rows x columns, row by row),
    saved as out_dir/grid-NNNN.png with the first image's `parameters` block, as A1111 gives
    its grids the first image's infotext."""
    from PIL import Image

    images, text = [], ""
    for i, p in enumerate(paths):
        with Image.open(p) as f:
            f.load()
            if i == 0:
                text = f.info.get("parameters", "")
            images.append(f.convert("RGB"))
    if not images:
        raise TextinvError("No images to put in a grid.")
    rows = grid_rows(len(images))
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        sheet.paste(im if im.size == (w, h) else im.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    data = encode_png(sheet, text)
    out_dir = Path(out_dir)
    taken = [int(m.group(1)) for m in (re.match(r"grid-(\d+)\.png$", n) for n in os.listdir(out_dir)) if m]
    number = max(taken, default=-1) + 1
    for _ in range(1000):  # another sampler took the number: take the next
        path = out_dir / f"grid-{number:04d}.png"
        try:
            atomic_write_bytes(path, data)
            return path
        except OutputExistsError:
            number += 1
    raise TextinvError(f"Could not find a free file name in {out_dir}.", "Pick another folder with -o.")


def with_grid(events, out_dir: Path):
    """Pass a sampling run's events through; once it finishes, write the contact sheet of its
    images and add its path to the `finished` event as `grid`. One image gets no sheet (A1111's
    default, grid_only_if_multiple), and a warning says so."""
    from .spec import Event, RunWarning

    try:
        for event in events:
            paths = event.data.get("paths") if event.kind == "finished" else None
            if paths and len(paths) == 1:
                yield Event.of(RunWarning(message="--grid: one image makes no grid (pass -n 2 or more)."))
            elif paths:
                grid = write_grid(paths, Path(event.data.get("out_dir") or out_dir))
                event = Event(event.kind, {**event.data, "grid": str(grid)}, event.payload)
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:  # Ctrl-C or an error here: stop the backend's work now
            close()


def check_out_dir(out_dir: Path) -> None:
    """The folder, or the nearest part of its path that exists, must be a writable folder."""
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise TextinvError(f"Cannot write images into {out_dir}: {probe} is not a writable folder.",
                           "Pick another folder with -o.")
