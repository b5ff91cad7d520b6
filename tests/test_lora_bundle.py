"""Embeddings bundled in LoRA files (formats/lora_bundle.py): the key grammar A1111 reads and
OneTrainer writes, reading only the header and one bundle, the CLI paths, hostile files.

Facts (see lora_bundle's docstring for where each comes from): a key `bundle_emb.<name>.<part>`
splits at its first two dots; `string_to_param.<k>` parts rebuild an A1111 dict; the bundle's
name is the token; OneTrainer's slot parts are clip_l / clip_g / t5 (+ `_out`), its default
name `<embedding>`.
"""

from __future__ import annotations

import json
import os
import shlex
import struct

import numpy as np
import pytest

from textinv_cli import formats
from textinv_cli.errors import AmbiguousEmbeddingError, FormatError, InvalidEmbeddingError
from textinv_cli.formats import lora_bundle
from textinv_cli.formats.safetensors_io import dump_safetensors, read_header, read_tensors

RNG = np.random.default_rng(7)
CL, CG, CH = (RNG.standard_normal((2, w)).astype(np.float32) for w in (768, 1280, 1024))


def _lora_tensors(others: int = 4) -> dict:
    """A LoRA's own tensors as kohya names them (the body textinv never needs)."""
    return {f"lora_unet_down_blocks_{i}_attn.lora_down.weight": np.full((4, 32), i, np.float16) for i in range(others)}


def write_lora(path, bundles: dict, *, others: int = 4, meta: dict | None = None):
    """bundles: {name: {part: array}} -> bundle_emb.<name>.<part> keys beside LoRA tensors."""
    tensors = _lora_tensors(others)
    for name, parts in bundles.items():
        for part, arr in parts.items():
            tensors[f"bundle_emb.{name}.{part}"] = arr
    path.write_bytes(dump_safetensors(tensors, meta))
    return path


@pytest.fixture
def three(tmp_path):
    """OneTrainer SDXL (its default placeholder), kohya emb_params, A1111 string_to_param.*."""
    return write_lora(tmp_path / "style.safetensors", {
        "<embedding>": {"clip_l": CL, "clip_g": CG},
        "cat": {"emb_params": CL[:1]},
        "dog": {"string_to_param.*": CH},
    })


# -- the layouts a bundle can hold --------------------------------------------------------------

@pytest.mark.parametrize("parts, family, slots", [
    ({"clip_l": CL}, "sd1", {"clip_l": CL}),                            # OneTrainer SD 1.x
    ({"clip_l": CL, "clip_g": CG}, "sdxl", {"clip_l": CL, "clip_g": CG}),  # OneTrainer SDXL
    ({"string_to_param.*": CH}, "sd2", {"clip_h": CH}),                 # an A1111 .pt bundled
    ({"emb_params": CL}, "sd1", {"clip_l": CL}),                        # a kohya file bundled
])
def test_one_bundle_reads_with_its_name_as_token(tmp_path, parts, family, slots):
    path = write_lora(tmp_path / "l.safetensors", {"tok": parts})
    emb = formats.read_embedding(path)
    assert emb.token == "tok" and emb.family == family
    assert set(emb.vectors) == set(slots)
    for s, arr in slots.items():
        np.testing.assert_array_equal(emb.vectors[s], arr)
    assert emb.meta["format"] == "lora-bundle" and emb.meta["token_source"] == "bundle name"
    assert "file_sha256" not in emb.meta  # hashing would read the whole LoRA


T5 = RNG.standard_normal((2, 4096)).astype(np.float32)


