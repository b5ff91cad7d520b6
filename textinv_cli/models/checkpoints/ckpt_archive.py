"""A torch.save (.ckpt) checkpoint read by seeking: data.pkl described, storages read on demand.

A checkpoint is a zip archive of GBs: `<prefix>/data.pkl` (a few hundred KB describing the state
dict) and one STORED member `<prefix>/data/<key>` per storage. Only the zip directory, the
version records and data.pkl are read when the file is opened (formats/torch_zip's checks, then
formats/pickle_reader's interpreter in its describing mode: nothing named by the pickle is
imported or called, and no storage is read). A tensor's bytes are read when asked for, with
os.pread at its storage member's data, which is located from the member's local file header.

Refused, before anything is read from them: compressed or encrypted storages (torch never
writes those, and they cannot be read by seeking), members whose data would run into the next
member or the zip directory, tensors that name elements outside their storage (checked by the
interpreter), big-endian archives.
"""

from __future__ import annotations

import bisect
import math
import struct
import zipfile

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...errors import FormatError
from ...fsutil import pread_all
from ...formats.pickle_reader import MODEL_PICKLE_BYTES, TensorRef, describe_torch_pickle
from ...formats.torch_zip import CORRUPT_HINT, open_archive_file, read_member
from ...untrusted import quoted, shown

# Element code (formats/pickle_allowlist) -> the safetensors dtype tag a tensor's bytes have.
DTYPE_TAGS = {"f4": "F32", "f2": "F16", "bf16": "BF16", "f8": "F64", "i8": "I64", "i4": "I32", "i2": "I16",
              "i1": "I8", "u1": "U8", "b1": "BOOL", "u2": "U16", "u4": "U32", "u8": "U64"}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header's 30 fixed bytes
_MAX_FLATTEN_DEPTH = 4  # {"state_dict": {...}} or an embedding's {"string_to_param": {"*": t}}
_GATHER_SLACK = 1 << 16  # bytes a strided read may fetch beyond what the tensor holds
_GATHER_WINDOW = 16 << 20  # bytes per pread when a sparse view is read in windows


