"""One allocation and time budget for reading a torch pickle, and the values it may hold.

A cap on opcodes does not bound memory: one opcode can copy a whole container
(`OrderedDict(d)`, `set(l)`, `torch.Size(t)`, a module's state), decode a storage or
widen bf16, and the memo lets a few bytes name the same big object again and again. So
every step of a read spends from one `Budget`, sized from the file: a fixed cost per
opcode (the object it may make, its stack and memo slot), and for the steps whose work
grows with their input, the items they copy and the bytes they materialise, charged
before the work is done. Work and memory are then O(file size) with a small constant,
whatever the pickle does.

Hashing is work too: a 100-deep self-similar tuple hashes in 2^100 steps, ints that are
equal modulo 2^61 - 1 collide in every dict, and so do tuples of two chosen ints. So dict
keys and set items are limited to what a tensor dict uses (str, bytes, small ints, bool,
None, flat tuples of strings with at most one other item), and no int in a pickle is
wider than LONG1 can write (str() of a 5000-digit int raises).
"""

from __future__ import annotations

from ..errors import FormatError

# Budget units are approximate bytes of memory. An honest file spends about 1x its size
# on tensor bytes and far less on objects; the constants leave room for bf16 widening,
# views sharing a storage and a pickle-heavy small file.
UNITS_PER_FILE_BYTE = 8
FIXED_UNITS = 8 * 2**20
OP_COST = 96      # any opcode: one object (<= ~64 bytes), its stack slot, maybe a memo entry
ITEM_COST = 64    # each item a constructor copies: a dict entry with its index slot, a set slot
MAX_INT_BYTES = 255              # LONG1's limit; torch.save never writes wider ints
MAX_KEY_INT = 2**61 - 2          # below the hash modulus, distinct ints hash differently
MAX_TENSOR_INT = 2**63 - 1       # torch keeps offsets, sizes and strides as int64
_KEY_TYPES = (str, bytes, int, bool, type(None))

OVER_HINT = ("It is not an embedding, or was made to exhaust memory; nothing in it was executed. "
             "Get the embedding as .safetensors from a source you trust.")


class Budget:
    """What one read may still spend; `spend` refuses the file the moment it would go over."""
    __slots__ = ("left", "source")

    def __init__(self, file_size: int, source: str):
        self.left = UNITS_PER_FILE_BYTE * file_size + FIXED_UNITS
        self.source = source

    def spend(self, units: int, what: str) -> None:
        self.left -= units
        if self.left < 0:
            raise FormatError(f"{self.source}: the data it describes is too large to be tensor data, far "
                              f"larger than the file ({what}).", OVER_HINT)

    def copy(self, n: int, what: str) -> None:
        self.spend(n * ITEM_COST, what)


def _hash_safe(key) -> bool:
    if type(key) is int:
        return -MAX_KEY_INT <= key <= MAX_KEY_INT
    if type(key) is tuple:  # a flat tuple whose hash the file controls through one element at most
        # (tuple hashing is invertible lane by lane: two chosen ints make any hash, so collisions)
        return (all(type(x) in _KEY_TYPES and _hash_safe(x) for x in key)
                and sum(type(x) not in (str, bytes) for x in key) <= 1)
    return type(key) in _KEY_TYPES


def check_key(key, source: str):
    """A dict key or set item: only values whose hashing is linear and collision-free here
    (str and bytes hash with a per-process random key; small ints hash to themselves)."""
    if not _hash_safe(key):
        what = {int: "an int wider than 61 bits", tuple: "a tuple of several numbers or nested values"}.get(
            type(key), f"a {type(key).__name__}")
        raise FormatError(f"{source}: the pickle uses {what} as a dict key or set item; tensor data "
                          "uses strings and small integers.", "It is not an embedding, or was built to "
                          "hang a reader; nothing in it was executed.")
    return key


def check_int(value: int, source: str) -> int:
    if value.bit_length() > 8 * MAX_INT_BYTES - 1:
        raise FormatError(f"{source}: the pickle holds an integer of about {value.bit_length() * 3 // 10} "
                          "digits; tensor data has none that large.", OVER_HINT)
    return value
