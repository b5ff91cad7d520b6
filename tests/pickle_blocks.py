"""Building blocks for hand-assembled pickles and torch files (the malicious corpus, fuzzing).

Pickles are assembled opcode by opcode, so each test input is exactly what its name says.
"""

from __future__ import annotations

import io
import pickle
import shlex
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PROTO2 = b"\x80\x02"
STOP = b"."


def s(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
    """BININT (signed 32-bit), or LONG1 for integers outside that range."""
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def call(module: str, name: str, *args: bytes) -> bytes:
    """REDUCE: module.name(*args)."""
    return glob(module, name) + tup(*args) + b"R"


def lst(*parts: bytes) -> bytes:
    return b"](" + b"".join(parts) + b"e"


def dct(*pairs: bytes) -> bytes:
    return b"}(" + b"".join(pairs) + b"u"


def tensor(key: str = "0", numel: int = 4, size=(2, 2), stride=(2, 1), offset: int = 0,
           storage: str = "FloatStorage", hooks: bytes | None = None) -> bytes:
    """_rebuild_tensor_v2 over a typed-storage persistent id, as torch.save writes it."""
    pid = tup(s("storage"), glob("torch", storage), s(key), s("cpu"), i(numel)) + b"Q"
    return call("torch._utils", "_rebuild_tensor_v2", pid, i(offset), tup(*map(i, size)),
                tup(*map(i, stride)), b"\x89",
                hooks if hooks is not None else call("collections", "OrderedDict"))


def torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None, *, prefix: str = "archive",
              extra: list[tuple[str, bytes]] = (), byteorder: bytes | None = b"little",
              compress: set[str] = frozenset()) -> bytes:
    """A zip laid out like torch.save's: <prefix>/data.pkl, byteorder, data/<k>, version."""
    buf = io.BytesIO()
    members = [("data.pkl", pkl)]
    if byteorder is not None:
        members.append(("byteorder", byteorder))
    members += [(f"data/{k}", v) for k, v in (storages or {}).items()]
    members.append(("version", b"3\n"))
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in [(f"{prefix}/{n}", d) for n, d in members] + list(extra):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            zf.writestr(info, data)
    return buf.getvalue()


F32_4 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def valid_file() -> bytes:
    """A small legitimate embedding file: {"emb_params": [[1, 2], [3, 4]]}."""
    return torch_zip(PROTO2 + dct(s("emb_params"), tensor()) + STOP, {"0": F32_4})


def valid_file_pickle() -> bytes:
    return PROTO2 + dct(s("emb_params"), tensor()) + STOP


# -- corpus cases: a file, what the reader must say, and the live payload ----------------

@dataclass
class Case:
    data: bytes                       # the file's bytes, as a user would hand them over
    error: str                        # "unsafe" (UnsafeFileError) or "format" (any FormatError)
    mentions: tuple[str, ...]         # substrings the error message must contain
    payload: bytes | None = None      # a pickle that really does create the marker when unpickled


class Reduce:
    """pickle.dumps of this calls fn(*args) at load time: the classic attack, built by Python."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def shell_cmd(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def py_cmd(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def zipped(payload: bytes, error: str, *mentions: str) -> Case:
    return Case(torch_zip(payload), error, mentions, payload)


# -- the formats before torch 1.6's zip ----------------------------------------------------

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py: the legacy format's first pickle


def legacy_torch(obj_pickle: bytes) -> bytes:
    """torch < 1.6 (_legacy_save): magic, protocol version, sys_info, the object, storage keys."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(_MAGIC_NUMBER, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + obj_pickle + pickle.dumps([], protocol=2))


def legacy_tar(pickle_member: bytes) -> bytes:
    """torch < 0.4: a tar of pickles named sys_info, pickle, storages, tensors."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("sys_info", pickle.dumps({"little_endian": True}, protocol=2)),
                           ("pickle", pickle_member), ("storages", pickle.dumps(0, protocol=2)),
                           ("tensors", pickle.dumps(0, protocol=2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
