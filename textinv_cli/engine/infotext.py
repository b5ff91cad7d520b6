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
from ..writes import atomic_write_bytes


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
    return _write_free(data, out_dir, next_number(out_dir), lambda number: f"{number:05d}-{seed}.png")


def _write_free(data: bytes, out_dir: Path, number: int, name) -> Path:
    """`data` written as out_dir/name(number), or under the next number when another sampler
    writing into the same folder took that one."""
    for _ in range(1000):
        path = out_dir / name(number)
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
    joined by ", " with ':' and ',' removed from names, as A1111 writes them. A single-file
    model adds `Model hash` and names itself by its stem, a --vae file adds `VAE hash` and
    `VAE` (its file name), as A1111 writes them (the request's model_hash ... vae_name).
    """
    from .. import __version__

    hashes = [f"{(ref.name or ref.token.strip('<>')).replace(':', '').replace(',', '')}: {ref.short_hash}"
              for ref in request.embeddings if ref.short_hash]
    params = {"Steps": request.steps, "Sampler": sampler,
              "CFG scale": float(request.guidance), "Seed": seed, "Size": f"{width}x{height}",
              "Model hash": getattr(request, "model_hash", "") or None,
              "Model": getattr(request, "model_title", "") or model_name,
              "VAE hash": getattr(request, "vae_hash", "") or None, "VAE": getattr(request, "vae_name", "") or None,
              "Clip skip": clip_skip if (clip_skip := getattr(request, "clip_skip", 1)) > 1 else None,
              "TI hashes": ", ".join(hashes) or None, "Version": f"textinv {__version__}"}
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {request.negative}" if request.negative else ""
    return f"{request.prompt}{negative}\n{line}".strip()


def a1111_model_fields(model_file: str | None, model_sha256: str | None, vae_file: str | None,
                       vae_sha256: str | None) -> dict[str, str]:
    """SampleRequest's model_hash, model_title, vae_hash and vae_name for a single-file model
    and a --vae file, as A1111 writes them: the short hash (first 10 hex of the sha256), the
    checkpoint's stem, the VAE's file name; empty for what is not given."""
    def short(sha256: str | None, given: str | None) -> str:
        if not (given and sha256):
            return ""
        from ..models.checkpoints.hashes import short_hash

        return short_hash(sha256)

    return {"model_hash": short(model_sha256, model_file), "model_title": Path(model_file).stem if model_file else "",
            "vae_hash": short(vae_sha256, vae_file), "vae_name": Path(vae_file).name if vae_file else ""}


def model_label(model: str) -> str:
    """What the infotext and messages call a model: a folder's name, or the Hub id as given; a
    folder made from a checkpoint file (a cached conversion, a --vae view) by the file's stem."""
    path = Path(model)
    if not path.is_dir():
        return str(model)
    from ..models.model_views import view_info

    joined = view_info(path)
    if joined is not None and joined.get("model"):
        path = Path(str(joined["model"]))
    from ..models.checkpoints.cache import read_marker

    marker = read_marker(path) or {}
    source = marker.get("source") if marker.get("kind") == "model" else None
    return Path(source).stem if isinstance(source, str) and source else path.name


VALIDATION_GUIDANCE = 7.5  # the CFG scale every backend's validation images render with (and record)


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
                            steps=spec.validate_steps, scheduler="ddim", guidance=VALIDATION_GUIDANCE, seed=seed,
                            clip_skip=getattr(spec, "clip_skip", 1),
                            **a1111_model_fields(getattr(spec, "model_file", None), getattr(spec, "model_sha256", None),
                                                 getattr(spec, "vae", None), getattr(spec, "vae_sha256", None)))
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
    return _write_free(data, out_dir, max(taken, default=-1) + 1, lambda number: f"grid-{number:04d}.png")


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


# -- reading a parameters block back (`sample --params-from image.png`) --------------------------

PARAMS_MAX = 64 * 1024      # bytes of one parameters chunk (compressed and expanded): A1111's are ~1 KB
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNKS_MAX = 100_000       # chunk headers walked before giving up (each costs one seek)
_KEY = re.compile(r"\s*(\w[\w \-/]{0,63}):\s*")  # A1111's key pattern, bounded (linear scan)


def read_png_parameters(path) -> str:
    """The text of the `parameters` chunk (tEXt, zTXt or iTXt) of the PNG at `path`.

    Chunks are walked by their headers and skipped by seeking, so a large image costs a few
    reads; the parameters chunk is read only up to PARAMS_MAX bytes, and decompressed to at
    most that. Anything else (not a PNG, no such chunk, too large) is a TextinvError."""
    import zlib

    from ..fsutil import open_regular

    path = Path(path)
    fd, _ = open_regular(path)
    try:
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = os.read(fd, n - len(data))
                if not chunk:
                    break
                data += chunk
            return data

        if read(8) != _PNG_SIGNATURE:
            raise TextinvError(f"{path} is not a PNG image; --params-from reads the parameters A1111 writes into PNGs.",
                               "Pass a PNG written by A1111 or textinv sample.")
        for _ in range(_CHUNKS_MAX):
            head = read(8)
            if len(head) < 8:
                break
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IEND":
                break
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                keyword = read(min(length, 80))
                if keyword.split(b"\0", 1)[0] == b"parameters":
                    if length > PARAMS_MAX:
                        raise TextinvError(f"The parameters text of {path} is {length} bytes; textinv reads at most "
                                           f"{PARAMS_MAX}.", "Pass the options on the command line instead.")
                    data = keyword + read(length - len(keyword))
                    return _chunk_text(kind, data, zlib, path)
                os.lseek(fd, length - len(keyword) + 4, os.SEEK_CUR)
            else:
                os.lseek(fd, length + 4, os.SEEK_CUR)  # data and CRC
    finally:
        os.close(fd)
    raise TextinvError(f"{path} holds no A1111 parameters (no 'parameters' text chunk).",
                       "Pass a PNG written by A1111 (PNG info) or textinv sample, or give the options yourself.")


