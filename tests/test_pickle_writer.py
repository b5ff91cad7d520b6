"""The torch-free torch.save writer: torch (weights_only) and our reader load what it writes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from textinv_cli.formats.pickle_reader import load_torch_pickle
from textinv_cli.formats.pickle_writer import dump_torch_pickle

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
ROOT = Path(__file__).resolve().parents[1]

RNG = np.random.default_rng(7)


def a1111_dict(vectors: np.ndarray) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "cat-toy",
            "step": 3000, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


SAMPLES = {
    "a1111": lambda: a1111_dict(RNG.standard_normal((4, 768)).astype(np.float32)),
    "diffusers_1d": lambda: {"<cat-toy>": RNG.standard_normal(768).astype(np.float32)},
    "kohya_sdxl_fp16": lambda: {"clip_l": RNG.standard_normal((2, 768)).astype(np.float16),
                                "clip_g": RNG.standard_normal((2, 1280)).astype(np.float16)},
    "dtypes": lambda: {"f64": np.array([1.5, -2.0]), "i64": np.array([-(2**40), 3]),
                       "i32": np.array([7], np.int32), "i16": np.array([-3], np.int16),
                       "i8": np.array([-1], np.int8), "u8": np.array([255], np.uint8),
                       "b": np.array([True, False]), "scalar": np.array(2.5, np.float32),
                       "empty": np.zeros((0, 768), np.float32)},
    "layouts": lambda: {"transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
                        "sliced": np.arange(20, dtype=np.float32).reshape(4, 5)[1:, ::2],
                        "big_endian": np.array([1.25, -3.5], dtype=">f4")},
    "plain_values": lambda: {"nested": {"a": [1, 2.5, None, True, False, "ü✓"], "t": (1,), "t2": (1, 2),
                                        "t3": (1, 2, 3), "t4": (1, 2, 3, 4), "e": (), "el": [], "ed": {}},
                             "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, -(2**31) - 1,
                                      2**63, -(2**100)],
                             "floats": [0.0, -0.0, 1e300, float("inf")], 5: "int key", (1, "x"): "tuple key",
                             "np_scalars": [np.float32(0.5), np.int64(3), np.bool_(True)]},
}


def assert_equal_tree(ours, expect):
    """Structure and values equal; tensors/arrays compared by dtype, shape and values."""
    if torch is not None and isinstance(ours, torch.Tensor):
        ours = ours.numpy()
    if isinstance(expect, np.ndarray):
        assert isinstance(ours, np.ndarray) and ours.shape == expect.shape
        assert ours.dtype == expect.dtype.newbyteorder("=")
        np.testing.assert_array_equal(ours, expect)
    elif isinstance(expect, np.generic):
        assert ours == expect.item() and type(ours) is type(expect.item())
    elif isinstance(expect, dict):
        assert type(ours) is dict and list(ours) == list(expect)
        for k in expect:
            assert_equal_tree(ours[k], expect[k])
    elif isinstance(expect, (list, tuple)):
        assert type(ours) is type(expect) and len(ours) == len(expect)
        for a, b in zip(ours, expect):
            assert_equal_tree(a, b)
    else:
        assert type(ours) is type(expect) and ours == expect
        if isinstance(expect, float):
            assert np.copysign(1, ours) == np.copysign(1, expect)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_roundtrip_through_our_reader(name):
    obj = SAMPLES[name]()
    assert_equal_tree(load_torch_pickle(dump_torch_pickle(obj), source="x.pt"), obj)


@needs_torch
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_torch_weights_only_load(name, tmp_path):
    obj = SAMPLES[name]()
    path = tmp_path / "emb.pt"
    path.write_bytes(dump_torch_pickle(obj))
    assert_equal_tree(torch.load(path, weights_only=True), obj)
    assert_equal_tree(torch.load(path, weights_only=True, mmap=True), obj)


@needs_torch
def test_torch_reads_storages_byte_exact_from_the_zip_directory(tmp_path):
    """Without .format_version torch never computes storage offsets from the layout; even with
    that option and its debug asserts on, every storage (odd sizes, fp16, empty) is byte-exact."""
    obj = {"a": np.ones((3, 5), np.float32), "empty": np.zeros(0, np.float16), "b": np.arange(7, dtype=np.int64),
           "c": np.array([1.5, -2.25, 3.0], np.float16), "d": RNG.standard_normal((2, 1280)).astype(np.float16)}
    path = tmp_path / "emb.pt"
    path.write_bytes(dump_torch_pickle(obj))
    code = ("import sys, torch, numpy as np; from torch.utils.serialization import config; "
            "config.load.calculate_storage_offsets = True; "
            "d = torch.load(sys.argv[1], weights_only=True, mmap=True); "
            "sys.stdout.write(repr({k: v.numpy().tobytes().hex() for k, v in d.items()}))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TORCH_SERIALIZATION_DEBUG": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert eval(r.stdout) == {k: v.tobytes().hex() for k, v in obj.items()}


@needs_torch
def test_layout_is_torch_save_less_the_records_a1111_refuses(tmp_path):
    ours = zipfile.ZipFile(io.BytesIO(dump_torch_pickle({"a": np.ones(2, np.float32),
                                                         "b": np.ones(3, np.float16)})))
    buf = io.BytesIO()
    torch.save({"a": torch.ones(2), "b": torch.ones(3, dtype=torch.float16)}, buf)
    theirs = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    dropped = {"archive/.format_version", "archive/.storage_alignment", "archive/byteorder",
               "archive/.data/serialization_id"}
    assert ours.namelist() == [n for n in theirs.namelist() if n not in dropped]
    assert ours.namelist() == ["archive/data.pkl", "archive/data/0", "archive/data/1", "archive/version"]
    for name in ("archive/version", "archive/data/0", "archive/data/1"):
        assert ours.read(name) == theirs.read(name), name
    for info in ours.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        start = info.header_offset + 30 + len(info.filename) + len(_local_extra(ours, info))
        assert start % 64 == 0, info.filename  # payloads aligned, as torch's mmap loading expects


def _local_extra(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    zf.fp.seek(info.header_offset + 28)
    n = int.from_bytes(zf.fp.read(2), "little")
    zf.fp.seek(info.header_offset + 30 + len(info.filename))
    return zf.fp.read(n)


@needs_torch
def test_a1111_layout_is_what_a1111_reads(tmp_path):
    vec = RNG.standard_normal((3, 768)).astype(np.float32)
    path = tmp_path / "cat-toy.pt"
    path.write_bytes(dump_torch_pickle(a1111_dict(vec), archive_name="cat-toy"))
    data = torch.load(path, map_location="cpu", weights_only=True)
    # what A1111's textual_inversion.py does with a .pt
    assert data["string_to_token"] == {"*": 265} and data["name"] == "cat-toy" and data["step"] == 3000
    param = data["string_to_param"]["*"]
    assert param.dtype == torch.float32 and param.shape == (3, 768)
    np.testing.assert_array_equal(param.numpy(), vec)
    assert zipfile.ZipFile(path).namelist()[0] == "cat-toy/data.pkl"


def test_deterministic():
    obj = SAMPLES["a1111"]()
    assert dump_torch_pickle(obj) == dump_torch_pickle(obj)
    other = {**obj, "step": obj["step"] + 1}
    assert dump_torch_pickle(other) != dump_torch_pickle(obj)


def test_refuses_what_it_cannot_write():
    for bad in ({"x": {1, 2}}, {"x": object()}, {"x": np.array(["a"])}, {"x": np.array([1 + 2j])},
                {"x": b"bytes"}, {"x": 2**3000}):
        with pytest.raises((TypeError, ValueError)):
            dump_torch_pickle(bad)
    for name in ("", "a/b", "..", "a\\b"):
        with pytest.raises(ValueError):
            dump_torch_pickle({}, archive_name=name)


def test_writer_does_not_import_torch():
    code = ("import sys, numpy as np; from textinv_cli.formats.pickle_writer import dump_torch_pickle; "
            "dump_torch_pickle({'a': np.ones(3, np.float32)}); assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
