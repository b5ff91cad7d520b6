"""A strict safetensors reader and a deterministic writer, in numpy only.

The reader checks everything the format promises before trusting it: the header length
fits the file, offsets are in order, do not overlap, match each tensor's size and cover
the data exactly (no trailing bytes). Sizes are checked before any allocation.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from ..errors import FormatError, UnsupportedFormatError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "BF16": np.dtype("<u2"),  # widened to float32 below
}
_NAMES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64"}
MAX_HEADER = 100 * 1024 * 1024
MAX_NDIM = 32  # numpy allows 64; no real tensor comes near either


def looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def load_safetensors(data: bytes, source: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ({name: array}, metadata). Raises FormatError."""
    if len(data) < 8:
        raise FormatError(f"{source} is too short to be a safetensors file ({len(data)} bytes).")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise FormatError(
            f"{source}: the safetensors header claims {n} bytes but the file has {len(data) - 8}.",
            "The file is truncated or not a safetensors file.",
        )
    header = _parse_header(data[8 : 8 + n], source)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{source}: safetensors metadata must map strings to strings.")
    body = memoryview(data)[8 + n :]
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatError(f"{source}: tensor {name!r} has a malformed header entry.")
        tag, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        dtype = _DTYPES.get(tag) if isinstance(tag, str) else None  # a list or dict is unhashable
        if dtype is None:
            raise FormatError(f"{source}: tensor {name!r} has unsupported dtype {str(tag)[:40]!r}.")
        # `type(x) is int`: JSON true/false are bools, which isinstance(x, int) would accept
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs)):
            raise FormatError(f"{source}: tensor {name!r} has a malformed shape or offsets.")
        begin, end = offs
        size = dtype.itemsize * int(np.prod(shape, dtype=object))
        if not 0 <= begin <= end <= len(body) or end - begin != size:
            raise FormatError(
                f"{source}: tensor {name!r} claims bytes {begin}..{end} of a {len(body)}-byte data section "
                f"but needs {size}.", "The file is truncated or corrupt.")
        spans.append((begin, end, name, dtype, shape, tag))
    spans.sort()
    pos = 0
    for begin, end, name, *_ in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise FormatError(f"{source}: tensor {name!r} {what}.", "The file is corrupt.")
        pos = end
    if pos != len(body):
        raise FormatError(f"{source}: {len(body) - pos} unexpected trailing bytes after the tensors.",
                          "The file is corrupt or was appended to.")
    tensors = {}
    for begin, end, name, dtype, shape, tag in spans:
        try:  # only an empty tensor gets here with dims numpy refuses, e.g. [0, 2**63]
            arr = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        except ValueError:
            raise FormatError(f"{source}: tensor {name!r} has shape {shape}, which no array can have.") from None
        if tag == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = arr.copy()
    return tensors, {str(k): v for k, v in meta.items()}


def _parse_header(raw: bytes, source) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{source}: the safetensors header is not valid JSON ({e}).") from None
    except RecursionError:  # "[[[[..." nested deeper than the C stack allows
        raise FormatError(f"{source}: the safetensors header nests too deeply to be a header.") from None
    if not isinstance(header, dict):
        raise FormatError(f"{source}: the safetensors header is not a JSON object.")
    return header


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


def read_header(path) -> dict:
    """The JSON header of a (possibly multi-GB) safetensors file, without reading the data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path} is not a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise FormatError(f"{path}: the safetensors header claims {n} bytes.")
        header = _parse_header(f.read(n), path)
    header["__header_len__"] = n
    return header


def read_tensor(path, name: str) -> np.ndarray:
    """One tensor from a large safetensors file (e.g. a text encoder), seeking to its bytes."""
    header = read_header(path)
    info = header.get(name)
    if not isinstance(info, dict):
        raise FormatError(f"{path} has no tensor {name!r}.")
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
    begin, end = info["data_offsets"]
    shape = info["shape"]
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=object)):
        raise FormatError(f"{path}: tensor {name!r} has inconsistent offsets.")
    with open(path, "rb") as f:
        f.seek(8 + header["__header_len__"] + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise FormatError(f"{path} is truncated.")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if info["dtype"] == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr
