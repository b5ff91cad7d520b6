"""The torch-free safe pickle reader: real torch files read right, hostile ones never run."""

from __future__ import annotations

import collections
import functools
import io
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import malicious_pickles as mp
from tests.support.fuzz_cases import fuzz, time_bound
from textinv_cli.errors import FormatError, TextinvError, UnsafeFileError
from textinv_cli.formats.pickle_reader import (looks_like_raw_pickle, looks_like_torch_zip,
                                               load_torch_pickle)

try:  # the hostile-file tests need no torch; the interop tests compare against it
    import torch
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
# Mutated protocol-0 strings make pickletools warn about invalid escapes: noise, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


def saved(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def assert_same(ours, theirs):
    """Our plain-Python result equals what torch itself loads (tensors compared as arrays)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray), type(ours)
        expect = theirs.detach()
        if expect.dtype == torch.bfloat16:
            expect = expect.float()
        expect = expect.numpy()
        assert ours.dtype == expect.dtype and ours.shape == expect.shape
        np.testing.assert_array_equal(ours, expect)
        assert ours.flags.c_contiguous and ours.flags.writeable
    elif isinstance(theirs, torch.nn.ParameterDict):
        assert type(ours) is dict and list(ours) == list(theirs.keys())
        for k in ours:
            assert_same(ours[k], theirs[k])
    elif isinstance(theirs, dict):  # OrderedDict included: it comes back a plain dict
        assert type(ours) is dict and list(ours) == list(theirs)
        for k in ours:
            assert_same(ours[k], theirs[k])
    elif isinstance(theirs, (list, tuple)):  # torch.Size included: it comes back a tuple
        assert type(ours) is (list if isinstance(theirs, list) else tuple) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    else:
        assert type(ours) is type(theirs) and ours == theirs


def rezip(data: bytes, change) -> bytes:
    """A copy of a torch zip with change(name, bytes) -> bytes | None applied to each member."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            new = change(info.filename, src.read(info))
            if new is not None:
                dst.writestr(info.filename, new)
    return out.getvalue()


# -- legitimate files from torch 2.13 ------------------------------------------------------

def _base():
    return torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7


CASES = {
    "float32": lambda: torch.randn(3, 768),
    "float16": lambda: torch.randn(2, 8).half(),
    "bfloat16": lambda: torch.randn(2, 8).bfloat16(),
    "float64": lambda: torch.randn(5, dtype=torch.float64),
    "ints": lambda: {"i64": torch.arange(-3, 3), "i32": torch.arange(4, dtype=torch.int32),
                     "i16": torch.tensor([-7, 7], dtype=torch.int16), "i8": torch.tensor([-1], dtype=torch.int8),
                     "u8": torch.tensor([255, 0], dtype=torch.uint8), "u16": torch.tensor([65535], dtype=torch.uint16)},
    "bool": lambda: torch.tensor([[True, False], [False, True]]),
    "scalar": lambda: torch.tensor(2.5),
    "empty": lambda: torch.zeros(0, 768),
    "parameter": lambda: torch.nn.Parameter(torch.randn(2, 4)),
    "row_slice_offset": lambda: _base()[2:],
    "column_slice": lambda: _base()[:, 1:4],
    "transposed": lambda: _base().T,
    "strided_step": lambda: _base()[::2, ::3],
    "shared_storage": lambda: (lambda b: {"whole": b, "row": b[1], "col": b[:, 5], "again": b})(_base()),
    "nested": lambda: {"a": {"b": {"c": [torch.ones(2), (1, "x", None, 2.5, True)]}}, "n": -2**40,
                       "big": 2**80, "s": "ünïcode ✓", "size": torch.Size([3, 768]),
                       "od": collections.OrderedDict([("z", 1), ("a", 2)]), "by": b"\x00\xff", "e": b""},
}


@needs_torch
@pytest.mark.parametrize("name", sorted(CASES))
def test_reads_what_torch_saves(name):
    obj = CASES[name]()
    data = saved(obj)
    assert looks_like_torch_zip(data) and not looks_like_raw_pickle(data)
    # the reference load: our own freshly made data, so torch's full unpickler is fine here
    assert_same(load_torch_pickle(data, source="t.pt"), torch.load(io.BytesIO(data), weights_only=False))


@needs_torch
def test_a1111_file_with_real_parameterdict():
    vec = torch.randn(2, 768)
    obj = {"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": vec}),
           "name": "my-emb", "step": 1500, "sd_checkpoint": "a9263745",
           "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    out = load_torch_pickle(saved(obj), source="a1111.pt")
    assert type(out["string_to_param"]) is dict and list(out["string_to_param"]) == ["*"]
    np.testing.assert_array_equal(out["string_to_param"]["*"], vec.numpy())
    assert {k: v for k, v in out.items() if k != "string_to_param"} == {
        "string_to_token": {"*": 265}, "name": "my-emb", "step": 1500, "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def test_old_style_parameterdict_state():
    """torch 1.x pickled a ParameterDict with OrderedDict _parameters and no _keys."""
    s, call, dct = mp.s, mp.call, mp.dct
    state = dct(s("training"), b"\x88",
                s("_parameters"), call("collections", "OrderedDict") + b"(" + s("*") + call(
                    "torch._utils", "_rebuild_parameter", mp.tensor(), b"\x88",
                    call("collections", "OrderedDict")) + b"u",
                s("_buffers"), call("collections", "OrderedDict"),
                s("_non_persistent_buffers_set"), call("__builtin__", "set", b"]"),
                s("_modules"), call("collections", "OrderedDict"))
    pd = mp.glob("torch.nn.modules.container", "ParameterDict") + b")\x81" + state + b"b"
    pkl = mp.PROTO2 + dct(s("string_to_param"), pd, s("name"), s("old")) + mp.STOP
    out = load_torch_pickle(mp.torch_zip(pkl, {"0": mp.F32_4}), source="old.pt")
    assert list(out) == ["string_to_param", "name"]
    np.testing.assert_array_equal(out["string_to_param"]["*"], [[1, 2], [3, 4]])


@needs_torch
def test_current_torch_writes_byteorder_and_reader_accepts_it():
    data = saved({"emb_params": torch.ones(1, 4)})
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "archive/byteorder" in names and "archive/.data/serialization_id" in names
    assert load_torch_pickle(data, source="x")["emb_params"].tolist() == [[1, 1, 1, 1]]


@needs_torch
def test_big_endian_file_is_byteswapped():
    obj = {"f": torch.tensor([1.5, -2.25]), "h": torch.tensor([0.5], dtype=torch.float16),
           "bf": torch.tensor([3.0], dtype=torch.bfloat16), "i": torch.tensor([1, -2]), "b": torch.tensor([True])}
    little = saved(obj)
    elem = {}  # storage key -> element size, from torch's own view of the file
    for k, t in zip(["0", "1", "2", "3", "4"], obj.values()):
        elem[k] = t.element_size()

    def swap(name, raw):
        if name.endswith("byteorder"):
            return b"big"
        if "/data/" in name:
            n = elem[name.rsplit("/", 1)[1]]
            return np.frombuffer(raw, dtype=f"u{n}").byteswap().tobytes()
        return raw

    big = rezip(little, swap)
    theirs = torch.load(io.BytesIO(big), weights_only=True)  # torch agrees on the meaning
    assert_same(load_torch_pickle(big, source="big.pt"), theirs)
    assert_same(load_torch_pickle(big, source="big.pt"), obj)


@needs_torch
def test_without_byteorder_record_means_little_endian():
    # files from torch < 2.1 have no byteorder record (2.13 writes one even when told not to)
    data = rezip(saved({"t": torch.arange(3.0)}), lambda n, raw: None if n.endswith("byteorder") else raw)
    assert "archive/byteorder" not in zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert load_torch_pickle(data, source="x")["t"].tolist() == [0, 1, 2]


@needs_torch
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_other_pickle_protocols(protocol):
    obj = {"t": _base()[1:, 2:], "s": {1, 2}, "size": torch.Size([2]), "nested": [(1,), {"k": b"xy"}]}
    data = saved(obj, pickle_protocol=protocol)
    assert_same(load_torch_pickle(data, source="x")["t"], obj["t"])
    out = load_torch_pickle(data, source="x")
    assert out["s"] == {1, 2} and out["size"] == (2,) and out["nested"] == [(1,), {"k": b"xy"}]


@needs_torch
def test_archive_folder_named_after_the_file(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<tok>": torch.ones(768)}, path)
    assert zipfile.ZipFile(path).namelist()[0].split("/")[0] == "learned_embeds"
    assert load_torch_pickle(path.read_bytes(), source=str(path))["<tok>"].shape == (768,)


@needs_torch
def test_bare_untyped_storage_becomes_bytes_array():
    out = load_torch_pickle(saved(torch.tensor([1.0]).untyped_storage()), source="x")
    assert out.dtype == np.uint8 and out.tobytes() == np.float32(1.0).tobytes()


@needs_torch
def test_torch_legacy_format_is_refused_clearly(tmp_path):
    data = saved({"emb_params": torch.ones(2, 4)}, _use_new_zipfile_serialization=False)
    assert looks_like_raw_pickle(data) and not looks_like_torch_zip(data)
    with pytest.raises(FormatError, match="legacy") as e:
        load_torch_pickle(data, source="old.pt")
    assert not isinstance(e.value, UnsafeFileError) and "Re-save" in str(e.value)


def test_raw_pickle_named_bin(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    path.write_bytes(mp.build("raw_pickle_benign", tmp_path / "M").data)
    with pytest.raises(FormatError, match="learned_embeds.bin is a legacy"):
        load_torch_pickle(path.read_bytes(), source=str(path))


def test_sniffers():
    assert looks_like_torch_zip(mp.valid_file())
    assert looks_like_raw_pickle(b"\x80\x02}q\x00.") and looks_like_raw_pickle(b"cos\nsystem\n(S'x'\ntR.")
    for not_pickle in (b"", b"version https://git-lfs.github.com/spec/v1\n", b"hello world",
                       b"cats are nice\nand so are dogs\n", b"\x89PNG\r\n", mp.valid_file()):
        assert not looks_like_raw_pickle(not_pickle)
    assert not looks_like_torch_zip(b"PK\x05\x06" + bytes(18))


# -- fuzzing: any input gives an object or a TextinvError, nothing else ------------------

def _load_or_textinv_error(data: bytes):
    with time_bound():
        try:
            load_torch_pickle(data, source="fuzz.pt")
        except TextinvError:
            pass


_FUZZ = fuzz(150)


@functools.cache
def _valid_file() -> bytes:
    return saved({"string_to_param": torch.nn.ParameterDict({"*": torch.randn(2, 3)}), "step": 5,
                  "t": _base()[1:, ::2], "h": torch.ones(2, dtype=torch.bfloat16)})


@_FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    _load_or_textinv_error(data)
    _load_or_textinv_error(b"PK\x03\x04" + data)
    _load_or_textinv_error(mp.torch_zip(data, {"0": mp.F32_4}))  # random bytes as data.pkl


@needs_torch
@_FUZZ
@given(st.data())
def test_fuzz_mutated_data_pkl(draw):
    """Mutate the pickle inside an otherwise valid archive, so the interpreter sees it."""
    with zipfile.ZipFile(io.BytesIO(_valid_file())) as zf:
        pkl = bytearray(zf.read("archive/data.pkl"))
        storages = {n.rsplit("/", 1)[1]: zf.read(n) for n in zf.namelist() if "/data/" in n}
    for _ in range(draw.draw(st.integers(1, 4))):
        pos = draw.draw(st.integers(0, len(pkl) - 1))
        op = draw.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw.draw(st.integers(0, 255))
        if op == "set":
            pkl[pos] = byte
        elif op == "insert":
            pkl.insert(pos, byte)
        elif len(pkl) > 1:
            del pkl[pos]
    _load_or_textinv_error(mp.torch_zip(bytes(pkl), storages))


@needs_torch
@_FUZZ
@given(st.data())
def test_fuzz_mutated_whole_file(draw):
    data = bytearray(_valid_file())
    for _ in range(draw.draw(st.integers(1, 6))):
        data[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(1, len(data)))
    _load_or_textinv_error(bytes(data))
    _load_or_textinv_error(bytes(_valid_file()[:cut]))


_OPS = [b"}", b"]", b")", b"(", b"t", b"l", b"d", b"s", b"u", b"a", b"e", b"\x85", b"\x86", b"\x87",
        b"N", b"\x88", b"\x89", b"K\x01", b"X\x01\x00\x00\x00a", b"q\x00", b"h\x00", b"\x94", b"0",
        b"1", b"2", b"R", b"\x81", b"b", b"Q", b"\x8f", b"\x90", b"\x91", b"\x93",
        mp.glob("collections", "OrderedDict"), mp.glob("torch", "FloatStorage"),
        mp.glob("torch._utils", "_rebuild_tensor_v2"), mp.glob("torch", "Size"),
        mp.glob("torch.nn.modules.container", "ParameterDict"), mp.s("storage"), mp.s("0"), mp.s("cpu")]


@_FUZZ
@given(st.lists(st.sampled_from(_OPS), max_size=60))
def test_fuzz_opcode_soup(ops):
    _load_or_textinv_error(mp.torch_zip(mp.PROTO2 + b"".join(ops) + mp.STOP, {"0": mp.F32_4}))