class CkptArchive:
    """The tensors of a torch.save checkpoint, described; `read(name)` fetches one by seeking."""

    def __init__(self, fd: int, size: int, source: str):
        self.fd, self.size, self.source = fd, size, source
        with open(fd, "rb", closefd=False, buffering=0) as f:  # zipfile reads the directory and small records
            zf, members, prefix = open_archive_file(f, size, source)
            order = read_member(zf, members["byteorder"], source).strip() if "byteorder" in members else b"little"
            if order != b"little":
                raise FormatError(f"{source} was saved on a big-endian machine ({prefix}/byteorder says "
                                  f"{shown(order[:20])}); textinv reads little-endian checkpoints only.",
                                  "Re-save it with torch on a little-endian (x86 or ARM) machine, or as .safetensors.")
            if members["data.pkl"].file_size > MODEL_PICKLE_BYTES:
                raise FormatError(f"{source}: its data.pkl is {members['data.pkl'].file_size} bytes, far larger "
                                  "than a model's (SDXL's is ~420 KB).",
                                  "It is not a Stable Diffusion checkpoint, or has been tampered with.")
            pkl = read_member(zf, members["data.pkl"], source)
            self.directory_start = zf.start_dir
        self.storages = {rest[5:]: info for rest, info in members.items() if rest.startswith("data/")}
        for info in self.storages.values():
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise FormatError(f"{source}: the storage member {quoted(info.filename)} is compressed; torch "
                                  "stores tensor data uncompressed, and textinv reads models by seeking.",
                                  "Re-save the checkpoint with torch.save, or convert it to .safetensors.")
        # where each member's record starts: a member's data must end before the next one begins
        self._starts = sorted(info.header_offset for info in members.values())
        self._spans: dict[str, tuple[int, int]] = {}
        obj = describe_torch_pickle(pkl, source=source, storage_size=self._storage_size)
        self.refs = _tensors_of(obj, source)

    def _storage_size(self, key: str) -> int:
        info = self.storages.get(key)
        if info is None:
            raise FormatError(f"{self.source}: data.pkl refers to storage data/{shown(key, 20)}, which the "
                              "archive does not contain.", CORRUPT_HINT)
        return info.file_size

    def dtype(self, name: str) -> str:
        return DTYPE_TAGS[self.refs[name].code]

    def read(self, name: str) -> bytes:
        """The tensor's bytes, C-contiguous: one pread when the tensor is contiguous in its
        storage, else gathered with a strided view over unsigned ints of its element size."""
        ref = self.refs[name]
        item = _ITEMSIZE[DTYPE_TAGS[ref.code]]
        count = math.prod(ref.size)
        if count == 0:
            return b""
        begin, end = self._span(ref.storage.key)
        if _contiguous(ref.size, ref.stride):
            return self._pread(begin + ref.offset * item, count * item, end)
        udt = np.dtype(f"<u{item}")
        dims = [(n, st) for n, st in zip(ref.size, ref.stride) if n != 1]  # a dim of 1 never moves
        out = self._gather(begin, end, ref.offset, tuple(n for n, _ in dims), tuple(st for _, st in dims), udt)
        return np.ascontiguousarray(out).tobytes()

    def _gather(self, begin: int, end: int, offset: int, size: tuple, stride: tuple, udt: np.dtype) -> np.ndarray:
        """The elements of a strided view. A view that fills most of its span is read with one
        pread; a sparser one is split along its widest stride and read in windows of at most
        _GATHER_WINDOW bytes (recursing where one index of that dimension alone spans more),
        so preads and memory stay bounded whatever the strides: a hostile file cannot make
        one pread per element of a 5 GiB storage."""
        item, count = udt.itemsize, math.prod(size)
        span = sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if not size or span * item <= 2 * count * item + _GATHER_SLACK:
            flat = np.frombuffer(self._pread(begin + offset * item, span * item, end), udt)
            return as_strided(flat, shape=size, strides=[s * item for s in stride], writeable=False)
        k = max(range(len(size)), key=lambda d: stride[d])  # >= 1 here: all-zero strides span 1
        inner_size, inner_stride = size[:k] + size[k + 1:], stride[:k] + stride[k + 1:]
        inner_span = sum((n - 1) * s for n, s in zip(inner_size, inner_stride)) + 1
        out = np.empty(size, udt)
        lead = (slice(None),) * k
        if inner_span * item > _GATHER_WINDOW:
            for i in range(size[k]):
                out[lead + (i,)] = self._gather(begin, end, offset + i * stride[k], inner_size, inner_stride, udt)
            return out
        per = (_GATHER_WINDOW // item - inner_span) // stride[k] + 1  # indices of dimension k per window
        for i in range(0, size[k], per):
            m = min(per, size[k] - i)
            raw = self._pread(begin + (offset + i * stride[k]) * item, ((m - 1) * stride[k] + inner_span) * item, end)
            view = as_strided(np.frombuffer(raw, udt), shape=(m, *inner_size),
                              strides=[s * item for s in (stride[k], *inner_stride)], writeable=False)
            out[lead + (slice(i, i + m),)] = np.moveaxis(view, 0, k)
        return out

    def _span(self, key: str) -> tuple[int, int]:
        """[begin, end) of a storage member's data in the file, from its local header."""
        if key in self._spans:
            return self._spans[key]
        info = self.storages[key]
        head = pread_all(self.fd, _LOCAL_HEADER.size, info.header_offset)
        if len(head) != _LOCAL_HEADER.size:
            raise FormatError(f"{self.source} is truncated (the storage data/{shown(key, 20)} is missing).",
                              CORRUPT_HINT)
        sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        name = pread_all(self.fd, name_len, info.header_offset + _LOCAL_HEADER.size)
        if sig != b"PK\x03\x04" or name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise FormatError(f"{self.source}: the zip directory points storage data/{shown(key, 20)} at a record "
                              "that is not its own.", CORRUPT_HINT)
        if flags & 0x1 or method != zipfile.ZIP_STORED:
            raise FormatError(f"{self.source}: the storage data/{shown(key, 20)} is encrypted or compressed; "
                              "torch stores tensor data uncompressed.", CORRUPT_HINT)
        begin = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        end = begin + info.file_size
        at = bisect.bisect_right(self._starts, info.header_offset)
        following = self._starts[at] if at < len(self._starts) else self.directory_start
        if end > min(following, self.directory_start, self.size):
            raise FormatError(f"{self.source}: the storage data/{shown(key, 20)} runs past its member into other "
                              "records or past the end of the file.", CORRUPT_HINT)
        self._spans[key] = (begin, end)
        return begin, end

    def _pread(self, offset: int, size: int, end: int) -> bytes:
        if offset + size > end:  # the interpreter checked the elements; this guards the arithmetic
            raise FormatError(f"{self.source}: a tensor reads past its storage.", CORRUPT_HINT)
        raw = pread_all(self.fd, size, offset)
        if len(raw) != size:
            raise FormatError(f"{self.source} is truncated.", CORRUPT_HINT)
        return raw


def _contiguous(size, stride) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _tensors_of(obj, source: str) -> dict[str, TensorRef]:
    """The tensors by flat name: a Lightning checkpoint's "state_dict" unwrapped, a bare state
    dict as is; other values (global_step, epoch, ...) skipped. Nested dicts get dotted names
    (an embedding's string_to_param.*), so scan() can say what a non-model file is."""
    if not isinstance(obj, dict):
        raise FormatError(f"{source} holds a {type(obj).__name__}, not a state dict.",
                          "It is not a Stable Diffusion checkpoint.")
    sd = obj.get("state_dict")
    root = sd if isinstance(sd, dict) else obj
    out: dict[str, TensorRef] = {}

    def walk(d: dict, prefix: str, depth: int) -> None:
        for k, v in d.items():
            if not isinstance(k, str):
                continue
            name = prefix + k
            if isinstance(v, TensorRef):
                if name in out:
                    raise FormatError(f"{source} names the tensor {quoted(name)} twice.", CORRUPT_HINT)
                if v.code not in DTYPE_TAGS:
                    raise FormatError(f"{source}: tensor {quoted(name)} has dtype {shown(v.code, 10)}, which no "
                                      "Stable Diffusion checkpoint holds.")
                out[name] = v
            elif isinstance(v, dict) and depth < _MAX_FLATTEN_DEPTH:
                walk(v, name + ".", depth + 1)

    walk(root, "", 0)
    return out
