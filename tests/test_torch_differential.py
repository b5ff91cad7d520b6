"""textinv's pickle reader against torch itself (issue #11, class 8): never other numbers.

For every input (the fuzz corpus, the malicious corpus, valid files torch 2.13 writes of
every layout and dtype we read, and hypothesis mutations of them), with torch's own
`torch.load(weights_only=True)` as the reference:

- torch reads it: we give exactly its keys and values (bit for bit, bf16 as float32), or
  refuse with a FormatError of a kind listed in NARROWINGS (deliberate, documented);
- torch refuses it: we refuse it too, except our documented widenings, where the values
  must still be torch's: A1111's ParameterDict (torch's reference: weights_only=True with
  ParameterDict added through torch's own `safe_globals`), and pickle protocols 3-5, which
  torch.save writes when asked but weights_only cannot parse (reference: torch.load with a
  restricted unpickler that resolves only weights_only's own allowlist plus ParameterDict;
  nothing else in these files can be imported or called).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import malicious_pickles as mp
from tests.support.fuzz_cases import CORPUS, corpus_cases, fuzz, mutated, time_bound
from textinv_cli.errors import FormatError
from textinv_cli.formats.pickle_reader import load_torch_pickle

torch = pytest.importorskip("torch")
from torch._weights_only_unpickler import _get_allowed_globals  # noqa: E402

# Where we refuse what torch reads, on purpose. Each refusal must match one of these.
NARROWINGS = {
    r"unexpected archive member|one top-level folder|folder entry|twice": "only the members torch.save writes",
    r"encrypted or compressed|zip bomb|declares \d+ bytes": "no compression tricks",
    r"archives joined together": "bytes before the archive: zipfile and torch's miniz would read different data",
    r"is truncated or corrupt": "zipfile checks CRCs, torch does not: a damaged member is refused",
    r"opcode, which torch\.save never writes|protocol": "only the opcodes torch.save writes",
    r"dict key or set item": "hash-safe keys only (issue #11 class 4)",
    r"integer of about": "no int wider than LONG1",
    r"too large to be tensor data": "the read's memory/time budget (class 4)",
    r"nests .*too deeply": "bounded nesting",
    r"referenced as": "one storage typed two ways (torch silently uses the first)",
    r"big-endian storage": "a big-endian storage viewed as another type",
    r"is not tensor data|which is not tensor data|not a tensor storage": "a smaller allowlist than torch's",
    r"legacy|Git LFS|not a torch file": "only zip archives (torch >= 1.6)",
    r"malformed|offset, shape or stride|a tensor needs": "tensor metadata checked more strictly",
    r"gets something other|wraps something|adds items to|sets the state|odd number|the stack|memo slot":
        "stricter use of the allowed constructors",
}
# Refused by us, and so costly for torch (GBs, minutes) that the test does not ask it.
AMPLIFICATION = {"ordereddict_copies", "set_copies", "frozenset_copies", "torch_size_copies",
                 "self_similar_tuple_key", "colliding_int_keys"}


@pytest.fixture(autouse=True)
def _torch_safe_mode(monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)


class _Restricted(pickle.Unpickler):
    """The full pickle machine with weights_only's allowlist (plus ParameterDict) as find_class."""
    _PY2 = {"__builtin__": "builtins", "copy_reg": "copyreg"}

    def find_class(self, module, name):
        allowed = {**_get_allowed_globals(), "torch.nn.modules.container.ParameterDict": torch.nn.ParameterDict}
        full = f"{self._PY2.get(module, module)}.{name}"
        if full not in allowed:
            raise pickle.UnpicklingError(f"{full} is not allowed")
        return allowed[full]


_RESTRICTED = types.SimpleNamespace(Unpickler=_Restricted, __name__="restricted_pickle")


def torch_load(data: bytes, how: str = "weights_only"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if how == "weights_only":
                return True, torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            if how == "parameterdict":
                with torch.serialization.safe_globals([torch.nn.ParameterDict]):
                    return True, torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            return True, torch.load(io.BytesIO(data), weights_only=False, map_location="cpu",
                                    pickle_module=_RESTRICTED)
        except Exception as e:  # torch's refusals come as many exception types
            return False, e


def ours_load(data: bytes):
    with time_bound(10):
        try:
            return True, load_torch_pickle(data, source="x.pt")
        except FormatError as e:
            return False, e


def _tensor_bits(t) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def _storage_tensor(s):
    if isinstance(s, torch.storage.TypedStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.empty(0, dtype=s.dtype).set_(s._untyped_storage, 0, (s.size(),), (1,))
    return torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,))


def assert_same(ours, theirs, where="top", seen=None):
    """Same structure, keys and values; arrays bit for bit (bf16 widened to float32). Shared
    parts are compared once (a billion-laughs list names 2^40 of them)."""
    seen = set() if seen is None else seen
    if (id(ours), id(theirs)) in seen:
        return
    seen.add((id(ours), id(theirs)))
    if isinstance(theirs, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        theirs = _storage_tensor(theirs)
    if isinstance(theirs, torch.Tensor):
        ref = _tensor_bits(theirs)
        assert isinstance(ours, np.ndarray) and ours.shape == ref.shape, (where, type(ours))
        if ref.dtype == np.bool_:
            assert ours.dtype == np.bool_ and np.array_equal(ours, ref), where
        else:
            assert ours.dtype == ref.dtype and ours.tobytes() == ref.tobytes(), (where, ours, ref)
    elif isinstance(theirs, (torch.nn.ParameterDict, dict)):
        keys = list(theirs.keys())
        assert type(ours) is dict and list(ours) == keys, (where, list(ours) if isinstance(ours, dict) else ours)
        for k in keys:
            assert_same(ours[k], theirs[k], f"{where}.{k}", seen)
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is (list if isinstance(theirs, list) else tuple) and len(ours) == len(theirs), where
        for n, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{n}]", seen)
    elif isinstance(theirs, (set, frozenset)):
        assert type(ours) is type(theirs) and ours == theirs, where
    elif isinstance(theirs, float) and theirs != theirs:
        assert isinstance(ours, float) and ours != ours, where
    else:
        assert type(ours) is type(theirs) and ours == theirs, (where, ours, theirs)


