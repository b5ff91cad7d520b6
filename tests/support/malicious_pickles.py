"""A corpus of hostile and broken torch files for the safe-reader tests.

Every payload that would run code creates a marker file when unpickled for real, so the
tests can (1) prove the payload is live by running it with the real pickle module in a
throw-away subprocess, and (2) assert our reader never creates the marker. Pickle-level
payloads are here; container-level ones (zip members, legacy formats) in malicious_archives.
"""

from __future__ import annotations

import marshal
import os
import pickle
import struct
from pathlib import Path

from . import malicious_archives as archives
from .pickle_blocks import (F32_4, PROTO2, STOP, Case, Reduce, a1111_with_step, bare_storage_refs,  # noqa: F401
                            call, colliding_int_keys, copies, dct, glob, i, long4, lst, py_cmd, s,
                            self_similar_tuple_key, shell_cmd, tensor, torch_zip, tup, valid_file,
                            valid_file_pickle, zipped)


def build(name: str, marker: Path) -> Case:
    """The case `name`; its payload, run for real, would create `marker`."""
    return BUILDERS[name](marker)


def _os_system(m):
    return zipped(PROTO2 + call("os", "system", s(shell_cmd(m))) + STOP, "unsafe", "os.system")


def _posix_system(m):
    payload = pickle.dumps(Reduce(os.system, shell_cmd(m)), protocol=2)  # "posix system" on Linux
    return zipped(payload, "unsafe", f"{os.system.__module__}.system")


def _eval(m):
    return zipped(PROTO2 + call("__builtin__", "eval", s(py_cmd(m))) + STOP, "unsafe", "__builtin__.eval")


def _exec_stack_global(m):  # protocol 4 spelling: STACK_GLOBAL takes the names from the stack
    p = b"\x80\x04" + s("builtins") + s("exec") + b"\x93" + tup(s(py_cmd(m))) + b"R" + STOP
    return zipped(p, "unsafe", "builtins.exec")


def _import_module(m):  # getattr(importlib.import_module("os"), "system")("touch marker")
    p = (PROTO2 + glob("importlib", "import_module") + b"q\x00" + b"0"
         + glob("builtins", "getattr") + tup(b"h\x00" + tup(s("os")) + b"R", s("system")) + b"R"
         + tup(s(shell_cmd(m))) + b"R" + STOP)
    return zipped(p, "unsafe", "importlib.import_module")


def _popen(m):
    return zipped(PROTO2 + call("subprocess", "Popen", lst(s("touch"), s(str(m)))) + STOP,
                   "unsafe", "subprocess.Popen")


def _stack_global_hidden(m):  # names built on the stack where a parse-only scan cannot follow them
    p = (b"\x80\x04" + s("os") + b"20" + s("system") + b"\x93"  # 'os', DUP, POP, 'system', STACK_GLOBAL
         + tup(s(shell_cmd(m))) + b"R" + STOP)
    return zipped(p, "unsafe", "os.system")


def _build_on_dict(m):  # BUILD would call __setstate__ / update __dict__ on a real object
    return Case(torch_zip(PROTO2 + call("collections", "OrderedDict") + dct(s("__class__"), i(1)) + b"b" + STOP),
                "format", ("sets the state",))


def _getattr(m):  # reach os through an allowed object's attributes
    p = PROTO2 + call("__builtin__", "getattr", glob("collections", "OrderedDict"), s("__init__")) + STOP
    return Case(torch_zip(p), "unsafe", ("__builtin__.getattr",))


def _inst(m):  # protocol 0's INST: MARK args INST module name
    return zipped(b"(" + s(shell_cmd(m)) + b"ios\nsystem\n" + STOP, "unsafe", "os.system")


def _obj(m):  # protocol 1's OBJ: MARK class args OBJ
    return zipped(b"(" + glob("os", "system") + s(shell_cmd(m)) + b"o" + STOP, "unsafe", "os.system")


def _obj_allowed(m):  # OBJ on an allowlisted name is still refused: it builds arbitrary objects
    return Case(torch_zip(PROTO2 + b"(" + glob("collections", "OrderedDict") + b"o" + STOP),
                "unsafe", ("OBJ",))


def _newobj(m):
    return zipped(PROTO2 + glob("subprocess", "Popen") + tup(lst(s("touch"), s(str(m)))) + b"\x81" + STOP,
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
    p = PROTO2 + dct(s("emb_params"), tensor(hooks=call("os", "system", s(shell_cmd(m))))) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "unsafe", ("os.system",), p)