def _chunk_text(kind: bytes, data: bytes, zlib, path) -> str:
    def inflate(raw: bytes) -> bytes:
        d = zlib.decompressobj()
        out = d.decompress(raw, PARAMS_MAX + 1)
        if len(out) > PARAMS_MAX:
            raise TextinvError(f"The parameters text of {path} expands to more than {PARAMS_MAX} bytes.",
                               "Pass the options on the command line instead.")
        return out

    try:
        body = data.split(b"\0", 1)[1]
        if kind == b"tEXt":
            return body.decode("latin-1")
        if kind == b"zTXt":
            return inflate(body[1:]).decode("latin-1")
        compressed, rest = body[0], body[2:]
        _lang, _translated, text = rest.split(b"\0", 2)
        return (inflate(text) if compressed else text).decode("utf-8")
    except (IndexError, ValueError, zlib.error):
        raise TextinvError(f"The parameters text chunk of {path} is damaged.",
                           "Pass the options on the command line instead.") from None


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an A1111 parameters block, as A1111's
    parse_generation_parameters reads it: the last line holds `Key: value, ...` (values
    JSON-quoted when they hold a comma or colon) when it has at least 3 of them; the lines
    before are the prompt, up to a line starting `Negative prompt:`. Linear in the text."""
    lines = str(text).strip().split("\n")
    params = _parse_params(lines[-1])
    if len(params) < 3:
        params = {}
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), params


def _parse_params(line: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos, n, unclosed_from = 0, len(line), None
    while pos < n:
        m = _KEY.match(line, pos)
        if m is None:  # not a key here: on to the next item
            comma = line.find(",", pos)
            pos = n if comma < 0 else comma + 1
            continue
        key, pos = m.group(1).strip(), m.end()
        end = _closing_quote(line, pos) if line.startswith('"', pos) and unclosed_from is None else -1
        if end > 0:
            try:
                value = str(json.loads(line[pos:end + 1]))
            except ValueError:
                value = line[pos + 1:end]
            pos = end + 1
            comma = line.find(",", pos)
            pos = n if comma < 0 else comma + 1
        else:
            if line.startswith('"', pos):
                unclosed_from = pos  # no closing quote after here: later quotes are not searched again
            comma = line.find(",", pos)
            value, pos = (line[pos:] if comma < 0 else line[pos:comma]), (n if comma < 0 else comma + 1)
        params.setdefault(key, value.strip())
    return params


def _closing_quote(line: str, start: int) -> int:
    """Index of the quote closing the one at `start` (backslash escapes skipped); -1 if none.
    Each character is looked at a bounded number of times."""
    i = start + 1
    q = line.find('"', i)
    while q >= 0:
        b = line.find("\\", i, q)
        if b < 0:
            return q
        i = b + 2
        if i > q:
            q = line.find('"', i)
    return -1


def sample_options(text: str) -> tuple[dict, dict[str, str]]:
    """What `sample` takes from an A1111 parameters block: ({prompt, negative, steps,
    scheduler, guidance, seed, width, height, clip_skip}: those present and readable, {option:
    problem} for those present and unreadable: steps, guidance, seed, clip skip, size). The
    sampler is A1111's name as the block means it (Schedule type folded in: samplers.from_infotext);
    whether textinv runs it is for the caller to check. Problems quote the values escaped."""
    from ..untrusted import quoted
    from .samplers import from_infotext

    prompt, negative, params = parse_infotext(text)
    found: dict = {"prompt": prompt, "negative": negative}
    problems: dict[str, str] = {}

    def number(key: str, name: str, kind):
        raw = params.get(key)
        if raw is None:
            return None
        try:
            value = kind(raw)
            if kind is float and not math.isfinite(value):
                raise ValueError
            return value
        except (ValueError, OverflowError):
            problems[name] = f"{key} must be a number, not {quoted(raw, 40)}"
            return None

    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("Clip skip", "clip_skip", int)):
        value = number(key, name, kind)
        if value is not None:
            found[name] = value
    if "Sampler" in params:
        found["scheduler"] = from_infotext(params["Sampler"], params.get("Schedule type"))

    size = params.get("Size")
    if size is not None:
        m = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", size)
        if m:
            found["width"], found["height"] = int(m.group(1)), int(m.group(2))
        else:
            problems["size"] = f"Size must be WIDTHxHEIGHT, not {quoted(size, 40)}"
    return found, problems


def model_fields(text: str) -> dict[str, str]:
    """The model and VAE a parameters block says the picture was made with, as A1111 writes
    them ({model_title, model_hash, vae_name, vae_hash}: those present, each cut to 255
    characters; the caller looks them up and escapes them)."""
    _prompt, _negative, params = parse_infotext(text)
    return {name: params[key][:255] for key, name in (("Model", "model_title"), ("Model hash", "model_hash"),
                                                      ("VAE", "vae_name"), ("VAE hash", "vae_hash"))
            if params.get(key)}
