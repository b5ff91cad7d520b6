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
from PIL import Image

from textinv_cli import formats
from textinv_cli.errors import (AmbiguousEmbeddingError, FormatError, InvalidEmbeddingError, OutputExistsError,
                                NotFoundError, TextinvError, UnsafeFileError, UnsupportedFormatError)
from textinv_cli.formats.pickle_writer import dump_torch_pickle
from textinv_cli.formats.safetensors_io import dump_safetensors

from .helpers import random_embedding

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
    path = tmp_path / "evil.pt"
    path.write_bytes(dump_torch_pickle({"string_to_token": {"*": 265}, "string_to_param":
                                        {"*": np.ones((1, 768), np.float32)}, "name": "../../etc/evil"}))
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
