"""What a torch pickle's stand-ins become: storages decoded into numpy arrays, and the
interpreter's result turned into plain Python (pickle_reader runs the interpreter).

Every decode and copy here is charged to the read's Budget before it is made.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .pickle_allowlist import AllowedGlobal
from .pickle_budget import Budget

MAX_DEPTH = 100                # nesting; also keeps tuple hashing far from the C stack's end


class Storage:
    """A storage's bytes from data/<key>; `code` is the element code (None: untyped bytes)."""
    __slots__ = ("key", "code", "raw", "big", "numel")

    def __init__(self, key: str, code: str | None, raw, big: bool, numel: int):
        self.key, self.code, self.raw, self.big, self.numel = key, code, raw, big, numel


class TensorRef:
    """A tensor described, not decoded (pickle_reader.describe_torch_pickle): element `code`,
    `offset`, `size` and `stride` in elements of that code, into `storage`, whose bytes stay
    in the file. The interpreter has checked that every element it names is in the storage."""
    __slots__ = ("storage", "code", "offset", "size", "stride")

    def __init__(self, storage: Storage, code: str, offset: int, size: tuple, stride: tuple):
        self.storage, self.code, self.offset, self.size, self.stride = storage, code, offset, size, stride


def decode(raw, code: str, big: bool, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """Copy a bounds-checked strided view of storage bytes into a native, C-ordered array."""
    base = {"bf16": "u2", "b1": "u1"}.get(code, code)
    item = np.dtype(base).itemsize
    flat = np.frombuffer(raw, dtype=np.dtype(base).newbyteorder(">" if big else "<"), count=len(raw) // item)
    if all(size):
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                               strides=[s * item for s in stride], writeable=False)
        arr = np.array(view, dtype=np.dtype(base).newbyteorder("="), order="C")
    else:
        arr = np.zeros(size, dtype=np.dtype(base))
    if code == "bf16":  # bfloat16 is the top half of a float32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr != 0 if code == "b1" else arr


def decoded_cost(count: int, code: str) -> int:
    """Bytes _decode allocates for `count` elements: the copy, plus bf16's widening steps
    (uint32, then the float32 result) and bool's comparison."""
    return count * {"bf16": 10, "b1": 2}.get(code, itemsize(code))


def storage_name(code: str | None) -> str:
    return {None: "untyped bytes", "bf16": "bfloat16", "b1": "bool"}.get(code) or str(np.dtype(code))


def itemsize(code: str | None) -> int:
    return {"bf16": 2, "b1": 1, None: 1}.get(code) or np.dtype(code).itemsize


def describe(obj) -> str:
    if isinstance(obj, AllowedGlobal):
        return obj.qualname
    return "a storage" if isinstance(obj, Storage) else f"a {type(obj).__name__}"


def plain(obj, memo: dict, depth: int, source: str, budget: Budget):
    """The result as plain Python: stand-ins become arrays or names; shared parts stay shared
    (the memo also keeps a billion-laughs pickle from being expanded). Each container is
    copied once and each bare storage decoded once, charged to the read's budget."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, np.ndarray, TensorRef)):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if depth > MAX_DEPTH:
        raise FormatError(f"{source}: the pickle nests too deeply to be tensor data.")
    kind = type(obj)
    sub = lambda v: plain(v, memo, depth + 1, source, budget)  # noqa: E731
    if kind in (dict, list, tuple, set, frozenset):
        budget.copy(len(obj), "containers copied")
    if kind in (dict, list):
        out = memo[id(obj)] = kind()  # registered first, so cycles end here
        if kind is dict:
            out.update((k, sub(v)) for k, v in obj.items())  # keys are plain scalars already
        else:
            out.extend(sub(v) for v in obj)
        return out
    if kind in (tuple, set, frozenset):
        out = memo[id(obj)] = kind(sub(v) for v in obj)
        return out
    if isinstance(obj, Storage) and obj.raw is None:  # described, not read: only tensors are kept
        raise FormatError(f"{source}: the pickle holds a bare storage (data/{obj.key}) where model weights "
                          "are tensors.")
    if isinstance(obj, Storage):  # a bare storage, e.g. torch.save(t.untyped_storage())
        code = obj.code or "u1"
        budget.spend(decoded_cost(obj.numel, code), "storages decoded")
        out = memo[id(obj)] = decode(obj.raw, code, obj.big, 0, (obj.numel,), (1,))
        return out
    if isinstance(obj, AllowedGlobal) and obj.kind == "dtype":
        return obj.qualname
    if isinstance(obj, AllowedGlobal) and obj.kind == "inert":  # describe_torch_pickle's stand-ins
        return None
    raise FormatError(f"{source}: the pickle holds a bare reference to {describe(obj)}, not data.")
