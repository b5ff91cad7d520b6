"""The parse-only half of the safe pickle reader: what may be named, and what a file is.

- the allowlist: the globals a tensor dict needs, each resolved to a stand-in (`AllowedGlobal`)
  that the interpreter (pickle_reader) maps to its own handlers; nothing named is imported;
- sniffers for torch zips, raw (legacy, non-zip) pickles and torch's even older tar files;
- `refuse_unsafe`: a scan of the opcodes alone (`pickletools.genops` never imports or calls
  anything) that names the first global outside the allowlist, before anything is interpreted.
"""

from __future__ import annotations

import io
import pickletools

from ..errors import UnsafeFileError
from .torch_zip import ZIP_MAGIC

# Opcodes per pickle. Each one makes at most one object, so this bounds memory: a tiny
# file with a deflated data.pkl could otherwise unpack to a million lists (>100 MiB).
# An embedding's pickle has under a hundred opcodes; a whole SD 1.5 checkpoint's, ~30k.
MAX_OPS = 100_000
UNSAFE_HINT = ("The file may be malicious; nothing in it was executed. Get the embedding as "
               ".safetensors, or convert it on a machine you trust.")

# Element codes: a little-endian numpy type, or bf16 / b1, which need a conversion step.
_STORAGES = {"FloatStorage": "f4", "HalfStorage": "f2", "DoubleStorage": "f8", "BFloat16Storage": "bf16",
             "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "b1", "ComplexFloatStorage": "c8",
             "ComplexDoubleStorage": "c16"}
_DTYPES = {"float32": "f4", "float16": "f2", "float64": "f8", "bfloat16": "bf16", "int64": "i8",
           "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "b1", "complex64": "c8",
           "complex128": "c16", "uint16": "u2", "uint32": "u4", "uint64": "u8"}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol 2's spelling


class AllowedGlobal:
    """What a GLOBAL resolves to: our stand-in, never the named object."""
    __slots__ = ("qualname", "kind", "arg")

    def __init__(self, qualname: str, kind: str, arg=None):
        self.qualname, self.kind, self.arg = qualname, kind, arg


def _allowlist() -> dict[str, AllowedGlobal]:
    calls = {"collections.OrderedDict": "dict", "builtins.set": "set", "builtins.frozenset": "frozenset",
             "builtins.bytes": "bytes", "_codecs.encode": "encode", "torch.Size": "size",
             "torch._utils._rebuild_tensor": "tensor_v1", "torch._utils._rebuild_tensor_v2": "tensor_v2",
             "torch._utils._rebuild_tensor_v3": "tensor_v3", "torch._utils._rebuild_parameter": "parameter",
             "torch._utils._rebuild_parameter_with_state": "parameter",
             "torch.nn.parameter.Parameter": "parameter"}
    g = {q: AllowedGlobal(q, "call", fn) for q, fn in calls.items()}
    g.update({f"torch.{n}": AllowedGlobal(f"torch.{n}", "storage", c) for n, c in _STORAGES.items()})
    g.update({f"torch.{n}": AllowedGlobal(f"torch.{n}", "dtype", c) for n, c in _DTYPES.items()})
    for q in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        g[q] = AllowedGlobal(q, "storage", None)
    q = "torch.nn.modules.container.ParameterDict"  # old A1111 files' string_to_param
    g[q] = AllowedGlobal(q, "module")
    return g


_ALLOWED = _allowlist()


def resolve_name(qual: str) -> AllowedGlobal | None:
    module, _, name = qual.rpartition(".")
    return _ALLOWED.get(f"{_PY2_MODULES.get(module, module)}.{name}")


def looks_like_torch_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def looks_like_legacy_tar(data: bytes) -> bool:
    """torch < 0.4 saved a tar archive of pickles (sys_info, pickle, storages, tensors)."""
    return len(data) >= 512 and data[257:262] == b"ustar"


def looks_like_raw_pickle(data: bytes) -> bool:
    """A pickle outside a zip: legacy torch (< 1.6) files or plain pickle.dump output."""
    if len(data) >= 2 and data[0] == 0x80 and data[1] <= 5:
        return True
    if not data or data[:1] not in b"(}])cNIJKLMSVXFGU\x88\x89":
        return False
    try:  # protocol 0/1 start with printable opcodes, as text may: require a parse to STOP
        for n, (op, _, _) in enumerate(pickletools.genops(data[:65536])):
            if op.name == "STOP" or n > 10_000:
                return op.name == "STOP"
    except Exception:
        pass
    return False


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of a tar's first regular files, read in memory (nothing is extracted),
    so a refusal can name the global a legacy file's pickles ask for.

    Only bytes stored in the file are read, at most the file's size in all: a sparse
    member's size counts its holes, which tarfile would fill with zeros (16 members of a
    1 KB file could claim 16 KB each), so sparse members are skipped."""
    import tarfile

    out: list[tuple[str, bytes]] = []
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for info in tf:
                if len(out) >= 16:
                    break
                if info.isfile() and not info.issparse():
                    blob = data[info.offset_data:info.offset_data + min(info.size, len(data) - total)]
                    total += len(blob)
                    out.append((info.name[:60], blob))
                if total >= len(data):
                    break
    except Exception:  # a damaged tar: what was read so far is still scanned
        pass
    return out


def _first_unsafe_global(data: bytes) -> str | None:
    """The first global outside the allowlist, found by parsing alone.

    Checked before interpreting, so a refusal names the global even when some other odd
    opcode comes first. Legacy torch files are several pickles back to back: scan them all.
    STACK_GLOBAL takes its names from the stack; following the last two pushes (strings
    also through the memo) names them when they are plain strings, as Python writes them.
    """
    f = io.BytesIO(data)
    ops = 0
    try:
        for _ in range(8):
            last: list = [None, None]
            memo: dict = {}
            for op, arg, _ in pickletools.genops(f):
                ops += 1
                if ops > MAX_OPS:  # the interpreter refuses a pickle this large anyway
                    return None
                name, qual = op.name, None
                if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if name == "MEMOIZE" else arg] = last[-1]
                    continue
                if name in ("GLOBAL", "INST"):
                    qual = ".".join(str(arg).split(" ", 1))
                elif name == "STACK_GLOBAL" and all(isinstance(x, str) for x in last[-2:]):
                    qual = f"{last[-2]}.{last[-1]}"
                if qual is not None and resolve_name(qual) is None:
                    return qual[:200]
                if name in ("BINGET", "LONG_BINGET"):
                    last.append(memo.get(arg))
                elif name != "FRAME":
                    last.append(arg if "UNICODE" in name else None)
                del last[:-2]
    except Exception:  # malformed bytes: the interpreter says precisely what is wrong
        pass
    return None


def refuse_unsafe(data: bytes, source: str, what: str = "the pickle") -> None:
    qual = _first_unsafe_global(data)
    if qual is not None:
        raise UnsafeFileError(f"textinv refuses to load {source}: {what} asks for {qual}, which is "
                              "not tensor data.", UNSAFE_HINT)
