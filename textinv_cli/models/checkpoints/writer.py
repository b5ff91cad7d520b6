"""A safetensors file written tensor by tensor: for a converted model (GBs), never whole in memory.

    write_safetensors(path, entries, data, metadata=None)

`entries` names each tensor's (name, dtype tag, shape); `data(name)` returns its bytes when it
is written, one tensor in memory at a time. The file is deterministic (tensors sorted by element
size, then name; metadata sorted; the header padded to 8 bytes with spaces, as the reference
writer pads it) and atomic (writes.atomic_stream: temp in the same folder, fsync, rename). Any dtype tag the format
has is written as given (BF16 stays BF16): the bytes are copied, never converted.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from ... import writes
from ...untrusted import shown

# The format's dtype tags and their element sizes (safetensors' Dtype enum).
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def header_bytes(entries: list[tuple[str, str, tuple]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header for `entries` in the order given."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    pos = 0
    for name, tag, shape in entries:
        size = ITEMSIZE[tag] * math.prod(shape)
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def write_safetensors(path, entries: Iterable[tuple[str, str, tuple]], data: Callable[[str], bytes],
                      metadata: dict[str, str] | None = None) -> int:
    """Write the tensors to `path` atomically; returns the file's size. ValueError when an
    entry is malformed (a duplicate or reserved name, an unknown tag, a negative dim) or when
    `data` returns another number of bytes than the entry's dtype and shape need: the
    temp file is removed and `path` is untouched."""
    entries = [(str(n), str(t), tuple(int(d) for d in s)) for n, t, s in entries]
    for name, tag, shape in entries:
        if tag not in ITEMSIZE:
            raise ValueError(f"tensor {shown(name)}: unknown safetensors dtype {shown(tag, 20)}")
    # wider elements first, then by name (the reference writer's order): every tensor starts
    # aligned to its element size, since the data section starts at a multiple of 8
    entries.sort(key=lambda e: (-ITEMSIZE[e[1]], e[0]))
    names = [n for n, _, _ in entries]
    for name, tag, shape in entries:
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {shown(name)}: negative dimension in {shape}")
    if len(set(names)) != len(names) or "__metadata__" in names:
        dup = next((n for n in names if n == "__metadata__" or names.count(n) > 1), "?")
        raise ValueError(f"tensor name {shown(dup)} is given twice or is the format's reserved key")
    head = header_bytes(entries, metadata)
    path = Path(path)
    total = len(head)
    with writes.atomic_stream(path) as f:
        f.write(head)
        for name, tag, shape in entries:
            raw = data(name)
            need = ITEMSIZE[tag] * math.prod(shape)
            if len(raw) != need:
                raise ValueError(f"tensor {shown(name)}: {len(raw)} bytes given, {tag} {list(shape)} needs {need}")
            f.write(raw)
            total += need
    return total
