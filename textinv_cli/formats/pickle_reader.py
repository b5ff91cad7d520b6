"""Read `torch.save` files without torch and without running any pickle code.

A torch file is a zip archive: `<prefix>/data.pkl` (a pickle describing the object) plus
raw tensor bytes in `<prefix>/data/<key>`. Unpickling normally *calls* whatever the pickle
names, which is how malicious .pt/.bin files run code. Here the pickle is only parsed
(`pickletools.genops` decodes opcodes; it never imports or calls anything) and a small
stack machine interprets the opcodes torch writes. A GLOBAL resolves through an allowlist
to one of our own handlers, never to the module it names; anything else is refused by
name. Tensors come back as numpy arrays, OrderedDicts as dicts, ParameterDicts as dicts
of their parameters, torch.Size as tuples.

Every step spends from one Budget sized from the file (pickle_budget), so memory and time
are O(file size) whatever the opcodes do; and each storage is read once, typed by its
first reference, exactly as torch.load does, so both read the same numbers or we refuse.
"""

from __future__ import annotations

import contextlib
import pickletools

import numpy as np

from ..errors import FormatError, TextinvError, UnsafeFileError
from .pickle_budget import MAX_TENSOR_INT, OP_COST, Budget, check_int, check_key
from .pickle_values import (MAX_DEPTH, Storage, TensorRef, decode, decoded_cost, describe, itemsize, plain,
                            storage_name)
from .pickle_allowlist import (MAX_OPS, UNSAFE_HINT, AllowedGlobal, looks_like_legacy_tar,
                               looks_like_raw_pickle, looks_like_torch_zip, refuse_unsafe, resolve_name,
                               tar_members)
from .torch_zip import CORRUPT_HINT, open_archive, read_member

__all__ = ["load_torch_pickle", "describe_torch_pickle", "TensorRef", "looks_like_torch_zip",
           "looks_like_raw_pickle", "looks_like_legacy_tar"]

MAX_NDIM = 32

_LEGACY_HINT = ("Re-save it with a recent torch (torch.save writes zip archives since 1.6), or "
                "convert it to .safetensors on a machine you trust.")


def load_torch_pickle(data: bytes, *, source: str) -> object:
    """The object a torch zip archive holds, as plain Python with numpy arrays.

    Raises FormatError (corrupt, truncated, unexpected layout) or UnsafeFileError (the
    pickle asks for something that is not tensor data); nothing from the file is executed.
    """
    data = bytes(data)
    if not looks_like_torch_zip(data):
        if data.startswith(b"version https://git-lfs"):
            raise FormatError(f"{source} is a Git LFS pointer, not the file itself.",
                              "Run `git lfs pull`, or download the real file.")
        if looks_like_legacy_tar(data):
            for member, blob in tar_members(data):
                refuse_unsafe(blob, source, f"the {member!r} pickle of this legacy tar file")
            raise FormatError(f"{source} is a legacy (torch < 0.4, tar) file; textinv does not read those.",
                              _LEGACY_HINT)
        if looks_like_raw_pickle(data):
            refuse_unsafe(data, source, "this raw (non-zip) pickle")
            raise FormatError(f"{source} is a legacy (non-zip) pickle; textinv does not read those.",
                              _LEGACY_HINT)
        raise FormatError(f"{source} is not a torch file (no zip archive inside).", CORRUPT_HINT)
    with _format_errors(source):
        zf, members, prefix = open_archive(data, source)
        order = read_member(zf, members["byteorder"], source).strip() if "byteorder" in members else b"little"
        if order not in (b"little", b"big"):
            raise FormatError(f"{source}: unknown byte order {order[:20]!r} in {prefix}/byteorder.")
        pkl = read_member(zf, members["data.pkl"], source)
        refuse_unsafe(pkl, source)

        def storage_bytes(key: str) -> bytes:
            if f"data/{key}" not in members:
                raise FormatError(f"{source}: data.pkl refers to storage {prefix}/data/{key}, which the "
                                  "archive does not contain.", CORRUPT_HINT)
            return read_member(zf, members[f"data/{key}"], source)

        budget = Budget(len(data), source)  # one budget for the whole read, _plain included
        obj = _Interpreter(pkl, source, storage_bytes, big=order == b"big", budget=budget).run()
        return plain(obj, {}, 0, source, budget)


