"""Our safetensors reader against the reference `safetensors` library.

The rule: where the library refuses a file, we refuse it; where it accepts one, we read the
same names, shapes, metadata and values (BF16 widened to float32), or refuse it for one of
our few documented stricter rules (STRICTER). Checked over every safetensors input in the
fuzz corpus, valid files of every dtype, and hypothesis-built headers that bend one rule at a
time (metadata as a list/number/string/null/twice, duplicate keys, extra fields, sequence-form
entries, huge or negative integers, floats and booleans as dims, gaps, overlaps, tails...),
plus byte-level mutations of valid files.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors
from hypothesis import given
from hypothesis import strategies as st

from textinv_cli.errors import FormatError
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors

from .support.fuzz_cases import CORPUS, corpus_cases, fuzz, mutated

_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "BOOL": "?", "BF16": "<u2"}
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
          "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Our refusals of files the library accepts, each a rule of ours (safetensors_io's docstring):
STRICTER = ("unsupported dtype",       # F8/C64/U16..U64: numpy cannot hold them
            "malformed shape",         # more than MAX_NDIM dims
            "malformed header entry",  # the library also takes ["F32", [2], [0, 8]]
            "twice",                   # a duplicate key: the library keeps one silently
            "no array can have",       # an empty tensor with a dim numpy refuses ([0, 2**63])
            "lists, objects or values",  # the item cap
            "digit number")            # an integer literal wider than u64 (the library refuses too)
_SCRATCH = Path(tempfile.mkdtemp(prefix="textinv-st-ref-"))


def reference(data: bytes):
    """The library's reading: ({name: (tag, shape, bytes)}, metadata), or None if it refuses."""
    try:
        items = safetensors.deserialize(data)
        path = _SCRATCH / "ref.safetensors"
        path.write_bytes(data)
        with safetensors.safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except BaseException as e:  # SafetensorError, or a Rust panic (pyo3's PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    return {name: (info["dtype"], info["shape"], info["data"]) for name, info in items}, meta


def expected_array(tag: str, shape: list, raw: bytes) -> np.ndarray:
    arr = np.frombuffer(raw, dtype=_NUMPY[tag]).reshape(shape)
    return (arr.astype(np.uint32) << 16).view(np.float32) if tag == "BF16" else arr


def check_against_reference(data: bytes) -> str:
    """Apply the rule to one input; returns what happened (for coverage assertions)."""
    ref = reference(data)
    try:
        tensors, meta = load_safetensors(data, "input")
    except FormatError as e:
        assert "\n" not in e.message and "\n" not in (e.hint or ""), e
        if ref is None:
            return "both refuse"
        assert any(rule in e.message for rule in STRICTER), f"the library accepts what we refuse: {e.message}"
        return "stricter"
    assert ref is not None, f"we accept what the library refuses: {sorted(tensors)}"
    ref_tensors, ref_meta = ref
    assert meta == ref_meta
    assert sorted(tensors) == sorted(ref_tensors)
    for name, (tag, shape, raw) in ref_tensors.items():
        want = expected_array(tag, shape, raw)
        assert tensors[name].dtype == want.dtype and list(tensors[name].shape) == list(shape), name
        assert tensors[name].tobytes() == want.tobytes(), name
    return "same"


def _safetensors_inputs() -> list[str]:
    names = [n for n in corpus_cases() if n.endswith(".safetensors")]
    names += [f"{n}/{m.name}" for n in corpus_cases() if (CORPUS / n).is_dir()
              for m in sorted((CORPUS / n).iterdir()) if m.suffix == ".safetensors"]
    return sorted(names)


@pytest.mark.parametrize("name", _safetensors_inputs())
def test_corpus_reads_as_the_library_reads_it(name):
    check_against_reference((CORPUS / name).read_bytes())