def test_onetrainer_sd3_and_flux_bundles(tmp_path, cli):
    """OneTrainer's SD3 saver: clip_l + clip_g + t5 (+ _out outputs); its LoRA metadata names the
    model (resources/sd_model_spec/flux_dev_1.0-lora.json: "Flux.1-dev/lora"), which decides the
    family of a bundle whose slots do not (clip_l alone: an untrained T5)."""
    sd3 = write_lora(tmp_path / "sd3.safetensors", {"<embedding>": {"clip_l": CL, "clip_g": CG, "t5": T5,
                                                                    "clip_l_out": CL}})
    emb = formats.read_embedding(sd3)
    assert emb.family == "sd3" and set(emb.vectors) == {"clip_l", "clip_g", "t5"}
    assert "clip_l_out" in emb.meta["output_embeddings"]
    flux_meta = {"modelspec.architecture": "Flux.1-dev/lora", "ss_tag_frequency": "{...}"}
    flux = write_lora(tmp_path / "flux.safetensors", {"a": {"clip_l": CL}, "b": {"t5": T5}}, meta=flux_meta)
    a = formats.read_embedding(flux, key="a")
    assert a.family == "flux" and a.meta["family_source"] == "file metadata"
    assert not any(k.startswith(("ss_", "modelspec")) for k in a.meta)  # the LoRA's metadata stays behind
    assert formats.read_embedding(flux, key="b").family == "flux"
    r = cli("inspect", flux)
    assert "a: 2 vectors, clip_l 768, flux (FLUX.1, from file metadata)" in r.output
    r = cli("inspect", sd3)
    assert "family      sd3" in r.output and "output embeddings clip_l_out not read" in r.output


def test_f16_and_bf16_bundles_read_and_say_their_dtype(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", {"x": {"clip_l": CL.astype(np.float16)}})
    emb = formats.read_embedding(path)
    assert emb.meta["dtype"] == "float16"
    np.testing.assert_allclose(emb.vectors["clip_l"], CL, atol=2e-3)


def test_several_bundles_need_a_key_and_the_hint_works_as_printed(three):
    with pytest.raises(AmbiguousEmbeddingError) as e:
        formats.read_embedding(three)
    assert "3 embeddings" in e.value.message and "'<embedding>'" in e.value.message
    word = e.value.hint.rsplit("--key ", 1)[1].rstrip(").")
    emb = formats.read_embedding(three, key=shlex.split(word)[0])
    assert emb.token == "cat"
    assert formats.read_embedding(three, key="<embedding>").family == "sdxl"
    assert formats.read_embedding(three, key="embedding").token == "<embedding>"  # no <> to quote
    assert formats.read_embedding(three, key="dog", token="<pup>").token == "<pup>"
    with pytest.raises(FormatError, match="bundles no embedding named 'nope'.*'cat'"):
        formats.read_embedding(three, key="nope")


def test_files_without_bundles_take_the_ordinary_path(tmp_path):
    plain = tmp_path / "e.safetensors"
    formats.write_embedding(formats.read_embedding(write_lora(tmp_path / "l.safetensors", {"e": {"clip_l": CL}})),
                            plain, "kohya")
    assert lora_bundle.read_bundled(plain, key=None, token=None, max_bytes=1 << 26) is None
    pt = tmp_path / "e.pt"
    formats.write_embedding(formats.read_embedding(plain), pt, "a1111")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff" * 7)
    for p in (pt, junk, tmp_path):
        assert lora_bundle.scan(p, 1 << 26) is None
    # a LoRA without bundles, small enough: the ordinary reader's message, as before
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(dump_safetensors(_lora_tensors(3)))
    assert lora_bundle.scan(bare, 1 << 26) is None
    with pytest.raises(AmbiguousEmbeddingError, match="candidate tensors"):
        formats.read_embedding(bare)
    fifo = tmp_path / "f.safetensors"  # never opened for reading by the hook (it would block)
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="regular files only"):
        formats.read_embedding(fifo)
    # "bundle_emb." only in metadata: an ordinary file
    meta_only = tmp_path / "m.safetensors"
    meta_only.write_bytes(dump_safetensors({"emb_params": CL}, {"note": '"bundle_emb.x.clip_l'}))
    assert formats.read_embedding(meta_only, token="m").meta["format"] == "kohya"


# -- only the header and the bundle are read ------------------------------------------------------

