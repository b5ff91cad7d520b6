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


# -- amplification: a few KB of pickle that make a naive interpreter allocate or hash for ages ---

def put(slot: int) -> bytes:
    return b"r" + struct.pack("<I", slot)  # LONG_BINPUT


def get(slot: int) -> bytes:
    return b"j" + struct.pack("<I", slot)  # LONG_BINGET


def int_dict(n: int, keys=None) -> bytes:
    """{k: None for k in keys} (default 0..n-1), memoized in slot 0."""
    keys = range(n) if keys is None else keys
    return b"}" + put(0) + b"(" + b"".join(i(k) + b"N" for k in keys) + b"u"


def copies(n_keys: int, n_copies: int, through: tuple[str, str] = ("collections", "OrderedDict"),
           source: str = "dict") -> bytes:
    """A list of n_copies calls through(x), x one memoized container of n_keys items:
    OrderedDict(d), set(l), frozenset(l), torch.Size(t)... each call copies all of x."""
    if source == "dict":
        built = int_dict(n_keys)
    else:
        opener, closer = {"list": (b"](", b"e"), "tuple": (b"(", b"t")}[source]
        built = opener + b"".join(i(k) for k in range(n_keys)) + closer + put(0)
    call_once = get(1) + b"(" + get(0) + b"tR" + b"a"  # list.append(through(x))
    return PROTO2 + built + b"0" + glob(*through) + put(1) + b"0" + b"]" + call_once * n_copies + STOP


def bare_storage_refs(n_refs: int, numel: int, storage: str = "ByteStorage") -> bytes:
    """A list naming one storage n_refs times (BINPERSID of a memoized id): each a whole copy
    if decoded per reference."""
    pid = tup(s("storage"), glob("torch", storage), s("0"), s("cpu"), i(numel))
    return PROTO2 + b"]" + b"(" + pid + put(0) + b"Q" + (get(0) + b"Q") * (n_refs - 1) + b"e" + STOP


def self_similar_tuple_key(depth: int) -> bytes:
    """{t: None} where t = (t', t'), t' = (t'', t'')...: 2^depth steps to hash."""
    body = b")" + put(0) + b"0"
    for k in range(depth):
        body += get(k) + get(k) + b"\x86" + put(k + 1) + b"0"
    return PROTO2 + b"}" + body + get(depth) + b"N" + b"s" + STOP


def colliding_int_keys(n: int) -> bytes:
    """{k * (2^61 - 1): None for k in 1..n}: every key hashes to 0, so each insert compares
    against all the keys before it."""
    return PROTO2 + int_dict(n, [k * (2**61 - 1) for k in range(1, n + 1)]) + STOP


def a1111_with_step(step_pickle: bytes) -> bytes:
    """An A1111-layout file whose `step` is the given pickled value."""
    return torch_zip(PROTO2 + dct(s("string_to_param"), dct(s("*"), tensor()), s("name"), s("x"),
                                  s("step"), step_pickle) + STOP, {"0": F32_4})


def long4(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<I", len(raw)) + raw


def sparse_tar(members: int, claimed: int) -> bytes:
    """A GNU tar whose `members` sparse members each store nothing but claim `claimed` bytes
    (all hole): tarfile fills holes with zeros when a member is read."""
    out = b""
    for n in range(members):
        h = bytearray(512)
        name = b"pickle" if n == 0 else f"m{n}".encode()
        h[0:len(name)] = name
        h[100:108] = b"0000644\0"
        h[108:116] = h[116:124] = b"0000000\0"
        h[124:136] = b"00000000000\0"                      # stored size: nothing
        h[136:148] = b"00000000000\0"
        h[156:157] = b"S"                                   # GNU sparse
        h[257:265] = b"ustar  \0"
        h[386:398] = b"%011o\0" % (claimed - 1)             # one 1-byte data run at the end...
        h[398:410] = b"%011o\0" % 0                         # ... of length 0
        h[483:495] = b"%011o\0" % claimed                   # real size
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
        out += bytes(h)
    return out + bytes(1024)
