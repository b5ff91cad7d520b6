"""A strict safetensors reader and a deterministic writer.

Who decides what a valid file is: the reference `safetensors` package (its Rust parser, no
torch needed). Every file we accept, it accepts too, and the names, dtypes, shapes and bytes
we return are the ones it returns; so no file can read differently here than in diffusers,
A1111 or ComfyUI, and our reader can never be looser than the reference.

What we keep ourselves is what it does not do:
- memory bounds checked BEFORE any parser sees the header (ours or the reference's, which
  buffers the whole JSON tree): the header length cap and an item cap, so a 60 MiB header
  of `[]` is refused in milliseconds instead of costing gigabytes;
- stricter rules where the reference is lenient: a key given twice, an integer wider than
  u64 (a 5000-digit literal would crash Python's int parsing), more than MAX_NDIM dims,
  dtypes numpy cannot hold;
- our own checks run first only to say precisely what is wrong (overlap, gap, trailing
  bytes...): one-line FormatErrors that quote the file's strings via untrusted.shown;
- BF16 widened to float32 (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct

import numpy as np

from ..errors import FormatError, UnsupportedFormatError
from ..fsutil import pread_all
from ..untrusted import quoted, shown

DTYPES = {  # a header's dtype tag -> the numpy dtype its bytes are read as
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "BF16": np.dtype("<u2"),  # widened to float32 below
}
_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64"}
MAX_HEADER = 100 * 1024 * 1024  # the reference's own limit (safetensors N_MAX is 100 MB)
MAX_NDIM = 32  # numpy allows 64; no real tensor comes near either
# Item cap, counted before either parser runs: each `[`, `{` or `,` in the header can make one
# object (a Python list is 56 bytes, a serde Content node 32, and the reference buffers the
# whole tree). A real header has one item per 9-20 bytes (an embedding's 72-byte header has 8;
# model files have long names; SDXL's 2515 tensors are ~20k items); a hostile one has one per
# 1.5 (`[],`: 60 MiB of it took 1.6 GB and 25 s). ITEM_FLOOR + one per ITEM_BYTES bytes, and
# never over MAX_ITEMS (32k tensors), bounds both parsers together to ~55 MiB at the cap
# (measured: 23 MiB ours, 30 MiB the reference's), checked by tests/test_reader_bounds.py.
ITEM_FLOOR, ITEM_BYTES, MAX_ITEMS = 4096, 8, 1 << 18
_U64_DIGITS = 20  # the format's integers are u64; a longer literal is refused before int()
_CORRUPT = "The file is truncated, corrupt or not a safetensors file."


def load_safetensors(data: bytes, source: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ({name: array}, metadata). Raises FormatError."""
    tensors, meta, _ = load_tagged(data, source)
    return tensors, meta