def _sparse_lora(path, body: int, bundle: np.ndarray):
    """A LoRA whose body is `body` bytes of holes (no disk used) before one bundled tensor."""
    raw = bundle.astype("<f4").tobytes()
    header = {"lora_unet_big.lora_down.weight": {"dtype": "F32", "shape": [body // 4], "data_offsets": [0, body]},
              "bundle_emb.big.clip_l": {"dtype": "F32", "shape": list(bundle.shape),
                                        "data_offsets": [body, body + len(raw)]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.seek(8 + len(head) + body)
        f.write(raw)
    return 8 + len(head)


def test_a_large_lora_is_never_read_whole(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    head = _sparse_lora(path, 300 << 20, CL)  # 300 MiB, past the 64 MiB cap
    read = []
    real_read, real_pread = os.read, os.pread
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))

    def whole_file(*a, **k):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(formats.folders, "read_capped", whole_file)
    emb = formats.read_embedding(path)
    np.testing.assert_array_equal(emb.vectors["clip_l"], CL)
    assert sum(read) <= head + CL.nbytes  # the header and the bundle: nothing of the body


def test_the_cap_applies_to_the_bundle_not_to_the_file(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", {"x": {"clip_l": CL}}, others=40)
    size = path.stat().st_size
    assert formats.read_embedding(path, max_bytes=CL.nbytes).token == "x"  # the file is larger: fine
    with pytest.raises(FormatError, match="pass --max-size 1 "):
        formats.read_embedding(path, max_bytes=CL.nbytes - 1)
    assert size > CL.nbytes


def test_a_large_safetensors_without_bundles_says_so(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(dump_safetensors(_lora_tensors(8)))
    with pytest.raises(FormatError) as e:
        formats.read_embedding(path, max_bytes=64)
    assert "no bundled embedding" in e.value.message and "8 tensors" in e.value.message
    assert "--max-size 1 " in e.value.hint  # and that escape still works:
    with pytest.raises(AmbiguousEmbeddingError, match="candidate tensors"):
        formats.read_embedding(path, max_bytes=1 << 20)


def test_read_tensors_reads_several_with_one_header(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", {"x": {"clip_l": CL, "clip_g": CG}})
    header = read_header(path)
    got = read_tensors(path, header, ["bundle_emb.x.clip_g", "bundle_emb.x.clip_l"])
    np.testing.assert_array_equal(got["bundle_emb.x.clip_g"], CG)
    np.testing.assert_array_equal(got["bundle_emb.x.clip_l"], CL)
    with pytest.raises(FormatError, match="no tensor '__header_len__'"):
        read_tensors(path, header, ["__header_len__"])


# -- hostile files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [[2000, 768], [2, 100_000], [1, 2, 768], [], [0, 768]])
def test_absurd_bundle_tensors_are_refused_before_reading(tmp_path, shape):
    path = tmp_path / "l.safetensors"
    _sparse_lora(path, 1024, np.zeros((2, 768), np.float32))
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    n = int(np.prod(shape)) * 4
    header["bundle_emb.big.clip_l"] = {"dtype": "F32", "shape": shape, "data_offsets": [1024, 1024 + n]}
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + 1024 + n)
    with pytest.raises(FormatError, match="bundled embedding"):
        formats.read_embedding(path, max_bytes=None)
    lora = lora_bundle.scan(path, None)
    assert lora_bundle.describe(lora, "big")["problem"]


def test_names_from_the_file_are_checked_and_escaped(tmp_path, cli):
    evil = "\x1b]52;c;aGk=\x07x"
    path = write_lora(tmp_path / "l.safetensors", {evil: {"clip_l": CL}, "a/b": {"clip_l": CL}})
    with pytest.raises(AmbiguousEmbeddingError) as e:
        formats.read_embedding(path)
    assert "\x1b" not in e.value.message and "\\x1b" in e.value.message
    assert "--key" in e.value.hint and "e.g." not in e.value.hint  # no name is usable as a token
    for name in (evil, "a/b"):
        with pytest.raises(InvalidEmbeddingError, match="--token"):
            formats.read_embedding(path, key=name)
    assert formats.read_embedding(path, key="a/b", token="ab").token == "ab"
    r = cli("inspect", path)
    assert r.exit_code == 0 and "\x1b" not in r.output and "\\x1b" in r.output
    assert "\x1b" not in cli("inspect", path, "--json").output


def test_a_token_like_name_is_refused(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", {"hf_" + "a" * 34: {"clip_l": CL}})
    with pytest.raises(FormatError, match="access token"):
        formats.read_embedding(path)


def test_malformed_keys_and_odd_bundles(tmp_path, cli):
    tensors = _lora_tensors(2)
    tensors["bundle_emb.nopart"] = CL                 # A1111's split fails on it: not a bundle
    tensors["bundle_emb.two.string_to_param.a"] = CL  # A1111 keeps one of them: refused
    tensors["bundle_emb.two.string_to_param.b"] = CL
    tensors["bundle_emb.ok.clip_l"] = CL
    tensors["bundle_emb..clip_l"] = CL                # an empty name
    path = tmp_path / "l.safetensors"
    path.write_bytes(dump_safetensors(tensors))
    lora = lora_bundle.scan(path, None)
    assert lora.malformed == 1 and sorted(lora.bundles) == ["", "ok", "two"]
    assert "string_to_param" in lora_bundle.describe(lora, "two")["problem"]
    with pytest.raises(FormatError, match="2 string_to_param entries"):
        formats.read_embedding(path, key="two")
    with pytest.raises(InvalidEmbeddingError):
        formats.read_embedding(path, key="")
    r = cli("inspect", path)
    assert r.exit_code == 0 and "1 bundle_emb keys naming no embedding" in r.output
    assert "--key ok" in r.output


def test_thousands_of_bundles_print_a_bounded_listing(tmp_path, cli):
    v = np.zeros((1, 8), np.float32)
    path = write_lora(tmp_path / "l.safetensors", {f"e{i:04d}": {"clip_l": v} for i in range(3000)}, others=1)
    r = cli("inspect", path)
    assert r.exit_code == 0 and len(r.output.splitlines()) < 30 and "and 2980 more" in r.output
    j = json.loads(cli("inspect", path, "--json").stdout)
    assert j["lora"]["bundled_total"] == 3000 and len(j["lora"]["bundled"]) == 500
    with pytest.raises(AmbiguousEmbeddingError) as e:
        formats.read_embedding(path)
    assert len(e.value.message) < 400 and "and 2992 more" in e.value.message


# -- the CLI -----------------------------------------------------------------------------------

def test_inspect_lists_the_bundles(cli, three):
    r = cli("inspect", three)
    assert r.exit_code == 0, r.output
    assert "LoRA" in r.output and "4 other tensors, 3 bundled embeddings" in r.output
    assert "<embedding>: 2 vectors, clip_g 1280, clip_l 768, sdxl (Stable Diffusion XL, from slots)" in r.output
    assert "dog: 2 vectors, clip_h 1024, sd2" in r.output
    assert f"textinv inspect {three} --key cat" in r.output
    j = json.loads(cli("inspect", three, "--json").stdout)
    assert j["format"] == "lora" and j["lora"]["tensors"] == 4 and j["lora"]["malformed_keys"] == 0
    by_name = {b["name"]: b for b in j["lora"]["bundled"]}
    assert by_name["<embedding>"]["slots"] == {"clip_g": 1280, "clip_l": 768}
    assert by_name["cat"] == {"name": "cat", "vectors": 1, "slots": {"clip_l": 768}, "family": "sd1",
                              "family_source": "slots", "dtype": "float32", "tensors": 1, "problem": None}


def test_inspect_one_bundle_shows_the_embedding_and_the_lora(cli, three):
    j = json.loads(cli("inspect", three, "--key", "<embedding>", "--json").stdout)
    assert j["token"] == "<embedding>" and j["family"] == "sdxl" and j["format"] == "lora-bundle"
    assert j["sha256"] == "" and j["lora"]["bundled_total"] == 3
    r = cli("inspect", three, "--key", "dog")
    assert r.exit_code == 0 and "token       dog" in r.output and "not computed" in r.output


def test_convert_and_import_take_a_key(cli, three, tmp_path):
    out = tmp_path / "out.safetensors"
    r = cli("convert", three, "--key", "<embedding>", "--to", "kohya", "-o", out)
    assert r.exit_code == 0, r.output
    back = formats.read_embedding(out)
    assert back.token == "<embedding>"
    np.testing.assert_array_equal(back.vectors["clip_g"], CG)
    r = cli("import", three, "--key", "cat")  # an ordinary word as a token: refused, with the way out
    assert r.exit_code == 1 and "--token '<cat>'" in r.stderr, r.output
    r = cli("import", three, "--key", "cat", "--token", "<cat>", "--json")
    assert r.exit_code == 0, r.output
    entry = json.loads(r.stdout)["entry"]
    assert entry["name"] == "cat" and entry["token"] == "<cat>" and entry["family"] == "sd1"
    r = cli("convert", three, "--to", "kohya")
    assert r.exit_code == 1 and "bundling 3 embeddings" in r.output and "--key cat" in r.output