def check(data: bytes, name: str = "input", *, benign: bool = False) -> str:
    """The differential rule for one input; returns which case applied (for coverage checks)."""
    ok, ours = ours_load(data)
    t_ok, theirs = torch_load(data)
    if t_ok:
        if ok:
            assert_same(ours, theirs, name)
            return "same"
        assert any(re.search(p, ours.message) for p in NARROWINGS), f"{name}: undocumented refusal: {ours.message}"
        return "narrowed"
    if not ok:
        return "both refuse"
    # torch refuses, we read: only a documented widening, and then torch's own values
    for how in ("parameterdict", "restricted"):
        w_ok, wide = torch_load(data, how)
        if w_ok:
            assert_same(ours, wide, name)
            return f"widened ({how})"
    raise AssertionError(f"{name}: torch refuses it ({type(theirs).__name__}: {str(theirs)[:200]}), we read it")


# -- the inputs -------------------------------------------------------------------------------

def _saved(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _base():
    return torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7


def valid_files() -> dict[str, bytes]:
    """Files torch writes of every layout and dtype our reader reads."""
    objs = {
        **{f"dtype-{d}": torch.linspace(-3, 3, 12).reshape(3, 4).to(getattr(torch, d))
           for d in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
                     "bool", "complex64", "uint16")},
        "diffusers": {"<cat-toy>": torch.randn(768)},
        "a1111": {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)}, "name": "cat",
                  "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"},
        "a1111-parameterdict": {"string_to_token": {"*": 265},
                                "string_to_param": torch.nn.ParameterDict({"*": torch.randn(2, 768)}),
                                "name": "cat", "step": 7, "sd_checkpoint": None, "sd_checkpoint_name": None},
        "kohya": {"emb_params": torch.randn(3, 768).half()},
        "kohya-sdxl": {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280).bfloat16()},
        "views": (lambda b: {"whole": b, "row": b[1], "col": b[:, 5], "t": b.T, "step": b[::2, ::3]})(_base()),
        "parameter": torch.nn.Parameter(torch.randn(2, 4)),
        "scalar-and-empty": {"s": torch.tensor(2.5), "e": torch.zeros(0, 768)},
        "nested": {"a": [torch.ones(2), (1, "x", None, 2.5, True)], "big": 2**80, "size": torch.Size([3, 768]),
                   "od": collections.OrderedDict([("z", 1), ("a", 2)]), "by": b"\x00\xff", "set": {1, 2}},
    }
    files = {name: _saved(obj) for name, obj in objs.items()}
    for protocol in (3, 4, 5):
        files[f"protocol-{protocol}"] = _saved(objs["nested"] | {"t": _base()[1:, 2:]}, pickle_protocol=protocol)
    return files


@pytest.fixture(scope="module")
def valid():
    return valid_files()


def test_valid_files_read_exactly_as_torch_reads_them(valid):
    outcomes = {name: check(data, name, benign=True) for name, data in valid.items()}
    assert {n for n, o in outcomes.items() if o != "same"} == {
        "a1111-parameterdict", "protocol-3", "protocol-4", "protocol-5"}, outcomes
    assert outcomes["a1111-parameterdict"] == "widened (parameterdict)"


def test_malicious_corpus(tmp_path):
    outcomes = {}
    for name in sorted(set(mp.BUILDERS) - AMPLIFICATION):
        outcomes[name] = check(mp.build(name, tmp_path / "MARKER").data, name)
    assert not (tmp_path / "MARKER").exists()
    assert outcomes["zip_two_archives_joined"] == "narrowed"  # torch reads the first, zipfile the second


def test_fuzz_corpus():
    for name in sorted(corpus_cases()):
        path = CORPUS / name
        if path.is_file():
            check(path.read_bytes(), name)


@fuzz(150)
@given(st.data())
def test_mutated_valid_files(valid, data):
    name = data.draw(st.sampled_from(sorted(valid)), label="seed")
    check(data.draw(mutated(valid[name]), label="bytes"), name)


def test_two_archives_joined_are_refused_not_read_as_the_second():
    first, second = _saved({"emb_params": torch.ones(1, 4)}), _saved({"emb_params": torch.zeros(1, 4)})
    ok, theirs = torch_load(first + second)
    assert ok and theirs["emb_params"].tolist() == [[1, 1, 1, 1]]  # torch: the first archive's numbers
    ok, ours = ours_load(first + second)
    assert not ok and "joined" in ours.message


def test_storage_typed_two_ways_is_refused():
    pkl = mp.PROTO2 + mp.dct(mp.s("f"), mp.tensor(numel=2, size=(2,), stride=(1,)),
                             mp.s("d"), mp.tensor(numel=1, size=(1,), stride=(1,), storage="DoubleStorage")) + mp.STOP
    data = mp.torch_zip(pkl, {"0": np.array([1.5, 2.5], "<f4").tobytes()})
    ok, theirs = torch_load(data)
    assert ok and theirs["d"].dtype == torch.float32  # torch reuses the Float reading for the Double one
    assert check(data) == "narrowed"
