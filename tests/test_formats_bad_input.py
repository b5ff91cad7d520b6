"""Bad input gets a clear error of the right type, and nothing is written or executed.

Every test snapshots the folder it works in and asserts it is unchanged after the
refusal: no output, no temp file, no half-written folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from textinv_cli import formats
from textinv_cli.errors import (AmbiguousEmbeddingError, FormatError, InvalidEmbeddingError, OutputExistsError,
                                NotFoundError, TextinvError, UnsafeFileError, UnsupportedFormatError)
from textinv_cli.formats.pickle_writer import dump_torch_pickle
from textinv_cli.formats.safetensors_io import dump_safetensors, read_header, read_tensor

from .support.fuzz_cases import check_outcome, fuzz
from .support.helpers import random_embedding
from .test_reader_bounds import pickle_shared_dag

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4ae5e3b1c9b0cbb8a2ff71c3a4c1e0e5d4a9e5e0f1b7e6a1c2d3e4f5a6b7c8d9\nsize 3819\n")


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(root: Path, exc_type, fn, *args, **kwargs) -> str:
    """Run fn, expect exc_type, check nothing under root changed; the message for more checks."""
    before = snapshot(root)
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert snapshot(root) == before, "a refused operation changed files"
    return str(info.value)


def _safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -- safetensors structure ----------------------------------------------------------------

def test_safetensors_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    good = dump_safetensors({"<t>": np.ones((1, 768), np.float32)})
    path.write_bytes(struct.pack("<Q", 10**6) + good[8:])
    msg = refused(tmp_path, FormatError, formats.read_embedding, path)
    assert "header" in msg and "truncated" in msg


def test_safetensors_overlapping_offsets(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {"<a>": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
              "<b>": {"dtype": "F32", "shape": [1, 4], "data_offsets": [8, 24]}}
    path.write_bytes(_safetensors(header, bytes(24)))
    assert "overlaps" in refused(tmp_path, FormatError, formats.read_embedding, path)


def test_safetensors_trailing_bytes(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(dump_safetensors({"<t>": np.ones((1, 768), np.float32)}) + b"\0" * 7)
    assert "trailing" in refused(tmp_path, FormatError, formats.read_embedding, path)


def test_safetensors_metadata_the_reference_refuses(tmp_path):
    """__metadata__ as a list, number or string, or given twice: the safetensors library refuses
    each, so do we (the reader validates with it: tests/test_safetensors_reference.py)."""
    entry = b'"<t>":{"dtype":"F32","shape":[1,768],"data_offsets":[0,3072]}'
    for meta in (b"[]", b"0", b"7", b'""', b'"x"', b'{"a":"b"},"__metadata__":{"c":"d"}'):
        path = tmp_path / "x.safetensors"
        head = b'{"__metadata__":' + meta + b"," + entry + b"}"
        path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(3072))
        msg = refused(tmp_path, FormatError, formats.read_embedding, path)
        assert "\n" not in msg.split("\n", 1)[0] and ("metadata" in msg or "library refuses" in msg), msg


@fuzz(60)
@given(digits=st.integers(21, 6000), where=st.sampled_from(["dim", "begin", "end", "extra", "meta"]),
       sign=st.sampled_from(["", "-"]))
def test_huge_integers_in_a_safetensors_header(tmp_path_factory, digits, where, sign):
    """A u64 has 20 digits; Python's int() refuses over 4300 (ValueError, once an "Internal error")."""
    big = (sign + "9" * digits).encode()
    dim, begin, end = (big, b"0", b"3072") if where == "dim" else (b"768", b"0", b"3072")
    begin, end = (big, end) if where == "begin" else (begin, big) if where == "end" else (begin, end)
    extra = b',"x":' + big if where == "extra" else b""
    meta = b'"__metadata__":{"a":' + big + b"}," if where == "meta" else b""
    head = (b"{" + meta + b'"<t>":{"dtype":"F32","shape":[1,' + dim + b'],"data_offsets":[' + begin + b"," + end
            + b"]" + extra + b"}}")
    path = tmp_path_factory.mktemp("bigint") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(3072))
    with pytest.raises(FormatError) as info:
        formats.read_embedding(path)
    assert len(info.value.message) < 400 and "\n" not in str(info.value).split("\n", 1)[0]