@contextlib.contextmanager
def _format_errors(source: str):
    try:
        yield
    except TextinvError:
        raise
    except RecursionError:
        raise FormatError(f"{source}: the pickle nests too deeply to be tensor data.") from None
    except Exception as e:  # any slip on hostile bytes is still "corrupt", never a crash
        raise FormatError(f"{source} is truncated or corrupt ({_brief(e)}).", CORRUPT_HINT) from None


# A model's data.pkl (read apart from its multi-GB storages): SDXL's 2500 tensors take ~80k
# opcodes (32 per tensor) in ~420 KB, so both caps leave room for a checkpoint with EMA weights.
MODEL_PICKLE_BYTES = 4 * 2**20
MODEL_MAX_OPS = 1_000_000
# Checkpoints trained with PyTorch Lightning 1.x (v1-5-pruned-emaonly.ckpt, many community models)
# keep the callbacks' state beside the weights: ModelCheckpoint's class as a dict key, numpy
# scalars and arrays as scores. In the describing mode these names resolve to inert stand-ins:
# never imported or called, their arguments and state dropped, None in the result.
MODEL_INERT_GLOBALS = frozenset(
    ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "pytorch_lightning.callbacks.model_checkpoint",
     "numpy.dtype", "numpy.ndarray"]
    + [f"numpy.{core}.multiarray.{n}" for core in ("core", "_core") for n in ("scalar", "_reconstruct")])
_MODEL_UNITS_PER_PICKLE_BYTE = 64  # per pickle byte; SDXL's spends under 20 (96 per opcode)


def describe_torch_pickle(pkl: bytes, *, source: str, storage_size) -> object:
    """The object a model's data.pkl describes, as plain Python whose tensors are TensorRefs:
    the same allowlist and checks as load_torch_pickle, but no storage is read. `storage_size(key)`
    gives the byte length of data/<key> (FormatError if absent); every tensor is checked to lie
    inside its storage. The budget is sized from the pickle, not from the (multi-GB) file."""
    if len(pkl) > MODEL_PICKLE_BYTES:
        raise FormatError(f"{source}: its data.pkl is {len(pkl)} bytes, far larger than a model's (SDXL's is "
                          "~420 KB).", "It is not a Stable Diffusion checkpoint, or has been tampered with.")
    # no refuse_unsafe pre-scan: it would name the inert globals; every global still goes
    # through resolve(), which refuses the rest by name before anything else happens to it
    budget = Budget(_MODEL_UNITS_PER_PICKLE_BYTE // 8 * len(pkl), source)  # Budget counts 8 units per byte
    with _format_errors(source):
        obj = _Interpreter(pkl, source, storage_size, big=False, budget=budget, lazy=True).run()
        return plain(obj, {}, 0, source, budget)


# -- the interpreter ---------------------------------------------------------------------

_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_VALUE_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT", "BINUNICODE",
              "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_EMPTY = {"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_SET": set}
_SMALL_TUPLES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_MARKED = {"TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS", "ADDITEMS", "FROZENSET", "POP_MARK"}
_CODE_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "NEWOBJ_EX"}  # build arbitrary objects


