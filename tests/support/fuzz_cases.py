"""Inputs and checks for fuzzing the format readers (tests/test_fuzz_readers.py).

- `seed_files(root)`: a valid file or folder of every format, written by our own writers,
  for every family each format allows (SD1/SD2/SDXL/SD3/Flux), at real widths (768/1024/1280) and at the tiny
  test widths (32/48/64: structure bytes are then a larger share of the file).
- `mutated(blob)`: a hypothesis strategy of byte-level mutations of a blob.
- `GIANTS`: small files that claim huge sizes; each must be refused before allocating.
- `check_outcome(path)`: the only two outcomes a reader may have.
- `save_to_corpus(...)` / `corpus_cases()`: tests/fuzz_corpus, every input that ever broke
  a reader (see tests/fuzz_corpus/README.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import threading
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from textinv_cli import formats
from textinv_cli.formats import a1111_image, a1111_image_writer, layouts
from textinv_cli.embedding import Embedding
from textinv_cli.families import FAMILIES, family_can_hold
from textinv_cli.errors import TextinvError

from . import malicious_pickles as mp
from .family_embeddings import family_embedding

CORPUS = Path(__file__).parent.parent / "fuzz_corpus"
MANIFEST = CORPUS / "cases.json"
CASE_SECONDS = 10  # hard wall-clock bound per input; a typical one takes about a millisecond
PEAK_BYTES = 64 * 2**20  # what reading one small hostile file may allocate at most
FOLDER_FORMATS = ("sd-concepts", "diffusers-sdxl")
IMAGE_WRITERS = {"a1111-png": a1111_image_writer.dump_png_embedding,
                 "a1111-webp": a1111_image_writer.dump_webp_embedding}
# t5 has no tiny model; 96 stands in (slot-keyed files trust the key, whatever the width)
TINY_WIDTHS = {"sd1": {"clip_l": 32}, "sd2": {"clip_h": 48}, "sdxl": {"clip_l": 32, "clip_g": 64},
               "sd3": {"clip_l": 32, "clip_g": 64, "t5": 96}, "flux": {"clip_l": 32, "t5": 96}}


# -- settings ---------------------------------------------------------------------------------

HUNT = int(os.environ.get("TEXTINV_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """CI: `examples` cases, derandomized (the same ones on every run, nothing saved between
    runs). With TEXTINV_FUZZ_EXAMPLES=N: N fresh random cases per test, to hunt for bugs."""
    return settings(max_examples=HUNT or examples, derandomize=not HUNT, database=None,
                    deadline=timedelta(seconds=2), suppress_health_check=list(HealthCheck))


# -- the two outcomes ------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the alarm. Not an Exception, so no reader's catch-all can swallow it; it
    fails the test even where CPython 3.11 lets it skip the `with` below (raised at a loop's
    back edge inside a try), so it carries the message itself."""