def test_read_header_and_read_tensor_validate_like_the_reader(tmp_path):
    """The large-file path (a text encoder's weights, for `inspect --nearest`) applies the same
    checks, the item cap first, and reads the reference's values (BF16 widened)."""
    path = tmp_path / "model.safetensors"
    bf16 = np.array([[0x3F80, 0x4000, 0xC040]], np.uint16)  # 1, 2, -3 as bfloat16
    head = json.dumps({"emb.weight": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [0, 6]},
                       "other": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + bf16.tobytes() + np.float32([5, 6]).tobytes())
    assert set(read_header(path)) == {"emb.weight", "other", "__header_len__"}
    assert read_tensor(path, "emb.weight").tolist() == [[1.0, 2.0, -3.0]]
    assert read_tensor(path, "other").tolist() == [5.0, 6.0]
    bad = {
        "metadata-list": (b'{"__metadata__":[],"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, "metadata"),
        "gap": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, "gap"),
        "tail": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 9, "trailing"),
        "huge-int": (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', 4, "digit"),
        "lists": (b'{"a":[' + b"[]," * 300_000 + b"[]]}", 0, "lists, objects or values"),
        "twice": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                  b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, "twice"),
    }
    for name, (head, body, words) in bad.items():
        path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(body))
        with pytest.raises(FormatError) as info:
            read_header(path)
        assert words in info.value.message, (name, info.value.message)


@fuzz(20)
@given(key_len=st.integers(16, 3000), fanout=st.integers(2, 4))
def test_pickle_dicts_sharing_one_long_key_read_in_linear_time(tmp_path_factory, key_len, fanout):
    """Dicts 24 levels deep whose keys all reference the next level's one dict: fanout**24
    dotted paths in detect's dtype report, 3 GB from 1.5 KB before its walk had a budget."""
    path = tmp_path_factory.mktemp("dag") / "dag.bin"
    path.write_bytes(pickle_shared_dag(fanout, key_len * fanout))
    outcome = check_outcome(path)  # bounded: 10 s and 64 MiB of peak memory
    assert isinstance(outcome, FormatError) and "no tensors" in outcome.message, outcome


@fuzz(40)
@given(keys=st.lists(st.text(min_size=1, max_size=3) | st.text(min_size=200, max_size=400)
                     | st.sampled_from(["\x1b]52;c;aGk=\x07", "a\nb", "\u202e<t>", "x" * 5000]),
                     min_size=2, max_size=12, unique=True))
def test_ambiguous_keys_are_quoted_short_and_escaped(tmp_path_factory, keys):
    path = tmp_path_factory.mktemp("keys") / "several.safetensors"
    path.write_bytes(dump_safetensors({k: np.ones((1, 768), np.float32) for k in keys if k != "__metadata__"}))
    try:
        formats.read_embedding(path)
    except TextinvError as e:
        text = str(e)
        assert len(e.message) < 1500 and len(e.hint or "") < 300, text
        assert not any(c in text for c in "\x1b\x07\u202e") and "\n" not in e.message and "\n" not in (e.hint or "")


# -- truncation, every format ---------------------------------------------------------------

TRUNCATABLE = [(fmt, fam) for fmt, fam in (("safetensors", "sd1"), ("bin", "sd1"), ("a1111", "sd2"),
                                           ("kohya", "sdxl"), ("kohya-pt", "sdxl"), ("a1111-png", "sd1"),
                                           ("a1111-webp", "sd1"), ("sd-concepts", "sd1"),
                                           ("diffusers-sdxl", "sdxl"))]