def _missing_storage(m):
    p = PROTO2 + dct(s("emb_params"), tensor(key="3")) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "format", ("data/3",))


def _short_storage(m):
    return Case(torch_zip(PROTO2 + tensor() + STOP, {"0": F32_4[:8]}), "format", ("data/0", "8 bytes"))


def _view_out_of_bounds(m):
    p = PROTO2 + tensor(size=(4, 4), stride=(4, 1)) + STOP
    return Case(torch_zip(p, {"0": F32_4}), "format", ("data/0",))


def _huge_expand(m):  # a 1-element storage broadcast to 10^12 elements by stride 0
    p = PROTO2 + tensor(numel=1, size=(10**6, 10**6), stride=(0, 0)) + STOP
    return Case(torch_zip(p, {"0": F32_4[:4]}), "format", ("larger than the file",))


def _deep_tuples(m):  # hashing a 100k-deep tuple would overflow the C stack
    p = PROTO2 + b"}" + b")" + b"\x85" * 100_000 + i(1) + b"s" + STOP
    return Case(torch_zip(p), "format", ("deeply",))


def _billion_laughs(m):  # 2^40 references via the memo: fine as long as nothing copies them
    p = PROTO2 + b"]q\x000" + b"".join(b"(h\x00h\x00lq\x000" for _ in range(40)) + b"h\x00" + STOP
    return Case(torch_zip(p), "ok", ())


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


def _pkgutil_resolve_name(m):  # pkgutil.resolve_name("os:system") is os.system, by a string
    p = PROTO2 + call("pkgutil", "resolve_name", s("os:system")) + tup(s(shell_cmd(m))) + b"R" + STOP
    return zipped(p, "unsafe", "pkgutil.resolve_name")


def _marshal_function(m):  # FunctionType(marshal.loads(<code object bytes>), {})() runs any code
    code = marshal.dumps(compile(py_cmd(m), "<payload>", "exec"))
    p = (b"\x80\x04" + glob("types", "FunctionType")
         + tup(glob("marshal", "loads") + tup(b"C" + bytes([len(code)]) + code if len(code) < 256
                                              else b"B" + struct.pack("<I", len(code)) + code) + b"R", b"}")
         + b"R" + b")R" + STOP)
    return zipped(p, "unsafe", "types.FunctionType")


def _subprocess_run(m):  # waits for the child, so the positive control can see the marker
    return zipped(PROTO2 + call("subprocess", "run", lst(s("touch"), s(str(m)))) + STOP,
                   "unsafe", "subprocess.run")


def _subprocess_stack_global(m):  # protocol 4: names pushed as strings, then STACK_GLOBAL
    p = b"\x80\x04" + s("subprocess") + s("getoutput") + b"\x93" + tup(s(shell_cmd(m))) + b"R" + STOP
    return zipped(p, "unsafe", "subprocess.getoutput")


def _dotted_name(m):  # protocol 4 resolves "path.os.system" attribute by attribute: os.system
    p = b"\x80\x04" + s("os") + s("path.os.system") + b"\x93" + tup(s(shell_cmd(m))) + b"R" + STOP
    return zipped(p, "unsafe", "os.path.os.system")


def _getattr_import(m):  # getattr(__import__("os"), "system")("touch marker"), builtins only
    p = (PROTO2 + call("builtins", "getattr", call("builtins", "__import__", s("os")), s("system"))
         + tup(s(shell_cmd(m))) + b"R" + STOP)
    return zipped(p, "unsafe", "builtins.getattr")


def _timeit(m):  # timeit compiles and runs the code it is given (here: its setup)
    return zipped(PROTO2 + call("timeit", "timeit", s("pass"), s(py_cmd(m)), b"N", i(1)) + STOP, "unsafe",
                  "timeit.timeit")


def _pydoc_pipepager(m):  # an obscure standard-library way to run a shell command
    return zipped(PROTO2 + call("pydoc", "pipepager", s(""), s(shell_cmd(m))) + STOP, "unsafe", "pydoc.pipepager")


def _os_spawnlp(m):  # os.spawnlp(os.P_WAIT, "touch", "touch", marker)
    return zipped(PROTO2 + call("os", "spawnlp", i(os.P_WAIT), s("touch"), s("touch"), s(str(m))) + STOP,
                  "unsafe", "os.spawnlp")


