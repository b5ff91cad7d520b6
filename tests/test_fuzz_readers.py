"""Fuzzing every format reader through the public entry point, formats.read_embedding.

Any input, file or folder, has exactly two allowed outcomes: a valid Embedding, or a
TextinvError of one or two clear lines (tests/support/fuzz_cases.check_outcome). Another
exception, a hang (each input is bounded by an alarm) or a memory blow-up (small files
claiming huge sizes must be refused before allocating) is a bug.

CI runs a fixed, derandomized budget (a few seconds per test). To hunt for bugs with far
more, and fresh random, cases:

    TEXTINV_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz_readers.py -x

Keep whatever it finds with fuzz_cases.save_to_corpus(): tests/fuzz_corpus/README.md.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from textinv_cli.embedding import Embedding
from textinv_cli.errors import TextinvError
from textinv_cli.formats import a1111_image, a1111_image_writer
from textinv_cli.formats.pickle_writer import dump_torch_pickle
from textinv_cli.formats.safetensors_io import dump_safetensors

from .support.fuzz_cases import (CORPUS, FOLDER_FORMATS, GIANTS, PEAK_BYTES, check_outcome, chunk, corpus_cases, fuzz,
                         mutated, png, put, seed_files)

ROOT = Path(__file__).resolve().parents[1]
# Mutated protocol-0 strings make pickletools warn about invalid escapes: noise, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_files(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-case")


def _single(seeds):
    return sorted(n for n, (_, c) in seeds.items() if not isinstance(c, dict))


def _folders(seeds):
    return sorted(n for n, (_, c) in seeds.items() if isinstance(c, dict))


def test_seeds_cover_every_format_and_family_and_read_back(seeds, work):
    """The fuzzers start from valid files: each must read, or mutations prove little."""
    from textinv_cli import formats

    want = {f"{fmt}-{fam}-{size}" for fmt, info in formats.WRITERS.items() for fam in info.families
            for size in ("real", "tiny")}
    assert set(seeds) == want
    assert set(_folders(seeds)) == {n for n in want if n.startswith(FOLDER_FORMATS)}
    for name, (suffix, content) in seeds.items():
        emb = check_outcome(put(work / f"seed{suffix}", content))
        assert isinstance(emb, Embedding) and emb.family == name.split("-")[-2], (name, emb)


# -- random bytes and mutated valid files ------------------------------------------------------

_MAGICS = [b"", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x01\x00\x00WEBPVP8L", b"\x80\x02",
           b"\x10\x00\x00\x00\x00\x00\x00\x00{", b"version https://git-lfs.github.com/spec/v1\n"]


@fuzz(800)
@given(prefix=st.sampled_from(_MAGICS), body=st.binary(max_size=1024),
       suffix=st.sampled_from([".safetensors", ".bin", ".pt", ".png", ".webp", ""]))
def test_random_bytes(work, prefix, body, suffix):
    check_outcome(put(work / f"random{suffix}", prefix + body))


@fuzz(3000)
@given(st.data())
def test_mutated_files(seeds, work, data):
    name = data.draw(st.sampled_from(_single(seeds)), label="seed")
    suffix, blob = seeds[name]
    check_outcome(put(work / f"mutated{suffix}", data.draw(mutated(blob), label="bytes")))


@fuzz(800)
@given(st.data())
def test_mutated_folders(seeds, work, data):
    """sd-concepts and diffusers-sdxl folders: one member mutated, dropped, swapped or retyped."""
    name = data.draw(st.sampled_from(_folders(seeds)), label="seed")
    files = dict(seeds[name][1])
    member = data.draw(st.sampled_from(sorted(files)), label="member")
    action = data.draw(st.sampled_from(["mutate", "mutate", "drop", "swap", "text"]), label="action")
    if action == "mutate":
        files[member] = data.draw(mutated(files[member]))
    elif action == "drop":
        del files[member]
    elif action == "swap":  # another seed's bytes under this name (an SD2 half in an SDXL pair...)
        other = data.draw(st.sampled_from(_single(seeds)))
        files[member] = seeds[other][1]
    else:
        files[member] = data.draw(st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40),
                                            st.just(b"x" * 5000), st.just(b"\xef\xbb\xbf<t>\n")))
    check_outcome(put(work / "folder", files))


def _cut_points(n: int, dense: bool) -> list[int]:
    """Dense (tiny seeds): every point in the first and last 256 bytes (headers, zip
    directories) and every 61st between. Else 40 points spread through the file."""
    if not dense:
        return sorted(set(range(0, n, max(1, n // 40))))
    return sorted(set(range(min(n, 256))) | set(range(max(0, n - 256), n)) | set(range(0, n, 61)))


_JUNK = [b"\0", b"\0" * 4096, bytes(range(256)), b"PK\x05\x06" + bytes(18), b"IEND\xaeB`\x82"]


def test_truncated_and_extended_everywhere(seeds, work):
    """Each single-file seed cut at every kind of point and extended with junk (deterministic).

    A damaged file is refused, or reads as exactly the original embedding (a PNG cut inside
    its last pixel chunk still holds the whole, CRC-checked text chunk): never as other vectors.
    """
    count = 0
    for name in _single(seeds):
        suffix, blob = seeds[name]
        path = work / f"cut{suffix}"
        original = check_outcome(put(path, blob))
        damaged = [blob[:n] for n in _cut_points(len(blob), dense=name.endswith("tiny"))]
        for i, data in enumerate(damaged + [blob + junk for junk in _JUNK + [blob]]):
            outcome = check_outcome(put(path, data))
            if isinstance(outcome, Embedding):
                assert outcome.vectors.keys() == original.vectors.keys() and all(
                    np.array_equal(outcome.vectors[k], v) for k, v in original.vectors.items()), (name, i)
                assert len(data) > len(blob) or suffix == ".png", (name, len(data))  # only PNG cuts read
            count += 1
    assert count > 5000  # the sweep is as big as it claims


# -- structured inputs: layouts and headers that byte flips rarely reach -----------------------

_KEYS = st.sampled_from(["string_to_param", "*", "clip_l", "clip_g", "clip_h", "emb_params", "name", "<t>",
                         "step", "_parameters", "string_to_token", "__metadata__", ""]) | st.text(max_size=4)


@st.composite
def _arrays(draw):
    ndim = draw(st.integers(0, 3))
    dims = [draw(st.sampled_from([0, 1, 2, 32, 48, 64, 768])) for _ in range(ndim)]
    dtype = draw(st.sampled_from(["f4", "f2", "f8", "i8", "u1", "bool"]))
    fill = draw(st.sampled_from([0.0, 1e-3, np.nan, np.inf, 1e30]))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf into ints: whatever numpy makes
        return np.full(dims, fill).astype(dtype) if np.prod(dims) < 40_000 else np.zeros((1, 768), dtype)


_LEAVES = _arrays() | st.none() | st.integers(-5, 2**40) | st.text(max_size=6) | st.floats()
_TREES = st.recursive(_LEAVES, lambda c: st.dictionaries(_KEYS, c, max_size=3) | st.lists(c, max_size=3),
                      max_leaves=8)


def _png_with_json(doc: dict) -> bytes:
    text = base64.b64encode(a1111_image_writer._to_json(doc).encode())
    return png(4, 4, chunk(b"tEXt", a1111_image.TEXT_KEY.encode() + b"\0" + text))


@fuzz(800)
@given(top=st.dictionaries(_KEYS, _TREES, max_size=4), container=st.sampled_from(["pickle", "png", "safetensors"]),
       meta=st.dictionaries(st.sampled_from(["textinv.token", "modelspec.architecture", "step"]),
                            st.text(max_size=8), max_size=2),
       options=st.fixed_dictionaries({}, optional={"key": _KEYS, "token": st.text(max_size=6)}))
def test_random_layouts(work, top, container, meta, options):
    """Trees of dicts, lists, scalars and arrays of any shape, dtype and value, in every container,
    read with and without --key / --token."""
    if container == "pickle":
        blob = dump_torch_pickle(top)
    elif container == "png":
        blob = _png_with_json(top)
    else:
        # "__metadata__" is the format's own key: our writer refuses it as a tensor name
        blob = dump_safetensors({k: v for k, v in top.items() if isinstance(v, np.ndarray) and k != "__metadata__"},
                                meta)
    check_outcome(put(work / f"layout.{container}", blob), **options)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=6),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=6)
_DIMS = st.integers(0, 6) | st.sampled_from([32, 768, 2**31, 2**63, -1, True, 1.0, None])


@fuzz(800)
@given(st.data())
def test_safetensors_headers(work, data):
    """Headers that are mostly consistent, with one field at a time made odd."""
    header, pos = {}, 0
    for name in data.draw(st.lists(_KEYS, max_size=3, unique=True), label="names"):
        tag = data.draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "C64", "F8_E4M3"]))
        shape = data.draw(st.lists(st.integers(0, 6), max_size=3))
        size = {"F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1}.get(tag, 4) * int(np.prod(shape))
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
        odd = data.draw(st.sampled_from([None, None, "dtype", "shape", "data_offsets", "entry"]))
        if odd == "entry":
            header[name] = data.draw(_JSON)
        elif odd == "shape":
            header[name]["shape"] = data.draw(st.lists(_DIMS, max_size=4) | _JSON)
        elif odd:
            header[name][odd] = data.draw(_JSON)
    if data.draw(st.booleans()):
        header["__metadata__"] = data.draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | _JSON)
    raw = json.dumps(header).encode()
    body = data.draw(st.sampled_from([bytes(pos), b"\xff" * pos, bytes(range(256)) * (pos // 256 + 1)]))
    check_outcome(put(work / "header.safetensors", len(raw).to_bytes(8, "little") + raw + body[:pos]))


# -- giant claims: refused before allocating ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(GIANTS))
def test_giant_claims_are_refused_before_allocating(work, name):
    suffix, build, words = GIANTS[name]
    path = put(work / f"giant{suffix}", build())
    tracemalloc.start()  # Python and numpy allocations; the subprocess test below sees the rest
    try:
        start = time.monotonic()
        outcome = check_outcome(path)  # itself bounded in time
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, TextinvError) and words in outcome.message, outcome
    assert peak < PEAK_BYTES, f"{name}: {peak / 2**20:.0f} MiB allocated for a {path.stat().st_size}-byte file"
    assert elapsed < 5


_RSS_SCRIPT = r"""
import json, sys
from pathlib import Path
from tests.support.fuzz_cases import CORPUS, GIANTS, check_outcome, corpus_cases, put