def load_tagged(data: bytes, source: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """load_safetensors, plus each tensor's stored dtype tag ("BF16" before widening)."""
    if len(data) < 8:
        raise FormatError(f"{source} is too short to be a safetensors file ({len(data)} bytes).")
    (n,) = struct.unpack("<Q", data[:8])
    _check_header_length(n, len(data) - 8, source)
    header, meta = parse_header(data, 8, 8 + n, source)
    spans = _check_spans(header, len(data) - 8 - n, source)
    del header  # the reference's tree is next: never hold both (memory stays a small multiple)
    reference = _reference_tensors(data, source)
    _same_as_reference(spans, [(name, info["dtype"], info["shape"]) for name, info in reference], source)
    tensors = {}
    for name, info in reference:  # the reference's bytes: the values are its values
        dtype, raw = DTYPES[info["dtype"]], info.pop("data")
        tensors[name] = _array(raw, dtype, info["shape"], info["dtype"], name, source)
    return tensors, meta, {name: info["dtype"] for name, info in reference}


def _check_header_length(n: int, available: int, source) -> None:
    if n > MAX_HEADER or n > available:
        raise FormatError(
            f"{source}: the safetensors header claims {n} bytes but the file has {available}.",
            "The file is truncated or not a safetensors file.")


def parse_header(buf: bytes, start: int, end: int, source) -> tuple[dict, dict[str, str]]:
    """The header buf[start:end]'s tensor entries and metadata, after the item cap; FormatError."""
    items = sum(buf.count(c, start, end) for c in (b"[", b"{", b","))  # C loops, no copy
    if items > min(MAX_ITEMS, ITEM_FLOOR + (end - start) // ITEM_BYTES):
        raise FormatError(f"{source}: the safetensors header has {items} lists, objects or values in {end - start} "
                          "bytes, far more (or nested far more deeply) than any real header; refusing to parse it.",
                          _CORRUPT)
    try:
        header = json.loads(str(memoryview(buf)[start:end], "utf-8"), object_pairs_hook=_unique_keys,
                            parse_int=_u64, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{source}: the safetensors header is not valid JSON ({shown(e)}).", _CORRUPT) from None
    except RecursionError:  # "[[[[..." nested deeper than the C stack allows
        raise FormatError(f"{source}: the safetensors header nests too deeply to be a header.", _CORRUPT) from None
    except _Refused as e:
        raise FormatError(f"{source}: the safetensors header {e.args[0]}.", _CORRUPT) from None
    if not isinstance(header, dict):
        raise FormatError(f"{source}: the safetensors header is not a JSON object.", _CORRUPT)
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta  # null is allowed (by the reference too); [], 0, "" are not
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{source}: safetensors metadata must map strings to strings.", _CORRUPT)
    return header, meta


class _Refused(Exception):
    """Raised from inside json.loads' hooks; parse_header turns it into a FormatError."""


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):  # json.loads keeps the last silently; a reader could keep the first
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"gives the key {quoted(dup)} twice")
    return out


def _u64(literal: str) -> int:
    # int() of a literal over 4300 digits raises ValueError (CPython's limit); over 20 it is
    # already no u64, which is all the format has.
    if len(literal.lstrip("-")) > _U64_DIGITS:
        raise _Refused(f"has a {len(literal)}-digit number; the format's integers are u64")
    return int(literal)


def _no_constant(name: str):
    raise _Refused(f"has {name}, which is not JSON")


def _check_spans(header: dict, data_len: int, source) -> list[tuple]:
    """(begin, end, name, dtype, shape, tag) per tensor, in file order; checks everything the
    format promises: known dtype, sane shape, offsets in order, no overlap, gap or tail."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatError(f"{source}: tensor {quoted(name)} has a malformed header entry.", _CORRUPT)
        tag, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        dtype = DTYPES.get(tag) if isinstance(tag, str) else None  # a list or dict is unhashable
        if dtype is None:
            raise FormatError(f"{source}: tensor {quoted(name)} has unsupported dtype {quoted(tag, 40)}.",
                              "textinv reads F64/F32/F16/BF16 and integer tensors.")
        # `type(x) is int`: JSON true/false are bools, which isinstance(x, int) would accept
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs)):
            raise FormatError(f"{source}: tensor {quoted(name)} has a malformed shape or offsets.", _CORRUPT)
        begin, end = offs
        size = dtype.itemsize * math.prod(shape)  # exact: Python ints, never a wrapped int64
        if not 0 <= begin <= end <= data_len or end - begin != size:
            raise FormatError(
                f"{source}: tensor {quoted(name)} claims bytes {begin}..{end} of a {data_len}-byte data section "
                f"but needs {shown(size, 40)}.", _CORRUPT)
        spans.append((begin, end, name, dtype, shape, tag))
    spans.sort(key=lambda s: (s[0], s[1]))
    pos = 0
    for begin, end, name, *_ in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise FormatError(f"{source}: tensor {quoted(name)} {what}.", "The file is corrupt.")
        pos = end
    if pos != data_len:
        raise FormatError(f"{source}: {data_len - pos} unexpected trailing bytes after the tensors.",
                          "The file is corrupt or was appended to.")
    return spans


def _reference_tensors(data: bytes, source) -> list:
    """The reference parser's reading: [(name, {"dtype", "shape", "data"})], or FormatError."""
    import safetensors

    try:
        return safetensors.deserialize(data if type(data) is bytes else bytes(data))  # it takes bytes only
    except Exception as e:  # SafetensorError; also whatever else its binding raises
        raise FormatError(f"{source}: the safetensors library refuses this file ({shown(e, 120)}).",
                          _CORRUPT) from None
    except BaseException as e:  # a Rust panic surfaces as pyo3's PanicException(BaseException)
        if type(e).__name__ != "PanicException":
            raise
        raise FormatError(f"{source}: the safetensors library fails on this file ({shown(e, 120)}).",
                          _CORRUPT) from None


def _same_as_reference(spans: list[tuple], reference: list[tuple], source) -> None:
    """Both readings agree on every name, dtype and shape (they parse the same JSON; a
    disagreement would mean two tools read different tensors from one file)."""
    theirs = {name: (tag, list(shape)) for name, tag, shape in reference}
    if len(theirs) != len(spans) or any(theirs.get(name) != (tag, shape) for _, _, name, _, shape, tag in spans):
        raise FormatError(f"{source}: the safetensors library reads this header differently.", _CORRUPT)


def _array(raw, dtype: np.dtype, shape: list, tag: str, name: str, source) -> np.ndarray:
    try:  # only an empty tensor gets here with dims numpy refuses, e.g. [0, 2**63]
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    except ValueError:
        raise FormatError(f"{source}: tensor {quoted(name)} has shape {shown(shape, 60)}, "
                          "which no array can have.", _CORRUPT) from None
    if tag == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.copy()  # writable, and independent of the reference's buffer


def dump_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise deterministically (sorted names, float32 unless already f16/f64)."""
    if "__metadata__" in tensors:  # the format's reserved key: the file would not read back
        raise UnsupportedFormatError("safetensors cannot hold a tensor named __metadata__.",
                                     "Pass --token with another name.")
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, pos = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if arr.dtype not in _NAMES:
            arr = arr.astype(np.float32)
        arr = np.asarray(arr.astype(arr.dtype.newbyteorder("<")), order="C")  # keeps 0-d arrays 0-d
        raw = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    head += b" " * (-len(head) % 8)  # the reference writer pads the header to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


# -- large files (a text encoder's weights, a LoRA): the header, then tensors by seeking -------

# A stored tag as a dtype name (what `inspect` prints; BF16 is named before it is widened).
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def read_header(path) -> dict:
    """The validated header of a (possibly multi-GB) safetensors file, without reading the data.

    {name: {"dtype", "shape", "data_offsets"}, "__header_len__": n}. Same checks as
    load_safetensors, with the reference opening the file itself (it maps it, never reads it
    all) and agreeing on every name, dtype and shape."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno())
        if not stat.S_ISREG(size.st_mode):
            raise FormatError(f"{shown(path)} is not a regular file.")
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{shown(path)} is not a safetensors file.", _CORRUPT)
        (n,) = struct.unpack("<Q", raw)
        _check_header_length(n, size.st_size - 8, path)
        head = f.read(n)
    if len(head) != n:
        raise FormatError(f"{shown(path)} is truncated.", _CORRUPT)
    return check_header(head, size.st_size, path)


def check_header(head: bytes, file_size: int, path, *, metadata: dict | None = None) -> dict:
    """read_header's checks on a header already read (the n bytes after the length): for a
    caller that read it from a file descriptor it holds (formats/lora_bundle.py). The
    length must already be within MAX_HEADER and the file; the reference opens `path`.
    `metadata`: a dict that receives the file's __metadata__."""
    n = len(head)
    header, meta = parse_header(head, 0, n, path)
    if metadata is not None:
        metadata.update(meta)
    spans = _check_spans(header, file_size - 8 - n, path)
    _same_as_reference(spans, _reference_header(path), path)
    header["__header_len__"] = n
    return header


def _reference_header(path) -> list[tuple]:
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return [(k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()]
    except Exception as e:
        raise FormatError(f"{shown(path)}: the safetensors library refuses this file ({shown(e, 120)}).",
                          _CORRUPT) from None


def read_tensor(path, name: str) -> np.ndarray:
    """One tensor from a large safetensors file (e.g. a text encoder), seeking to its bytes."""
    return read_tensors(path, read_header(path), [name])[name]


def read_tensors(path, header: dict, names, *, fd: int | None = None) -> dict[str, np.ndarray]:
    """Several tensors of a large file with one header read (`header` from read_header or
    check_header), each read by its offsets alone: nothing else of the file is read. `fd`: a
    descriptor the caller opened (fsutil.open_regular) and keeps; else `path` is opened here.
    The caller bounds what it asks for: each tensor costs its size in memory."""
    start = 8 + header["__header_len__"]
    wanted = []
    for name in names:
        info = header.get(name) if name != "__header_len__" else None
        if not isinstance(info, dict):
            raise FormatError(f"{shown(path)} has no tensor {quoted(name)}.")
        wanted.append((name, info))
    f = open(path, "rb") if fd is None else None
    try:
        out = {}
        for name, info in wanted:
            begin, end = info["data_offsets"]  # validated with the header: in the file, sized to the shape
            raw = pread_all(f.fileno() if f else fd, end - begin, start + begin)
            if len(raw) != end - begin:
                raise FormatError(f"{shown(path)} is truncated.", _CORRUPT)
            out[name] = _array(raw, DTYPES[info["dtype"]], info["shape"], info["dtype"], name, path)
        return out
    finally:
        if f is not None:
            f.close()


def load_file(path) -> dict[str, np.ndarray]:
    """Every tensor of a (multi-GB) model file, validated as read_header validates (the reference
    maps the file and agrees on every name, dtype and shape), then copied out of a memory map
    one tensor at a time: the whole file is never in memory twice, as bytes(file) would put it."""
    import mmap

    header = read_header(path)
    start = 8 + header.pop("__header_len__")
    tensors = {}
    with open(path, "rb") as f:
        if not header:
            return tensors
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, info in header.items():
                begin, end = info["data_offsets"]
                tensors[name] = _array(mm[start + begin:start + end], DTYPES[info["dtype"]], info["shape"],
                                       info["dtype"], name, path)
    return tensors
