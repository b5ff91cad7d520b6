"""Write `torch.save`-format files without torch.

The output is what torch 2.x writes for a dict of tensors, less the records that
AUTOMATIC1111's safe unpickler refuses, so torch's loader (weights_only=True), A1111,
ComfyUI and diffusers all accept it:

- a zip archive laid out like torch's miniz writer: one folder, every member stored
  uncompressed with its data aligned to 64 bytes (an "FB" padding extra field) and
  followed by a data descriptor, zeroed timestamps;
- members data.pkl, data/0..N, version, in that order, and nothing else. A1111
  (modules/safe.py, check_zip_filenames; on unless --disable-safe-unpickle) refuses an
  archive holding any member other than `<dir>/data.pkl`, `<dir>/data/<n>`,
  `<dir>/version` (later releases also allow `<dir>/byteorder` and
  `<dir>/.data/serialization_id`): torch's own `.format_version`, `.storage_alignment`,
  `byteorder` and `.data/serialization_id` are left out (tests/test_a1111_interop.py checks it).
  torch reads such a file as torch 1.x files are read: without `.format_version` it takes
  each storage's offset from the zip directory (never computes it from the layout), and
  without `byteorder` it reads the data as little-endian (torch/serialization.py, the
  default load endianness), which is how it is written here;
- data.pkl is a protocol-2 pickle that only uses the globals torch's weights-only loader
  and A1111's unpickler allow: tensors as `torch._utils._rebuild_tensor_v2` over a
  typed-storage persistent id ('storage', torch.FloatStorage, key, 'cpu', numel), hooks as
  `collections.OrderedDict`.

The same input always gives the same bytes.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

ALIGNMENT = 64
_STORAGE_OF = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
               np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage",
               np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage",
               np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage",
               np.dtype("bool"): "BoolStorage"}


def dump_torch_pickle(obj, *, archive_name: str = "archive") -> bytes:
    """`obj` (dict/list/tuple/str/int/float/bool/None/numpy arrays) as torch.save bytes."""
    if (not archive_name or "/" in archive_name or "\\" in archive_name or "\x00" in archive_name
            or archive_name in (".", "..")):
        raise ValueError(f"archive_name must be one plain folder name, not {archive_name!r}")
    pickler = _Pickler()
    pkl = pickler.dump(obj)
    records = [("data.pkl", pkl)] + [(f"data/{i}", raw) for i, raw in enumerate(pickler.storages)]
    records.append(("version", b"3\n"))  # torch's file format version 3, as torch 1.6+ writes it
    return _zip([(f"{archive_name}/{name}", data) for name, data in records])


class _Pickler:
    """Emits the protocol-2 opcodes torch's pickler would for plain data and tensors."""

    def __init__(self):
        self.out = bytearray()
        self.storages: list[bytes] = []

    def dump(self, obj) -> bytes:
        self.out += b"\x80\x02"  # PROTO 2
        self.save(obj, 0)
        self.out += b"."  # STOP
        return bytes(self.out)

    def save(self, obj, depth: int) -> None:
        if depth > 100:
            raise ValueError("object nests too deeply to pickle")
        out = self.out
        if isinstance(obj, np.generic):
            obj = obj.item()  # numpy scalars become Python scalars
        if obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(obj, dict):
            out += b"}"
            if obj:
                out += b"("
                for k, v in obj.items():
                    self.save(k, depth + 1)
                    self.save(v, depth + 1)
                out += b"u"  # SETITEMS
        elif isinstance(obj, list):
            out += b"]"
            if obj:
                out += b"("
                for v in obj:
                    self.save(v, depth + 1)
                out += b"e"  # APPENDS
        elif isinstance(obj, tuple):
            self.save_tuple(obj, depth)
        elif isinstance(obj, np.ndarray):
            self.save_array(obj)
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a torch file")

    def save_int(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])
        elif 0 <= n < 65536:
            self.out += b"M" + struct.pack("<H", n)
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)
        else:  # LONG1: little-endian two's complement, shortest form
            raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) > 255:
                raise ValueError("integer too large for a torch file")
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def save_tuple(self, items: tuple, depth: int) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) > 3:
            self.out += b"("
        for v in items:
            self.save(v, depth + 1)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

    def save_global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def save_array(self, arr: np.ndarray) -> None:
        storage = _STORAGE_OF.get(arr.dtype.newbyteorder("="))
        if storage is None:
            raise TypeError(f"cannot write a {arr.dtype} array into a torch file")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        key = str(len(self.storages))
        self.storages.append(data.tobytes())
        strides, step = [], 1  # contiguous strides in elements, as torch computes them
        for n in reversed(arr.shape):
            strides.insert(0, step)
            step *= max(n, 1)
        # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)
        self.save_global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("  # MARK for the args tuple, MARK for the persistent id
        self.save("storage", 1)
        self.save_global("torch", storage)
        self.save(key, 1)
        self.save("cpu", 1)
        self.save_int(int(math.prod(arr.shape)))
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.save_int(0)
        self.save_tuple(tuple(int(n) for n in arr.shape), 1)
        self.save_tuple(tuple(strides), 1)
        self.out += b"\x89"  # requires_grad False
        self.save_global("collections", "OrderedDict")
        self.out += b")R"  # OrderedDict() for backward_hooks
        self.out += b"tR"  # TUPLE of the args, REDUCE


def _zip(records: list[tuple[str, bytes]]) -> bytes:
    """A stored zip in miniz's layout: aligned payloads, data descriptors, zeroed times."""
    out = bytearray()
    central = bytearray()
    for name, data in records:
        raw_name = name.encode("utf-8")
        crc = zlib.crc32(data)
        offset = len(out)
        # an empty member gets no data descriptor, exactly as miniz writes it
        flags = 0x0800 | (0x0008 if data else 0)
        pad = -(offset + 30 + len(raw_name) + 4) % ALIGNMENT
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0,
                           len(raw_name), len(extra)) + raw_name + extra + data
        if data:
            out += struct.pack("<IIII", 0x08074B50, crc, len(data), len(data))
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0, crc,
                                len(data), len(data), len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name
    start = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), start, 0)
    return bytes(out)