@pytest.mark.parametrize("fmt,family", TRUNCATABLE)
def test_every_format_truncated_at_half(tmp_path, fmt, family):
    out = tmp_path / f"emb-{fmt}"
    formats.write_embedding(random_embedding("<t>", family, n=2), out, fmt)
    victims = [out / "learned_embeds.bin"] if fmt == "sd-concepts" else \
        [out / "learned_embeds_2.safetensors"] if fmt == "diffusers-sdxl" else [out]
    for v in victims:
        data = v.read_bytes()
        v.write_bytes(data[: len(data) // 2])
    refused(tmp_path, FormatError, formats.read_embedding, out, token="<t>")


# -- wrong kinds of file ------------------------------------------------------------------------

def test_git_lfs_pointer_saved_as_learned_embeds_bin(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    path.write_bytes(LFS_POINTER)
    msg = refused(tmp_path, FormatError, formats.read_embedding, path)
    assert "Git LFS pointer" in msg and "git lfs pull" in msg
    (tmp_path / "token_identifier.txt").write_text("<cat-toy>")  # inside an sd-concepts folder too
    assert "git lfs pull" in refused(tmp_path, FormatError, formats.read_embedding, tmp_path)


@pytest.mark.parametrize("content,words", [
    (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    (b"\x00\x01\x02 random junk " * 10, "not a recognised embedding file"),
    (b"", "not a recognised embedding file"),
])
def test_unrecognised_files(tmp_path, content, words):
    path = tmp_path / "learned_embeds.safetensors"
    path.write_bytes(content)
    assert words in refused(tmp_path, FormatError, formats.read_embedding, path)


def test_raw_pickle_named_bin_is_refused_and_never_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "learned_embeds.bin"
    path.write_bytes(pickle.dumps({"<t>": Evil()}, protocol=2))
    msg = refused(tmp_path, UnsafeFileError, formats.read_embedding, path)
    assert "system" in msg and not marker.exists()
    path.write_bytes(pickle.dumps({"<t>": [1.0, 2.0]}, protocol=2))  # harmless but legacy: still refused
    assert "legacy" in refused(tmp_path, FormatError, formats.read_embedding, path)


def test_torch_zip_with_code_in_it_is_refused_and_never_run(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "charturner.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": Evil()}, path)
    msg = refused(tmp_path, UnsafeFileError, formats.read_embedding, path)
    assert "system" in msg and not marker.exists()


def test_png_with_no_embedding(tmp_path):
    path = tmp_path / "preview.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(path)
    assert "no embedding" in refused(tmp_path, FormatError, formats.read_embedding, path)


def test_a_lora_is_not_an_embedding(tmp_path):
    path = tmp_path / "lora.safetensors"
    tensors = {f"lora_unet_block_{i}.lora_down.weight": np.ones((4, 8), np.float32) for i in range(30)}
    path.write_bytes(dump_safetensors(tensors))
    msg = refused(tmp_path, AmbiguousEmbeddingError, formats.read_embedding, path)
    assert "and 22 more" in msg  # hundreds of keys are summarised, not dumped


def test_three_dimensional_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(dump_safetensors({"<t>": np.ones((1, 2, 768), np.float32)}))
    assert "[1, 2, 768]" in refused(tmp_path, FormatError, formats.read_embedding, path)


def test_lone_second_half_of_an_sdxl_pair(tmp_path):
    path = tmp_path / "mystery.safetensors"
    path.write_bytes(dump_safetensors({"<t>": np.ones((2, 1280), np.float32)}))
    assert "learned_embeds.safetensors" in refused(tmp_path, FormatError, formats.read_embedding, path)


# -- values that cannot be an embedding ----------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["safetensors", "a1111"])
def test_nan_and_inf(tmp_path, bad, fmt):
    vec = np.ones((2, 768), np.float32)
    vec[1, 5] = bad
    path = tmp_path / "bad-values"
    if fmt == "safetensors":
        path.write_bytes(dump_safetensors({"<t>": vec}))
    else:
        path.write_bytes(dump_torch_pickle({"string_to_token": {"*": 265}, "string_to_param": {"*": vec},
                                            "name": "<t>", "step": 3}))
    msg = refused(tmp_path, InvalidEmbeddingError, formats.read_embedding, path)
    assert "NaN or Inf" in msg and str(path) in msg


def test_empty_tensor(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(dump_safetensors({"<t>": np.zeros((0, 768), np.float32)}))
    assert "empty" in refused(tmp_path, InvalidEmbeddingError, formats.read_embedding, path)


def test_clip_l_and_clip_g_with_different_vector_counts(tmp_path):
    path = tmp_path / "xl.safetensors"
    path.write_bytes(dump_safetensors({"clip_l": np.ones((2, 768), np.float32),
                                       "clip_g": np.ones((3, 1280), np.float32)}))
    msg = refused(tmp_path, InvalidEmbeddingError, formats.read_embedding, path)
    assert "clip_g has 3" in msg and "clip_l has 2" in msg


def test_swapped_clip_l_and_clip_g(tmp_path):
    path = tmp_path / "xl.safetensors"
    path.write_bytes(dump_safetensors({"clip_l": np.ones((2, 1280), np.float32),
                                       "clip_g": np.ones((2, 768), np.float32)}))
    assert "swapped" in refused(tmp_path, InvalidEmbeddingError, formats.read_embedding, path)


# -- choosing among several tensors ----------------------------------------------------------

def test_ambiguous_file_names_its_keys_and_the_option(tmp_path):
    path = tmp_path / "several.safetensors"
    path.write_bytes(dump_safetensors({"<a>": np.ones((1, 768), np.float32), "<b>": np.ones((1, 768), np.float32)}))
    msg = refused(tmp_path, AmbiguousEmbeddingError, formats.read_embedding, path)
    assert "'<a>'" in msg and "'<b>'" in msg and "--key" in msg
    msg = refused(tmp_path, FormatError, formats.read_embedding, path, key="<c>")
    assert "'<c>'" in msg and "'<a>'" in msg


# -- names, sizes, overwriting --------------------------------------------------------------------

def test_token_with_path_traversal_is_refused_as_an_output_name(tmp_path):
    path = tmp_path / "evil.safetensors"  # diffusers' layout: the key is the token
    path.write_bytes(dump_safetensors({"../../etc/evil": np.ones((1, 768), np.float32)}))
    emb = formats.read_embedding(path)  # reading is fine: the token is just a string
    assert emb.token == "../../etc/evil"
    for fmt in formats.WRITERS:
        refused(tmp_path, InvalidEmbeddingError, formats.default_output_name, emb, fmt)


def test_size_cap_refuses_with_a_hint(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(dump_safetensors({"<t>": np.ones((4, 768), np.float32)}))
    msg = refused(tmp_path, FormatError, formats.read_embedding, path, max_bytes=1024)
    assert "--max-size" in msg
    assert formats.read_embedding(path, max_bytes=None).n_vectors == 4


@pytest.mark.parametrize("fmt", list(formats.WRITERS))
def test_never_overwrites_without_force(tmp_path, fmt):
    family = "sdxl" if fmt == "diffusers-sdxl" else "sd1"
    out = tmp_path / "out"
    formats.write_embedding(random_embedding("<old>", family, seed=1), out, fmt)
    new = random_embedding("<new>", family, seed=2)
    refused(tmp_path, OutputExistsError, formats.write_embedding, new, out, fmt)
    formats.write_embedding(new, out, fmt, force=True)
    back = formats.read_embedding(out, token="<new>" if fmt == "kohya-pt" else None)
    assert back.token == "<new>" and all(np.array_equal(back.vectors[k], new.vectors[k]) for k in new.vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left over from the swap


@pytest.mark.parametrize("fmt", [f for f, i in formats.WRITERS.items() if "sdxl" not in i.families])
def test_sdxl_into_a_single_width_format(tmp_path, fmt):
    msg = refused(tmp_path, UnsupportedFormatError, formats.write_embedding,
                  random_embedding(family="sdxl"), tmp_path / "out", fmt)
    assert "kohya" in msg and "diffusers-sdxl" in msg and "Stable Diffusion XL" in msg


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_width_into_the_sdxl_pair(tmp_path, family):
    msg = refused(tmp_path, UnsupportedFormatError, formats.write_embedding,
                  random_embedding(family=family), tmp_path / "out", "diffusers-sdxl")
    assert "safetensors" in msg


def test_token_named_like_the_safetensors_metadata_key(tmp_path):
    """{"__metadata__": tensor} would be written as the header's metadata slot and never read back."""
    emb = random_embedding("__metadata__")
    assert "__metadata__" in refused(tmp_path, UnsupportedFormatError, formats.write_embedding, emb,
                                     tmp_path / "o.safetensors", "safetensors")
    formats.write_embedding(emb, tmp_path / "o.safetensors", "kohya")  # emb_params: the token is metadata
    assert formats.read_embedding(tmp_path / "o.safetensors").token == "__metadata__"


def test_unknown_format_and_missing_paths(tmp_path):
    emb = random_embedding()
    assert "kohya" in refused(tmp_path, UnsupportedFormatError, formats.write_embedding, emb, tmp_path / "o", "ckpt")
    refused(tmp_path, TextinvError, formats.write_embedding, emb, tmp_path / "no" / "such" / "o", "bin")
    refused(tmp_path, NotFoundError, formats.read_embedding, tmp_path / "missing.pt")


def test_folder_without_an_embedding(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    (folder / "README.md").write_text("hello")
    (folder / "thing.pt").write_bytes(b"x")
    msg = refused(tmp_path, FormatError, formats.read_embedding, folder)
    assert "learned_embeds.bin" in msg and "thing.pt" in msg


def test_mismatched_sdxl_pair_in_a_folder(tmp_path):
    folder = tmp_path / "pair"
    folder.mkdir()
    (folder / "learned_embeds.safetensors").write_bytes(dump_safetensors({"<a>": np.ones((2, 768), np.float32)}))
    (folder / "learned_embeds_2.safetensors").write_bytes(dump_safetensors({"<b>": np.ones((2, 1280), np.float32)}))
    assert "same token" in refused(tmp_path, FormatError, formats.read_embedding, folder)



def test_file_and_folder_targets_are_not_swapped_even_with_force(tmp_path):
    emb = random_embedding()
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_bytes(b"keep me")
    refused(tmp_path, OutputExistsError, formats.write_embedding, emb, tmp_path / "a-folder", "kohya", force=True)
    refused(tmp_path, OutputExistsError, formats.write_embedding, emb, tmp_path / "a-file", "sd-concepts", force=True)