@contextlib.contextmanager
def time_bound(seconds: float = CASE_SECONDS):
    """Fail (not stall CI) when one input takes longer than `seconds`. Main thread, Unix only."""
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0]):  # not ours to arm, or an outer bound runs
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"a reader spent more than {seconds}s on one input (a hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except CaseTimeout:
        raise AssertionError(f"a reader spent more than {seconds}s on one input (a hang?)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_rss_bound(limit: int = PEAK_BYTES):
    """Fail when the process's peak resident size rises `limit` or more above its size at the
    start: it sees what tracemalloc does not (Pillow, zlib). Linux only (writing 5 to
    /proc/self/clear_refs resets the peak; ~50 us); elsewhere it checks nothing. In a long-lived
    process freed pages may be reused unseen, so this is a net, not a measurement."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _status_kib("VmRSS")
    except OSError:
        yield
        return
    yield
    grew = (_status_kib("VmHWM") - start) * 1024
    assert grew < limit, f"peak memory rose {grew / 2**20:.0f} MiB while reading these inputs"


def check_outcome(path: Path, **options) -> Embedding | TextinvError:
    """read_embedding(path, **options): a valid Embedding, or a TextinvError of one or two clear lines.

    Any other exception propagates (so hypothesis reports and shrinks it); a hang fails, and
    so does reading that makes the process's peak memory rise by PEAK_BYTES or more.
    """
    with time_bound(), peak_rss_bound():
        try:
            emb = formats.read_embedding(path, **options)
        except TextinvError as e:
            assert isinstance(e.message, str) and e.message.strip(), repr(e)
            assert "\n" not in e.message and "\n" not in (e.hint or ""), repr(str(e))
            return e
    assert isinstance(emb, Embedding)
    assert emb.family in FAMILIES and emb.token.strip()
    assert family_can_hold(emb.family, emb.vectors)  # the family always fits the slots
    for arr in emb.vectors.values():
        assert arr.dtype == np.float32 and arr.ndim == 2 and arr.size and np.isfinite(arr).all()
    return emb


def put(target: Path, content: bytes | dict[str, bytes]) -> Path:
    """Write a file (bytes) or a folder ({name: bytes}) at target, replacing what was there."""
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if isinstance(content, dict):
        target.mkdir()
        for name, blob in content.items():
            (target / name).write_bytes(blob)
    else:
        target.write_bytes(content)
    return target


# -- seeds and mutations -------------------------------------------------------------------

def _tiny_embedding(family: str) -> Embedding:
    rng = np.random.default_rng(1)
    vectors = {s: rng.standard_normal((2, w)).astype(np.float32) for s, w in TINY_WIDTHS[family].items()}
    return Embedding("<fuzz>", vectors, {"step": "7", "learnable_property": "style"})


def seed_files(root: Path) -> dict[str, tuple[str, bytes | dict[str, bytes]]]:
    """name -> (suffix, file bytes or {member: bytes}) for every writer, family and width set."""
    out = {}
    for fmt, info in formats.WRITERS.items():
        for family in sorted(info.families):
            for size, emb in (("real", family_embedding("<fuzz>", family, n=1)), ("tiny", _tiny_embedding(family))):
                path = root / f"{fmt}-{family}-{size}"
                if size == "tiny" and fmt in IMAGE_WRITERS:  # a 16 px preview: 1-2 KB, fast to decode
                    path.write_bytes(IMAGE_WRITERS[fmt](layouts.a1111_dict(emb), caption=emb.token,
                                                        preview=np.full((16, 16, 3), 90, np.uint8)))
                else:
                    formats.write_embedding(emb, path, fmt)
                content = {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() \
                    else path.read_bytes()
                out[path.name] = (info.suffix, content)
    return out


_BIG = [0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**40, 2**63 - 1, 2**64 - 1]


@st.composite
def mutated(draw, blob: bytes) -> bytes:
    """1-4 edits: set/flip a byte, write a huge integer (a size field claiming GBs), insert,
    delete or duplicate a span, truncate, extend with junk. Positions favour the head and
    tail, where headers and zip directories live."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        region = draw(st.sampled_from(["head", "tail", "any"]))
        lo, hi = {"head": (0, min(n, 512)), "tail": (max(0, n - 512), n), "any": (0, n)}[region]
        pos = draw(st.integers(lo, hi))
        op = draw(st.sampled_from(["set", "flip", "bigint", "insert", "delete", "duplicate", "truncate",
                                   "extend"]))
        if op in ("set", "flip") and pos < n:
            data[pos] = draw(st.integers(0, 255)) if op == "set" else data[pos] ^ (1 << draw(st.integers(0, 7)))
        elif op == "bigint":
            width, order = draw(st.sampled_from([(4, "<"), (4, ">"), (8, "<"), (2, "<")]))
            value = draw(st.sampled_from(_BIG)) & (2 ** (8 * width) - 1)
            data[pos:pos + width] = value.to_bytes(width, "little" if order == "<" else "big")
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.sampled_from([b"\0" * 64, bytes(data[:64]), b"PK\x05\x06" + bytes(18)])) \
                if draw(st.booleans()) else draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


# -- giant claims: refused before allocating -------------------------------------------------

def _st(header: dict | bytes, body: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(w: int, h: int, *chunks: bytes, idat: bytes | None = None) -> bytes:
    """An RGB PNG claiming w x h; by default its pixels are a tiny deflate stream of zeros."""
    if idat is None:
        rows, row = zlib.compressobj(9), bytes(3 * w + 1)
        idat = b"".join(rows.compress(row) for _ in range(h)) + rows.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + b"".join(chunks) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def band_png(payload: bytes, h: int = 64) -> bytes:
    """A PNG whose pixel side band carries `payload` (already zlib'd), laid out as A1111 does."""
    from PIL import Image

    packed = np.frombuffer(payload, np.uint8)
    size = packed.size + (h - packed.size % h)
    size += 3 * h - size % (3 * h)
    low = np.resize(packed & 0x0F, size).reshape(h, -1, 3)
    high = np.resize(packed >> 4, size).reshape(h, -1, 3)
    key = a1111_image.lcg_key(low.size).reshape(low.shape)
    w = low.shape[1]
    canvas = np.zeros((h, 2 * w + 18, 3), np.uint8)
    canvas[:, :w], canvas[:, w + 1:w + 17], canvas[:, w + 18:] = low ^ key, 100, high ^ key
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, "PNG")
    return buf.getvalue()


def _patched_zip_size(blob: bytes, member: str, size: int) -> bytes:
    """A zip whose central directory says `member` unpacks to `size` bytes."""
    out = bytearray(blob)
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46:pos + 46 + name_len].decode() == member:
            struct.pack_into("<I", out, pos + 24, size)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def _op_bomb() -> bytes:  # a 1 KB file whose deflated data.pkl makes 262k lists
    return mp.torch_zip(mp.PROTO2 + b"]" + b"]a" * (2**18 - 64) + mp.STOP, compress={"archive/data.pkl"})


