"""Amplification in the pickle interpreter (issue #11, class 4): memory and time are O(file size).

Random programs of allowed constructors over memoized objects (OrderedDict(d), set(l),
frozenset(l), torch.Size(t), tensors over one storage, bare storages named again and again,
latin-1 bytes from one string) must be read, or refused, with peak memory and time within
a * file size + b. Keys that hash badly and integers str() cannot print are refused.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import pickle_blocks as pb
from tests.support.fuzz_cases import fuzz, peak_rss_bound, time_bound
from textinv_cli.errors import FormatError, TextinvError
from textinv_cli.formats.pickle_allowlist import tar_members
from textinv_cli.formats.pickle_reader import load_torch_pickle

# What one read may cost: well above what the budget lets the reader spend (8 units a byte
# plus 8 MiB; numpy and dict slack on top), far below what the unbudgeted reader took.
PEAK_PER_BYTE, PEAK_FIXED = 16, 32 * 2**20
SECONDS = 3.0

_SLOTS = 4  # memo slots 0..3 hold the base objects; each step's result is appended to a list
_BASES = {"dict": lambda n: pb.int_dict(n) + b"0",
          "list": lambda n: b"](" + b"".join(pb.i(k) for k in range(n)) + b"e" + pb.put(0) + b"0",
          "tuple": lambda n: b"(" + b"".join(pb.i(k) for k in range(n)) + b"t" + pb.put(0) + b"0"}
_CALLS = {"OrderedDict": ("collections", "OrderedDict", ("dict", "list")),
          "set": ("__builtin__", "set", ("list", "tuple")),
          "frozenset": ("__builtin__", "frozenset", ("list", "tuple")),
          "Size": ("torch", "Size", ("tuple",))}
_PID = pb.tup(pb.s("storage"), pb.glob("torch", "FloatStorage"), pb.s("0"), pb.s("cpu"), pb.i(1024))


def _step(kind: str, base: str, n: int) -> bytes:
    """One step of a program; leaves one new object on the stack (appended by the caller)."""
    if kind in _CALLS:
        module, name, _ = _CALLS[kind]
        return pb.glob(module, name) + b"(" + pb.get(0) + b"tR"
    if kind == "bare_storage":  # the same storage again: torch reads it once, so must we
        return pb.get(1) + b"Q"
    if kind == "expanded_tensor":  # one element seen n x n times through stride 0
        return pb.call("torch._utils", "_rebuild_tensor_v2", pb.get(1) + b"Q", pb.i(0), pb.tup(pb.i(n), pb.i(n)),
                       pb.tup(pb.i(0), pb.i(0)), b"\x89", pb.call("collections", "OrderedDict"))
    if kind == "encode":  # a fresh bytes object from one memoized string each time
        return pb.call("_codecs", "encode", pb.get(2), pb.s("latin1"))
    return pb.get(0)  # "ref": the base itself again, a reference and no copy


def program(base: str, n: int, steps: list[str], repeat: int) -> bytes:
    """A torch zip whose pickle builds `base` (n items) and then runs `steps` `repeat` times,
    appending each result to the list it returns."""
    body = b"".join(_step(k, base, n) + b"a" for k in steps) * repeat
    pkl = (pb.PROTO2 + _BASES[base](n) + _PID + pb.put(1) + b"0" + pb.s("x" * 4096) + pb.put(2) + b"0"
           + b"]" + body + pb.STOP)
    return pb.torch_zip(pkl, {"0": bytes(4096)}, compress={"archive/data.pkl"})


@st.composite
def programs(draw) -> tuple:
    base = draw(st.sampled_from(sorted(_BASES)))
    kinds = [k for k, (_, _, ok) in _CALLS.items() if base in ok] + ["bare_storage", "expanded_tensor", "encode",
                                                                      "ref"]
    return (base, draw(st.sampled_from([500, 2000, 4000])),
            draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=6)), draw(st.sampled_from([200, 1000, 2000])))


@fuzz(12)
@given(programs())
def test_memory_and_time_stay_within_the_files_budget(params):
    """(shown as its parameters: the file is program(*params))"""
    data = program(*params)
    limit = PEAK_PER_BYTE * len(data) + PEAK_FIXED
    start = time.monotonic()
    with time_bound(30), peak_rss_bound(limit):  # resident peak: numpy and dict slack included
        try:
            load_torch_pickle(data, source="amp.pt")
        except TextinvError as e:
            assert "\n" not in e.message
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS, f"{elapsed:.1f}s for a {len(data)}-byte file"


def test_a_storage_named_many_times_is_decoded_once():
    data = pb.torch_zip(pb.bare_storage_refs(5000, 1 << 16), {"0": bytes(1 << 16)}, compress={"archive/data/0"})
    out = load_torch_pickle(data, source="refs.pt")
    assert len(out) == 5000 and all(a is out[0] for a in out) and out[0].nbytes == 1 << 16


@fuzz(30)
@given(n=st.integers(50, 3000), shift=st.sampled_from([2**61 - 1, 2**64, 2**100]))
def test_int_keys_that_collide_are_refused_quickly(n, shift):
    data = pb.torch_zip(pb.PROTO2 + pb.int_dict(n, [k * shift for k in range(1, n + 1)]) + pb.STOP)
    with time_bound(5), pytest.raises(FormatError, match="61 bits"):
        load_torch_pickle(data, source="keys.pt")


def _tuple_chain(depth: int) -> bytes:
    """t0 = (), t(k+1) = (tk, tk), left in memo slot `depth`: 2^depth steps to hash, 6 bytes a level."""
    body = b")" + pb.put(0) + b"0"
    for k in range(depth):
        body += pb.get(k) + pb.get(k) + b"\x86" + pb.put(k + 1) + b"0"
    return body


@fuzz(30)
@given(depth=st.integers(2, 60), as_set=st.booleans())
def test_nested_tuple_keys_are_refused_before_hashing(depth, as_set):
    if as_set:  # frozenset((t,)) hashes t just the same
        pkl = pb.PROTO2 + _tuple_chain(depth) + b"(" + pb.get(depth) + b"\x91" + pb.STOP
    else:
        pkl = pb.PROTO2 + b"}" + _tuple_chain(depth) + pb.get(depth) + b"Ns" + pb.STOP
    with time_bound(5), pytest.raises(FormatError, match="tuple"):
        load_torch_pickle(pb.torch_zip(pkl), source="tuple.pt")


def test_key_types_a_tensor_dict_uses_are_kept():
    keys = [pb.s("*"), pb.i(265), pb.i(-(2**61) + 2), b"N", b"\x88", pb.tup(pb.s("a"), pb.i(2**40))]
    pkl = pb.PROTO2 + b"}(" + b"".join(k + pb.i(n) for n, k in enumerate(keys)) + b"u" + pb.STOP
    out = load_torch_pickle(pb.torch_zip(pkl), source="keys.pt")
    assert out == {"*": 0, 265: 1, -(2**61) + 2: 2, None: 3, True: 4, ("a", 2**40): 5}


@fuzz(30)
@given(digits=st.integers(1, 20_000))
def test_integers_are_refused_before_str_cannot_print_them(digits):
    n = 10 ** (digits - 1)
    try:
        out = load_torch_pickle(pb.torch_zip(pb.PROTO2 + pb.long4(n) + pb.STOP), source="int.pt")
    except FormatError as e:
        assert "digits" in e.message and digits > 600
    else:
        assert out == n and str(out) and digits <= 615  # str() works on all that is read


def test_a1111_step_of_5000_digits_is_a_format_error(tmp_path):
    from textinv_cli.formats import read_embedding

    path = tmp_path / "emb.pt"
    path.write_bytes(pb.a1111_with_step(pb.long4(10**5000)))
    with pytest.raises(FormatError, match="digits"):
        read_embedding(path)


@fuzz(30)
@given(members=st.integers(1, 24), claimed=st.integers(1, 1 << 20), padding=st.integers(0, 1 << 16))
def test_legacy_tar_scan_reads_only_bytes_in_the_file(members, claimed, padding):
    data = pb.sparse_tar(members, claimed) + bytes(padding)
    assert sum(len(blob) for _, blob in tar_members(data)) <= len(data)


def test_legacy_tar_regular_members_are_still_scanned():
    data = pb.legacy_tar(pb.PROTO2 + pb.call("posix", "system", pb.s("true")) + pb.STOP)
    assert [name for name, _ in tar_members(data)] == ["sys_info", "pickle", "storages", "tensors"]