class _Interpreter:
    def __init__(self, pkl: bytes, source: str, storage_bytes, *, big: bool, budget: Budget, lazy: bool = False):
        # lazy: storage_bytes(key) gives data/<key>'s length, and tensors become TensorRefs
        self.pkl, self.source, self.storage_bytes = pkl, source, storage_bytes
        self.big, self.budget, self.lazy = big, budget, lazy
        self.max_ops = MODEL_MAX_OPS if lazy else MAX_OPS
        self.storages: dict[str, Storage] = {}  # storage key -> its one reading, as torch caches it
        self.modules: dict[int, dict] = {}    # id -> the dict standing in for a ParameterDict
        self.tdepth: dict[int, int] = {}      # id -> nesting depth of a tuple / frozenset
        self.keep: list = []                  # keeps those ids from being reused

    def fail(self, what: str):
        raise FormatError(f"{self.source}: {what}", CORRUPT_HINT)

    def run(self):
        stack: list = []
        metastack: list[list] = []
        memo: dict[int, object] = {}
        for n, (op, arg, _) in enumerate(pickletools.genops(self.pkl)):
            name = op.name
            if n >= self.max_ops:  # also bounds the stack, the metastack and the memo
                self.fail("the pickle is too large to be tensor data.")
            self.budget.spend(OP_COST, "pickle objects")  # copies and decoding are charged where done
            if name in _VALUE_OPS:
                if type(arg) is int:
                    check_int(arg, self.source)
                elif isinstance(arg, (str, bytes)):
                    self.budget.spend(len(arg), "strings")
                stack.append(arg)
            elif name in _CONST:
                stack.append(_CONST[name])
            elif name in _EMPTY:
                stack.append(_EMPTY[name]())
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    self.fail(f"the pickle reads memo slot {arg}, which was never written.")
                stack.append(memo[arg])
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in _MARKED:
                items, stack = stack, metastack.pop()
                self.collect(name, items, stack)
            elif name in _SMALL_TUPLES:
                n = _SMALL_TUPLES[name]
                if len(stack) < n:
                    self.fail("the pickle's stack underflows.")
                items = stack[len(stack) - n:]
                del stack[len(stack) - n:]
                stack.append(self.make_tuple(items))
            elif name == "APPEND":
                v = stack.pop()
                self.target(stack, list).append(v)
            elif name == "SETITEM":
                v, k = stack.pop(), stack.pop()
                self.target(stack, dict)[self.key(k)] = v
            elif name == "POP":
                stack.pop()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "GLOBAL":
                stack.append(self.resolve(".".join(arg.split(" ", 1))))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    self.fail("STACK_GLOBAL needs two strings.")
                stack.append(self.resolve(f"{module}.{attr}"))
            elif name == "REDUCE":
                args = stack.pop()
                stack.append(self.call(stack.pop(), args))
            elif name == "NEWOBJ":  # only a ParameterDict: a dict that BUILD fills with its parameters
                args, cls = stack.pop(), stack.pop()
                if isinstance(cls, AllowedGlobal) and cls.kind == "inert" and type(args) is tuple:
                    stack.append(AllowedGlobal(cls.qualname, "inert"))
                    continue
                if not (isinstance(cls, AllowedGlobal) and cls.kind == "module" and type(args) is tuple):
                    self.fail(f"NEWOBJ on {describe(cls)} is not tensor data.")
                stack.append({})
                self.modules[id(stack[-1])] = stack[-1]
            elif name == "BUILD":
                state = stack.pop()
                self.build(stack[-1], state)
            elif name == "BINPERSID":
                stack.append(self.persistent(stack.pop()))
            elif name == "PROTO" and not 2 <= arg <= 5:
                self.fail(f"unsupported pickle protocol {arg}.")
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                if len(stack) != 1 or metastack:
                    self.fail("the pickle ends with a malformed stack.")
                return stack[0]
            elif name in _CODE_OPS:
                what = (f"asks for {'.'.join(str(arg).split(' ', 1))[:200]} (INST)" if name == "INST"
                        else f"uses the {name} opcode, which builds arbitrary objects and")
                raise UnsafeFileError(f"textinv refuses to load {self.source}: the pickle {what} is not "
                                      "tensor data.", UNSAFE_HINT)
            else:
                self.fail(f"the pickle uses the {name} opcode, which torch.save never writes.")
        self.fail("the pickle ends before its STOP opcode.")  # pragma: no cover (genops raises)

    # -- opcode helpers ------------------------------------------------------------------
    def target(self, stack: list, kind: type):
        """The container items are added to: a real unpickler would call any object's method."""
        if not stack or type(stack[-1]) is not kind:
            self.fail(f"the pickle adds items to {describe(stack[-1] if stack else None)}, "
                      f"not a {kind.__name__}.")
        return stack[-1]

    def collect(self, name: str, items: list, stack: list):
        if name in ("TUPLE", "FROZENSET"):
            stack.append(self.make_tuple(items, tuple if name == "TUPLE" else frozenset))
        elif name == "LIST":
            stack.append(items)
        elif name == "APPENDS":
            self.target(stack, list).extend(items)
        elif name == "ADDITEMS":
            self.target(stack, set).update(self.key(k) for k in items)
        elif name in ("DICT", "SETITEMS"):
            if len(items) % 2:
                self.fail(f"{name} has an odd number of items.")
            d = {} if name == "DICT" else self.target(stack, dict)
            d.update(zip((self.key(k) for k in items[::2]), items[1::2]))
            if name == "DICT":
                stack.append(d)

    def make_tuple(self, items, kind=tuple):
        """A tuple/frozenset, refusing nests deep enough to exhaust the C stack."""
        if kind is frozenset:
            items = [self.key(k) for k in items]
        depth = 1 + max((self.tdepth.get(id(x), 1) for x in items if type(x) in (tuple, frozenset)),
                        default=0)
        if depth > MAX_DEPTH:
            self.fail("the pickle nests tuples too deeply to be tensor data.")
        t = kind(items)
        self.tdepth[id(t)] = depth
        self.keep.append(t)
        return t

    def key(self, k):
        """A dict key or set item (check_key); an inert stand-in hashes by identity."""
        return k if self.lazy and isinstance(k, AllowedGlobal) and k.kind == "inert" else check_key(k, self.source)

    def resolve(self, qual: str) -> AllowedGlobal:
        g = resolve_name(qual)
        if g is None and self.lazy and qual in MODEL_INERT_GLOBALS:
            g = AllowedGlobal(qual, "inert")
        if g is None:
            raise UnsafeFileError(f"textinv refuses to load {self.source}: the pickle asks for "
                                  f"{qual[:200]}, which is not tensor data.", UNSAFE_HINT)
        return g

    def call(self, fn, args):
        if isinstance(fn, AllowedGlobal) and fn.kind == "inert" and type(args) is tuple:
            return AllowedGlobal(fn.qualname, "inert")  # what it would build, never built
        if not (isinstance(fn, AllowedGlobal) and fn.kind == "call") or type(args) is not tuple:
            self.fail(f"the pickle calls {describe(fn)}, which is not tensor data.")
        try:
            return getattr(self, f"h_{fn.arg}")(*args)
        except TypeError:
            self.fail(f"the pickle passes malformed arguments to {fn.qualname}.")

    def build(self, obj, state):
        if isinstance(obj, AllowedGlobal) and obj.kind == "inert":
            return  # its state (a numpy scalar's dtype, an array's bytes) is dropped
        if self.modules.get(id(obj)) is not obj:
            if state is None or (type(state) is dict and not state):
                return
            self.fail(f"the pickle sets the state of {describe(obj)}, which is not tensor data.")
        if type(state) is tuple and state and type(state[0]) is dict:
            state = state[0]  # (dict state, slot state)
        params = state.get("_parameters") if type(state) is dict else None
        if type(params) is dict:  # keep a module's parameters, drop hooks and flags
            self.budget.copy(len(params), "module parameters copied")
            obj.update((k, v) for k, v in params.items() if isinstance(v, (np.ndarray, TensorRef)))

    def persistent(self, pid):
        """('storage', storage type, key, location, numel) -> the bytes of data/<key>."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            self.fail("the pickle holds a persistent id that is not a tensor storage.")
        _, stype, key, _location, numel = pid
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not (isinstance(stype, AllowedGlobal) and stype.kind == "storage" and isinstance(key, str)
                and key.isascii() and key.isdigit() and type(numel) is int and numel >= 0):
            self.fail("the pickle holds a malformed storage reference.")
        known = self.storages.get(key)
        if known is not None:
            # torch reads a storage once, typed by its first reference, and reuses it for every
            # later one whatever type or size that one gives: a file that differs is tampered
            # with, and reading each reference its own way would give numbers torch never sees.
            if (known.code, known.numel) != (stype.arg, numel):
                self.fail(f"storage data/{key} is referenced as {storage_name(known.code)} of {known.numel} "
                          f"elements and as {storage_name(stype.arg)} of {numel}; torch never writes that.")
            return known  # the same object: decoded once however often it is named
        raw, need = self.storage_bytes(key), numel * itemsize(stype.arg)
        length = raw if self.lazy else len(raw)
        self.budget.spend(0 if self.lazy else length, "storage bytes")
        if length != need:  # torch refuses a record of any other size, longer ones included
            self.fail(f"storage data/{key} holds {length} bytes but the pickle needs exactly {need}.")
        self.storages[key] = Storage(key, stype.arg, None if self.lazy else raw, self.big, numel)
        return self.storages[key]

    # -- the allowlisted callables: our own code, nothing named in the file is imported --
    def h_dict(self, items=()):  # OrderedDict(): a plain dict keeps the order just as well
        items = self.items_of(items, (list, tuple, dict))
        self.budget.copy(len(items), "OrderedDict copies")
        pairs = items.items() if type(items) is dict else items
        if not all(type(p) in (tuple, list) and len(p) == 2 for p in pairs):
            self.fail("OrderedDict gets something other than (key, value) pairs.")
        return {self.key(k): v for k, v in pairs}

    def h_set(self, items=()):
        items = self.items_of(items)
        self.budget.copy(len(items), "set copies")
        return {self.key(k) for k in items}

    def h_frozenset(self, items=()):
        items = self.items_of(items)
        self.budget.copy(len(items), "frozenset copies")
        return self.make_tuple(items, frozenset)

    def h_bytes(self):  # protocol 2 writes b"" as bytes() ...
        return b""

    def h_encode(self, text, encoding="latin1"):  # ... and other bytes as encode(str, "latin1")
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            self.fail("_codecs.encode is only used for latin-1 bytes.")
        self.budget.spend(len(text), "bytes encoded")  # a new object each time, even from the memo
        return text.encode("latin-1")

    def h_size(self, dims=()):
        dims = self.items_of(dims, (tuple, list))
        self.budget.copy(len(dims), "torch.Size copies")
        if not all(type(d) is int for d in dims):  # torch.Size refuses anything else
            self.fail("torch.Size gets something other than integers.")
        return self.make_tuple(dims)

    def h_tensor_v1(self, storage, offset, size, stride):
        return self.tensor(storage, offset, size, stride, None)

    def h_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
        return self.tensor(storage, offset, size, stride, None)

    def h_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, meta=None):
        if not (isinstance(dtype, AllowedGlobal) and dtype.kind == "dtype"):
            self.fail("a tensor's dtype is not a torch dtype.")
        return self.tensor(storage, offset, size, stride, dtype.arg)

    def h_parameter(self, data, requires_grad=True, hooks=None, state=None):
        if not isinstance(data, (np.ndarray, TensorRef)):
            self.fail("a Parameter wraps something that is not a tensor.")
        return data  # a Parameter is its data; hooks and Python state are dropped

    def items_of(self, items, kinds=(list, tuple)):
        if type(items) not in kinds:
            self.fail(f"an allowlisted constructor gets {describe(items)}.")
        return items

    def tensor(self, storage, offset, size, stride, code):
        if not isinstance(storage, Storage):
            self.fail(f"a tensor's storage is {describe(storage)}, not tensor data.")
        ints = lambda t: type(t) is tuple and all(type(x) is int and 0 <= x <= MAX_TENSOR_INT for x in t)  # noqa: E731
        if not (type(offset) is int and 0 <= offset <= MAX_TENSOR_INT and ints(size) and ints(stride)
                and len(size) == len(stride) <= MAX_NDIM):
            self.fail("a tensor has a malformed offset, shape or stride.")
        if self.big and code is not None and code != storage.code:
            # torch byteswaps a big-endian storage by its own element size, then views it
            self.fail(f"a tensor views big-endian storage data/{storage.key} as another type; torch would "
                      "read its bytes in a different order.")
        code = code or storage.code or "u1"
        item = itemsize(code)
        numel = storage.numel * itemsize(storage.code) // item  # the storage's length was checked
        count = int(np.prod(size, dtype=object)) if size else 1
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if count else offset - 1
        if last >= numel or offset > numel:
            self.fail(f"a tensor needs {last + 1} elements of storage data/{storage.key}, which holds "
                      f"{numel}.")
        if self.lazy:  # read later, by seeking: it may name no more elements than the storage holds
            if count > numel:
                self.fail(f"a tensor of {count} elements views storage data/{storage.key}, which holds {numel} "
                          "(an expanded view is not model weights).")
            return TensorRef(storage, code, offset, size, stride)
        # charged before decoding: stride 0 can "expand" one element into terabytes
        self.budget.spend(decoded_cost(count, code), "tensors decoded")
        return decode(storage.raw, code, self.big, offset, size, stride)


def _brief(e: Exception) -> str:
    try:  # str() of an exception can itself fail on hostile contents
        return f"{type(e).__name__}: {' '.join(str(e)[:120].split())}"  # one line, whatever it held
    except Exception:
        return type(e).__name__