def _webp_claiming(w: int, h: int) -> bytes:
    bits = (w - 1) | (h - 1) << 14  # VP8L: 14-bit width-1, 14-bit height-1, alpha, version
    vp8l = b"\x2f" + struct.pack("<I", bits) + bytes(16)
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _values_bomb() -> bytes:  # under the JSON byte cap, over the value cap: 4M numbers
    js = b'{"string_to_param": {"*": {"TORCHTENSOR": [' + b"0," * (4 * 2**20 - 64) + b'0]}}}'
    return band_png(zlib.compress(js, 9))


_VALID_BIN = mp.valid_file()
# name -> (suffix, bytes builder, words the refusal must contain)
GIANTS = {
    "safetensors-header-claims-2^64-bytes": (".safetensors", lambda: _st(b"{}", length=2**64 - 1), "not a recognised"),
    "safetensors-header-claims-100MiB": (".safetensors", lambda: _st(b"{}" + b" " * 512, length=100 * 2**20), "header claims"),
    "safetensors-shape-10^24-elements": (".safetensors", lambda: _st(
        {"<t>": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 16]}}, bytes(16)), "needs"),
    "safetensors-offsets-claim-2TiB": (".safetensors", lambda: _st(
        {"<t>": {"dtype": "U8", "shape": [2**41], "data_offsets": [0, 2**41]}}, bytes(16)), "claims bytes"),
    "safetensors-header-nested-100k-deep": (".safetensors", lambda: _st(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "deeply"),
    "zip-member-claims-4GiB": (".bin", lambda: _patched_zip_size(_VALID_BIN, "archive/data/0", 2**32 - 1), "zip bomb"),
    "zip-deflated-member-20MB-of-zeros": (".bin", lambda: mp.torch_zip(
        mp.PROTO2 + mp.tensor(numel=5_000_000, size=(5_000_000,), stride=(1,)) + mp.STOP,
        {"0": bytes(20_000_000)}, compress={"archive/data/0"}), "zip bomb"),
    "zip-deflated-data.pkl-262k-lists": (".bin", _op_bomb, "too large"),
    "pickle-string-claims-1TiB": (".bin", lambda: mp.torch_zip(mp.PROTO2 + b"\x8d" + struct.pack("<Q", 2**40) + b"x" + mp.STOP), "corrupt"),
    "pickle-storage-numel-10^12": (".bin", lambda: mp.torch_zip(
        mp.PROTO2 + mp.tensor(numel=10**12, size=(2,), stride=(1,)) + mp.STOP, {"0": mp.F32_4}), "needs"),
    "pickle-shape-10^12-by-stride-0": (".bin", lambda: mp.torch_zip(
        mp.PROTO2 + mp.tensor(numel=1, size=(10**6, 10**6), stride=(0, 0)) + mp.STOP, {"0": mp.F32_4[:4]}), "larger than the file"),
    "pickle-zero-rows-by-2^124-columns": (".bin", lambda: mp.torch_zip(
        mp.PROTO2 + mp.tensor(size=(0,) + (2**31 - 1,) * 4, stride=(1,) * 5) + mp.STOP, {"0": mp.F32_4}), "corrupt"),
    "png-claims-100000x100000": (".png", lambda: png(100_000, 100_000, idat=zlib.compress(b"")), "refusing to decode"),
    "png-claims-4096x4096": (".png", lambda: png(4096, 4096), "refusing to decode"),
    "png-2048x2048-within-the-cap": (".png", lambda: png(2048, 2048), "no embedding found"),
    "png-text-chunk-claims-2GiB": (".png", lambda: png(8, 8)[:33] + struct.pack(">I", 2**31 - 1) + b"tEXt" + b"a" * 64, "unreadable"),
    "png-ztxt-bomb": (".png", lambda: png(8, 8, chunk(b"zTXt", b"sd-ti-embedding\0\0" + zlib.compress(b"A" * 2**21, 9))), "unreadable"),
    "png-side-band-zlib-bomb": (".png", lambda: band_png(zlib.compress(b" " * 9 * 2**20, 9)), "zlib bomb"),
    "png-side-band-4M-values": (".png", _values_bomb, "values"),
    "webp-claims-16384x16384": (".webp", lambda: _webp_claiming(16384, 16384), ""),
}


# -- the corpus ----------------------------------------------------------------------------

def corpus_cases() -> dict[str, dict]:
    """file name -> {"expect": "ok" | error class name, "mentions": text, "found": how}."""
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def save_to_corpus(content: bytes | dict[str, bytes], fmt: str, what: str, suffix: str, *,
                   expect: str, mentions: str = "", found: str = "") -> Path:
    """Keep an input that broke a reader, replayed by test_corpus_replays from then on.

    `fmt` and `what` name the file ("safetensors--bool-in-shape.safetensors"); `expect` is
    the outcome once fixed: "ok", or the TextinvError subclass (e.g. "FormatError") whose
    message contains `mentions`. A folder input is given as {member: bytes}.
    """
    name = f"{fmt}--{what}{suffix}"
    put(CORPUS / name, content)
    cases = corpus_cases()
    cases[name] = {"expect": expect, "mentions": mentions, "found": found}
    MANIFEST.write_text(json.dumps(dict(sorted(cases.items())), indent=1) + "\n")
    return CORPUS / name