def _copyreg_reconstructor(m):  # the classic weights-only bypass attempt: build any class
    p = PROTO2 + call("copyreg", "_reconstructor", glob("os", "system"), glob("builtins", "object"), b"N") + STOP
    return Case(torch_zip(p), "unsafe", ("copyreg._reconstructor",))


def _newobj_ex(m):  # protocol 4's NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)
    p = b"\x80\x04" + glob("collections", "OrderedDict") + b")}" + b"\x92" + STOP
    return Case(torch_zip(p), "unsafe", ("NEWOBJ_EX",))


# -- amplification (issue #11 class 4): each is refused, or read, within the file's budget --

def _copies(through, source, n=3000):
    return lambda m: Case(torch_zip(copies(n, n, through, source), compress={"archive/data.pkl"}), "format",
                          ("too large to be tensor data",))


def _bare_storage_refs(m):  # one 100 KB storage named 20000 times: decoded once, not 20000 times
    return Case(torch_zip(bare_storage_refs(20_000, 100_000), {"0": bytes(100_000)},
                          compress={"archive/data/0", "archive/data.pkl"}), "ok", ())


def _tuple_key(m):  # ((t, t), (t, t))... 26 deep as a dict key: 2^26 steps to hash (60: forever)
    return Case(torch_zip(self_similar_tuple_key(26)), "format", ("tuple",))


def _colliding_ints(m):  # 20000 int keys that all hash to 0: a quadratic dict
    return Case(torch_zip(colliding_int_keys(20_000), compress={"archive/data.pkl"}), "format", ("61 bits",))


def _huge_int(m):  # a 5000-digit step: str() of it raises ValueError
    return Case(a1111_with_step(long4(10**5000)), "format", ("digits",))


BUILDERS = {
    "ordereddict_copies": _copies(("collections", "OrderedDict"), "dict"),
    "set_copies": _copies(("__builtin__", "set"), "list"),
    "frozenset_copies": _copies(("__builtin__", "frozenset"), "list"),
    "torch_size_copies": _copies(("torch", "Size"), "tuple"),
    "bare_storage_named_20000_times": _bare_storage_refs,
    "self_similar_tuple_key": _tuple_key,
    "colliding_int_keys": _colliding_ints,
    "integer_of_5000_digits": _huge_int,
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
    "missing_storage": _missing_storage,
    "short_storage": _short_storage,
    "view_out_of_bounds": _view_out_of_bounds,
    "huge_expanded_tensor": _huge_expand,
    "deep_tuples": _deep_tuples,
    "billion_laughs": _billion_laughs,
    "bad_persistent_id": _bad_persid,
    "call_storage_type": _call_storage_type,
    "missing_memo": _missing_memo,
    "append_to_global": _append_to_global,
    "pkgutil_resolve_name": _pkgutil_resolve_name,
    "marshal_code_function_type": _marshal_function,
    "subprocess_run": _subprocess_run,
    "subprocess_stack_global": _subprocess_stack_global,
    "dotted_name_stack_global": _dotted_name,
    "copyreg_reconstructor": _copyreg_reconstructor,
    "newobj_ex_opcode": _newobj_ex,
    "builtins_getattr_import": _getattr_import,
    "timeit_timeit": _timeit,
    "pydoc_pipepager": _pydoc_pipepager,
    "os_spawnlp": _os_spawnlp,
    "torch_hub_load": _torch_internal("torch.hub", "load", s("evil/repo"), s("model")),
    "torch_jit_load": _torch_internal("torch.jit", "load", s("/tmp/x.pt")),
    "torch_rebuild_from_numpy": _torch_internal("torch._utils", "_rebuild_device_tensor_from_numpy", i(0)),
    **archives.BUILDERS,
}

# Cases whose payload really runs code when unpickled (the positive controls). The Popen
# ones are left out only because the child may not have finished when the check runs.
LIVE = ["os_system", "posix_system", "builtins_eval", "builtins_exec", "importlib_import_module",
        "inst_opcode", "obj_opcode", "stack_global_hidden_from_scan", "pkgutil_resolve_name",
        "marshal_code_function_type", "subprocess_run", "subprocess_stack_global", "dotted_name_stack_global",
        "builtins_getattr_import", "timeit_timeit", "pydoc_pipepager", "os_spawnlp", *archives.LIVE]
