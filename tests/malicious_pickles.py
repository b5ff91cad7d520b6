"""A corpus of hostile and broken torch files for the safe-reader tests.

Every payload that would run code creates a marker file when unpickled for real, so the
tests can (1) prove the payload is live by running it with the real pickle module in a
throw-away subprocess, and (2) assert our reader never creates the marker. Pickles are
assembled opcode by opcode so each case is exactly what its name says.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

PROTO2 = b"\x80\x02"
STOP = b"."


# -- pickle building blocks ----------------------------------------------------------------

def s(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
    """BININT (signed 32-bit)."""
    return b"J" + struct.pack("<i", n)


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


# -- the corpus --------------------------------------------------------------------------

@dataclass
class Case:
    data: bytes                       # the file's bytes, as a user would hand them over
    error: str                        # "unsafe" (UnsafeFileError) or "format" (any FormatError)
    mentions: tuple[str, ...]         # substrings the error message must contain
    payload: bytes | None = None      # a pickle that really does create the marker when unpickled


class _Reduce:
    """pickle.dumps of this calls fn(*args) at load time: the classic attack, built by Python."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def build(name: str, marker: Path) -> Case:
    return BUILDERS[name](marker)


def _shell(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _py(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _zipped(payload: bytes, error: str, *mentions: str) -> Case:
    return Case(torch_zip(payload), error, mentions, payload)


def _os_system(m):
    return _zipped(PROTO2 + call("os", "system", s(_shell(m))) + STOP, "unsafe", "os.system")


def _posix_system(m):
    payload = pickle.dumps(_Reduce(os.system, _shell(m)), protocol=2)  # "posix system" on Linux
    return _zipped(payload, "unsafe", f"{os.system.__module__}.system")


def _eval(m):
    return _zipped(PROTO2 + call("__builtin__", "eval", s(_py(m))) + STOP, "unsafe", "__builtin__.eval")


def _exec_stack_global(m):  # protocol 4 spelling: STACK_GLOBAL takes the names from the stack
    p = b"\x80\x04" + s("builtins") + s("exec") + b"\x93" + tup(s(_py(m))) + b"R" + STOP
    return _zipped(p, "unsafe", "builtins.exec")


def _import_module(m):  # getattr(importlib.import_module("os"), "system")("touch marker")
    p = (PROTO2 + glob("importlib", "import_module") + b"q\x00" + b"0"
         + glob("builtins", "getattr") + tup(b"h\x00" + tup(s("os")) + b"R", s("system")) + b"R"
         + tup(s(_shell(m))) + b"R" + STOP)
    return _zipped(p, "unsafe", "importlib.import_module")


def _popen(m):
    return _zipped(PROTO2 + call("subprocess", "Popen", lst(s("touch"), s(str(m)))) + STOP,
                   "unsafe", "subprocess.Popen")


def _stack_global_hidden(m):  # names built on the stack where a parse-only scan cannot follow them
    p = (b"\x80\x04" + s("os") + b"20" + s("system") + b"\x93"  # 'os', DUP, POP, 'system', STACK_GLOBAL
         + tup(s(_shell(m))) + b"R" + STOP)
    return _zipped(p, "unsafe", "os.system")


def _build_on_dict(m):  # BUILD would call __setstate__ / update __dict__ on a real object
    return Case(torch_zip(PROTO2 + call("collections", "OrderedDict") + dct(s("__class__"), i(1)) + b"b" + STOP),
                "format", ("sets the state",))


def _getattr(m):  # reach os through an allowed object's attributes
    p = PROTO2 + call("__builtin__", "getattr", glob("collections", "OrderedDict"), s("__init__")) + STOP
    return Case(torch_zip(p), "unsafe", ("__builtin__.getattr",))


def _inst(m):  # protocol 0's INST: MARK args INST module name
    return _zipped(b"(" + s(_shell(m)) + b"ios\nsystem\n" + STOP, "unsafe", "os.system")


def _obj(m):  # protocol 1's OBJ: MARK class args OBJ
    return _zipped(b"(" + glob("os", "system") + s(_shell(m)) + b"o" + STOP, "unsafe", "os.system")


def _obj_allowed(m):  # OBJ on an allowlisted name is still refused: it builds arbitrary objects
    return Case(torch_zip(PROTO2 + b"(" + glob("collections", "OrderedDict") + b"o" + STOP),
                "unsafe", ("OBJ",))


def _newobj(m):
    return _zipped(PROTO2 + glob("subprocess", "Popen") + tup(lst(s("touch"), s(str(m)))) + b"\x81" + STOP,
                   "unsafe", "subprocess.Popen")


def _newobj_allowed(m):
    return Case(torch_zip(PROTO2 + glob("collections", "OrderedDict") + b")\x81" + STOP), "format",
                ("NEWOBJ", "collections.OrderedDict"))


def _ext1(m):  # the copyreg extension registry maps codes to arbitrary callables
    return Case(torch_zip(PROTO2 + b"\x82\x01" + b")R" + STOP), "unsafe", ("EXT1",))


def _torch_internal(module, name, *args):
    return lambda m: Case(torch_zip(PROTO2 + call(module, name, *args) + STOP), "unsafe",
                          (f"{module}.{name}",))


def _hooks_payload(m):  # a real tensor whose backward_hooks slot runs a command
    p = PROTO2 + dct(s("emb_params"), tensor(hooks=call("os", "system", s(_shell(m))))) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "unsafe", ("os.system",), p)


def _raw_malicious(m):
    payload = PROTO2 + call("os", "system", s(_shell(m))) + STOP
    return Case(payload, "unsafe", ("os.system", "raw"), payload)


def _raw_protocol4(m):  # Python's own protocol-4 output: STACK_GLOBAL over memoized names
    payload = pickle.dumps(_Reduce(exec, _py(m)), protocol=4)
    return Case(payload, "unsafe", ("builtins.exec",), payload)


def _raw_protocol0(m):
    payload = f"cos\nsystem\n(S'{_shell(m)}'\ntR.".encode()
    return Case(payload, "unsafe", ("os.system",), payload)


def _raw_benign(m):  # what `pickle.dump(embedding_dict)` would give: still not read
    return Case(PROTO2 + dct(s("<tok>"), lst(i(1), i(2))) + STOP, "format", ("legacy", "non-zip"))


def _with_member(*names):
    return lambda m: Case(torch_zip(PROTO2 + b"}" + STOP, extra=[(n, b"x") for n in names]),
                          "format", (names[-1],))


def _duplicate(m):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we want
        data = torch_zip(PROTO2 + b"}" + STOP, extra=[("archive/data.pkl", PROTO2 + b"}" + STOP)])
    return Case(data, "format", ("archive/data.pkl", "twice"))


def _truncated(m):
    data = valid_file()
    return Case(data[: len(data) // 2], "format", ("truncated or corrupt",))


def _missing_storage(m):
    p = PROTO2 + dct(s("emb_params"), tensor(key="3")) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "format", ("data/3",))


def _short_storage(m):
    return Case(torch_zip(PROTO2 + tensor() + STOP, {"0": F32_4[:8]}), "format", ("data/0", "8 bytes"))


def _view_out_of_bounds(m):
    p = PROTO2 + tensor(size=(4, 4), stride=(4, 1)) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "format", ("data/0",))


def _zip_bomb(m):
    data = torch_zip(PROTO2 + tensor(numel=5_000_000, size=(5_000_000,), stride=(1,)) + STOP,
                     {"0": bytes(20_000_000)}, compress={"archive/data/0"})
    return Case(data, "format", ("zip bomb", "archive/data/0"))


def _huge_expand(m):  # a 1-element storage broadcast to 10^12 elements by stride 0
    p = PROTO2 + tensor(numel=1, size=(10**6, 10**6), stride=(0, 0)) + STOP
    return Case(torch_zip(p, {"0": F32_4[:4]}), "format", ("larger than the file",))


def _deep_tuples(m):  # hashing a 100k-deep tuple would overflow the C stack
    p = PROTO2 + b"}" + b")" + b"\x85" * 100_000 + i(1) + b"s" + STOP
    return Case(torch_zip(p), "format", ("deeply",))


def _billion_laughs(m):  # 2^40 references via the memo: fine as long as nothing copies them
    p = PROTO2 + b"]q\x000" + b"".join(b"(h\x00h\x00lq\x000" for _ in range(40)) + b"h\x00" + STOP
    return Case(torch_zip(p), "ok", ())


def _byteorder(m):
    return Case(torch_zip(valid_file_pickle(), {"0": F32_4}, byteorder=b"middle"), "format",
                ("byte order",))


def valid_file_pickle() -> bytes:
    return PROTO2 + dct(s("emb_params"), tensor()) + STOP


def _lfs(m):
    data = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 3100\n"
    return Case(data, "format", ("LFS",))


def _bad_persid(m):
    return Case(torch_zip(PROTO2 + tup(s("evil")) + b"Q" + STOP), "format", ("persistent id",))


def _call_storage_type(m):
    return Case(torch_zip(PROTO2 + call("torch", "FloatStorage", i(10)) + STOP), "format",
                ("torch.FloatStorage",))


def _missing_memo(m):
    return Case(torch_zip(PROTO2 + b"h\x05" + STOP), "format", ("memo",))


def _append_to_global(m):  # a real unpickler would call OrderedDict.append(...); we refuse
    return Case(torch_zip(PROTO2 + glob("collections", "OrderedDict") + i(1) + b"a" + STOP), "format",
                ("collections.OrderedDict",))


BUILDERS = {
    "os_system": _os_system,
    "posix_system": _posix_system,
    "builtins_eval": _eval,
    "builtins_exec": _exec_stack_global,
    "importlib_import_module": _import_module,
    "subprocess_popen": _popen,
    "builtins_getattr": _getattr,
    "stack_global_hidden_from_scan": _stack_global_hidden,
    "build_on_plain_dict": _build_on_dict,
    "inst_opcode": _inst,
    "obj_opcode": _obj,
    "obj_opcode_allowed_class": _obj_allowed,
    "newobj_popen": _newobj,
    "newobj_allowed_callable": _newobj_allowed,
    "ext1_opcode": _ext1,
    "torch_serialization_get_layout": _torch_internal("torch.serialization", "_get_layout", s("torch.strided")),
    "torch_C_internal": _torch_internal("torch._C", "_set_grad_enabled", b"\x88"),
    "torch_storage_load_from_bytes": _torch_internal("torch.storage", "_load_from_bytes", s("x")),
    "torch_load": _torch_internal("torch", "load", s("/tmp/x.pt")),
    "torch_rebuild_from_type": _torch_internal("torch._tensor", "_rebuild_from_type_v2", i(0)),
    "payload_in_backward_hooks": _hooks_payload,
    "raw_pickle_os_system": _raw_malicious,
    "raw_pickle_protocol0": _raw_protocol0,
    "raw_pickle_protocol4": _raw_protocol4,
    "raw_pickle_benign": _raw_benign,
    "zip_extra_member": _with_member("archive/evil.py"),
    "zip_parent_dir_member": _with_member("../evil"),
    "zip_inner_dotdot_member": _with_member("archive/../evil"),
    "zip_absolute_member": _with_member("/etc/evil"),
    "zip_second_folder": lambda m: Case(torch_zip(PROTO2 + b"}" + STOP, extra=[("other/version", b"3")]),
                                        "format", ("one top-level folder", "'other'")),
    "zip_duplicate_member": _duplicate,
    "truncated_at_half": _truncated,
    "missing_storage": _missing_storage,
    "short_storage": _short_storage,
    "view_out_of_bounds": _view_out_of_bounds,
    "zip_bomb": _zip_bomb,
    "huge_expanded_tensor": _huge_expand,
    "deep_tuples": _deep_tuples,
    "billion_laughs": _billion_laughs,
    "unknown_byteorder": _byteorder,
    "git_lfs_pointer": _lfs,
    "bad_persistent_id": _bad_persid,
    "call_storage_type": _call_storage_type,
    "missing_memo": _missing_memo,
    "append_to_global": _append_to_global,
}

# Cases whose payload really runs code when unpickled (the positive controls). The Popen
# ones are left out only because the child may not have finished when the check runs.
LIVE = ["os_system", "posix_system", "builtins_eval", "builtins_exec", "importlib_import_module",
        "inst_opcode", "obj_opcode", "raw_pickle_os_system",
        "raw_pickle_protocol0", "raw_pickle_protocol4", "stack_global_hidden_from_scan"]