def _raw(header: dict | bytes, body: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def test_every_dtype_and_metadata_as_the_library_reads_them():
    rng = np.random.default_rng(0)
    header, body = {"__metadata__": {"textinv.token": "<t>", "k": "v"}}, b""
    for tag, size in _SIZES.items():
        raw = rng.integers(0, 256, size * 6, dtype=np.uint8).tobytes()
        header[f"t-{tag}"] = {"dtype": tag, "shape": [2, 3], "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    assert check_against_reference(_raw(header, body)) == "stricter"  # F8/C64/U16..: refused by name
    for tag in _NUMPY:
        one = {k: v for k, v in header.items() if k in ("__metadata__", f"t-{tag}")}
        begin, end = one[f"t-{tag}"]["data_offsets"]
        one[f"t-{tag}"] = dict(one[f"t-{tag}"], data_offsets=[0, end - begin])
        assert check_against_reference(_raw(one, body[begin:end])) == "same", tag
    assert check_against_reference(dump_safetensors({"<t>": rng.standard_normal((2, 768)).astype(np.float32)},
                                                    {"a": "b"})) == "same"


@pytest.mark.parametrize("meta", [b"[]", b"0", b"1", b'""', b'"x"', b"null", b'{"a":1}', b'{"a":"b"},"__metadata__":{"c":"d"}'])
def test_metadata_the_library_refuses_is_refused(meta):
    """The review's findings: a list, number or string, or given twice (null is fine in both)."""
    data = _raw(b'{"__metadata__":' + meta + b',"<t>":{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]}}',
                bytes(16))
    assert check_against_reference(data) == ("same" if meta == b"null" else "both refuse")


_T = {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}
_ODD_INTS = st.sampled_from([-1, 2**64, 2**64 - 1, 2**63, 10**30, True, False, 1.0, 1e400, None, "1"])


@st.composite
def bent_headers(draw) -> bytes:
    """A mostly valid header as JSON text, with one or two rules bent at the text level (so
    duplicates and number literals JSON objects cannot express survive)."""
    names = draw(st.lists(st.sampled_from(["<t>", "a", "b", "", "__metadata__", "a\nb", "\u202e"]),
                          min_size=0, max_size=3, unique=True))
    entries, pos = [], 0
    for name in names:
        tag = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "C64", "U32"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = _SIZES[tag] * int(np.prod(shape))
        info = {"dtype": tag, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
        text = json.dumps(info)
        bend = draw(st.sampled_from([None, None, "dim", "offset", "extra", "seq", "missing", "ndim", "bigint"]))
        if bend == "dim" and shape:
            text = json.dumps(dict(info, shape=[draw(_ODD_INTS)] + shape[1:]))
        elif bend == "offset":
            text = json.dumps(dict(info, data_offsets=[info["data_offsets"][0], draw(_ODD_INTS)]))
        elif bend == "extra":
            text = text[:-1] + ', "junk": ' + json.dumps(draw(st.sampled_from([[], {}, [[]], "x", 1]))) + "}"
        elif bend == "seq":
            text = json.dumps([tag, shape, info["data_offsets"]])
        elif bend == "missing":
            text = json.dumps({k: v for k, v in info.items() if k != draw(st.sampled_from(sorted(info)))})
        elif bend == "ndim":
            text = json.dumps(dict(info, shape=[1] * draw(st.sampled_from([32, 33, 64, 65])) + shape))
        elif bend == "bigint":
            text = text.replace('"data_offsets": [0', '"data_offsets": [' + "0" * draw(st.sampled_from([21, 5000])), 1)
        entries.append(json.dumps(name) + ": " + text)
    if entries and draw(st.booleans()):
        entries.insert(draw(st.integers(0, len(entries))), draw(st.sampled_from(entries)))  # a key twice
    if draw(st.booleans()):
        meta = draw(st.sampled_from(['{"k": "v"}', "{}", "null", "[]", "3", '"s"', '{"k": 1}', '{"k": null}',
                                     '{"k": "v", "k": "w"}']))
        entries.insert(draw(st.integers(0, len(entries))), '"__metadata__": ' + meta)
        if draw(st.integers(0, 4)) == 0:
            entries.append('"__metadata__": {}')
    head = ("{" + ", ".join(entries) + "}").encode()
    head = draw(st.sampled_from([b"", b" ", b"\n"])) + head + draw(st.sampled_from([b"", b"   ", b"\0"]))
    body_len = max(0, pos + draw(st.sampled_from([0, 0, 0, 1, -1, 8])))
    return struct.pack("<Q", len(head)) + head + bytes(range(256)) * (body_len // 256) + bytes(body_len % 256)


@fuzz(400)
@given(bent_headers())
def test_bent_headers_read_as_the_library_reads_them(data):
    check_against_reference(data)


_SEEDS = [dump_safetensors({"<t>": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}, {"k": "v"}),
          _raw({"clip_l": {"dtype": "BF16", "shape": [1, 4], "data_offsets": [0, 8]},
                "clip_g": {"dtype": "F16", "shape": [1, 4], "data_offsets": [8, 16]}}, bytes(range(16)))]


@fuzz(400)
@given(st.data())
def test_mutated_files_read_as_the_library_reads_them(data):
    seed = data.draw(st.sampled_from(_SEEDS))
    check_against_reference(data.draw(mutated(seed)))