work, over = Path(sys.argv[1]), {}
check_outcome(put(work / "warm.png", GIANTS["png-claims-100000x100000"][1]()))  # imports PIL and the rest
inputs = [(n, lambda b=b, s=s: put(work / ("giant" + s), b())) for n, (s, b, _) in GIANTS.items()]
inputs += [(n, lambda n=n: CORPUS / n) for n in corpus_cases()]
for name, make in inputs:
    path = make()
    try:
        check_outcome(path)  # bounds the rise of peak RSS
    except AssertionError as e:
        over[name] = str(e)
print(json.dumps({"checked": len(inputs), "over": over}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_giant_claims_and_corpus_stay_small_in_resident_memory(tmp_path):
    """Pillow and zlib allocate outside tracemalloc's view: measure each input's peak resident
    size instead, in a fresh process (an old one's freed pages would hide new allocations)."""
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"checked": len(GIANTS) + len(corpus_cases()), "over": {}}


# -- the corpus: every input that ever broke a reader ------------------------------------------

def test_corpus_files_and_manifest_agree():
    cases = corpus_cases()
    on_disk = {p.name for p in CORPUS.iterdir() if p.name not in ("cases.json", "README.md")}
    assert on_disk == set(cases), "add corpus files with fuzz_cases.save_to_corpus (README.md)"
    for name, case in cases.items():
        fmt, sep, what = name.partition("--")
        assert sep and fmt and what, name
        assert case["expect"] == "ok" or hasattr(__import__("textinv_cli.errors").errors, case["expect"]), case


@pytest.mark.parametrize("name", sorted(corpus_cases()))
def test_corpus_replays(name):
    """Each saved input still gives the outcome it was fixed to: the two outcomes, checked
    exactly (an Embedding where one is expected, else the right error saying the right thing)."""
    case = corpus_cases()[name]
    outcome = check_outcome(CORPUS / name)
    if case["expect"] == "ok":
        assert isinstance(outcome, Embedding), outcome
    else:
        assert type(outcome).__name__ == case["expect"], outcome
        assert case["mentions"] in outcome.message, (case["mentions"], outcome.message)
