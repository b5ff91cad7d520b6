"""A1111 image embeddings: the sd-ti-embedding text chunk and the pixel side band, PNG and WebP."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from tests.support.fuzz_cases import fuzz, time_bound
from textinv_cli.errors import FormatError, TextinvError, UnsupportedFormatError
from textinv_cli.formats import a1111_image as ai
from textinv_cli.formats import a1111_image_writer as writer
from textinv_cli.formats.a1111_image import image_kind, load_image_embedding
from textinv_cli.formats.a1111_image_writer import dump_png_embedding, dump_webp_embedding


def a1111_data(shape=(3, 768), seed=0, name="cat-toy"):
    """The dict A1111's Embedding.save writes (and embeds in images)."""
    vec = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": 500,
            "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "v1-5-pruned"}


def png_chunks(png: bytes):
    pos, out = 8, []
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        out.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def build_png(chunks) -> bytes:
    return ai.PNG_MAGIC + b"".join(chunk(k, b) for k, b in chunks)


def strip_text(png: bytes) -> bytes:
    return build_png([(k, b) for k, b in png_chunks(png) if k not in (b"tEXt", b"zTXt", b"iTXt")])


def png_with_text(value, size=(32, 32)) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", value)
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def encode(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k == "string_to_param":
            assert list(got[k]) == list(v)
            for t in v:
                assert got[k][t].dtype == np.float32
                assert np.array_equal(got[k][t], v[t])  # bit-exact, not just close
        elif isinstance(v, np.ndarray):
            assert np.array_equal(got[k], v)
        else:
            assert got[k] == v


# -- hand-built side band: our own reading of A1111's layout, kept separate from the module ----


def slow_lcg_nibbles(n):
    x, out = 0, []
    for _ in range(n):
        x = (1664525 * x + 1013904223) % 2**32
        out.append((x % 255) & 0x0F)
    return out


def hand_band_image(compressed: bytes, preview: np.ndarray) -> Image.Image:
    """low nibbles | black column | preview | black column | high nibbles, LCG-XORed, no dots."""
    h = preview.shape[0]
    n = len(compressed) + (h - len(compressed) % h)
    n += 3 * h - n % (3 * h)
    cyc = [compressed[i % len(compressed)] for i in range(n)]
    key = slow_lcg_nibbles(n)
    low = np.array([(b & 15) ^ k for b, k in zip(cyc, key)], np.uint8).reshape(h, -1, 3)
    high = np.array([(b >> 4) ^ k for b, k in zip(cyc, key)], np.uint8).reshape(h, -1, 3)
    w = low.shape[1]
    canvas = np.zeros((h, 2 * w + preview.shape[1] + 2, 3), np.uint8)
    canvas[:, :w], canvas[:, w + 1:w + 1 + preview.shape[1]], canvas[:, w + 2 + preview.shape[1]:] = \
        low, preview, high
    return Image.fromarray(canvas, "RGB")


NOISE = (np.random.default_rng(7).integers(16, 256, (24, 24, 3))).astype(np.uint8)


@lru_cache(maxsize=None)
def small_png() -> bytes:
    data = {"string_to_param": {"*": np.array([[0.5, -0.25, 1.0, 0.125]], np.float32)}, "name": "t"}
    return dump_png_embedding(data, caption="t", preview=np.full((16, 16, 3), 100, np.uint8))


# -- facts of the format -------------------------------------------------------------------


def test_image_kind():
    assert image_kind(small_png()) == "png"
    assert image_kind(encode(Image.new("RGB", (4, 4)), "WEBP")) == "webp"
    assert image_kind(b"RIFF\0\0\0\0WAVE") is None
    assert image_kind(b"PK\x03\x04") is None
    assert image_kind(b"") is None


def test_lcg_matches_a1111_reference_values():
    # The reference numbers A1111's image_embedding.py asserts for its generator (x % 255).
    reference = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14]
    assert ai.lcg_key(len(reference)).tolist() == [r & 0x0F for r in reference]
    assert ai.lcg_key(100_100).tolist() == slow_lcg_nibbles(100_100)
    x, total = 0, 0
    for i in range(100_100):  # A1111 also checks the sum of the 100,000 values after the first 100
        x = (1664525 * x + 1013904223) % 2**32
        total += (x % 255) if i >= 100 else 0
    assert total == 12731374


def test_text_chunk_is_exactly_the_json_a1111_writes():
    data = {"string_to_token": {"*": 265},
            "string_to_param": {"*": np.array([[0.5, -0.25, 1.0, 0.125]], np.float32)},
            "name": "cat", "step": 10, "sd_checkpoint": None, "sd_checkpoint_name": None}
    png = dump_png_embedding(data, caption="<cat>", preview=NOISE)
    texts = [b for k, b in png_chunks(png) if k == b"tEXt"]
    assert len(texts) == 1
    key, value = texts[0].split(b"\0", 1)
    assert key == b"sd-ti-embedding"
    assert base64.b64decode(value, validate=True).decode() == (
        '{"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": '
        '[[0.5, -0.25, 1.0, 0.125]]}}, "name": "cat", "step": 10, "sd_checkpoint": null, '
        '"sd_checkpoint_name": null}')


def test_side_band_layout_matches_hand_computation():
    data = a1111_data((2, 768))
    preview = np.random.default_rng(3).integers(1, 256, (64, 80, 3)).astype(np.uint8)
    img = Image.open(io.BytesIO(dump_png_embedding(data, caption="x", preview=preview)))
    pixels = np.asarray(img.convert("RGB"))
    compressed = zlib.compress(writer._to_json(data).encode(), 9)
    n = len(compressed) + (64 - len(compressed) % 64)
    n += 192 - n % 192
    band = n // 192  # columns per nibble block
    assert img.size == (80 + 2 * band + 2, 64)
    assert not pixels[:, band].any() and not pixels[:, band + 81].any()  # the black separators
    assert np.array_equal(pixels[:, band + 1:band + 81], preview)
    key = np.array(slow_lcg_nibbles(n), np.uint8).reshape(64, band, 3)
    low, high = pixels[:, :band] & 15 ^ key, pixels[:, band + 82:] & 15 ^ key
    joined = ((high << 4) | low).astype(np.uint8).tobytes()
    assert joined[:len(compressed)] == compressed
    assert joined == (compressed * (n // len(compressed) + 1))[:n]  # cyclic fill, like numpy.resize


def test_hand_built_side_band_decodes():
    payload = b'{"string_to_param": {"*": {"TORCHTENSOR": [[1.5, -2.0, 0.25]]}}, "name": "hand"}'
    png = encode(hand_band_image(zlib.compress(payload, 9), NOISE))
    got = load_image_embedding(png, source="hand.png")
    assert got["name"] == "hand"
    assert got["string_to_param"]["*"].tolist() == [[1.5, -2.0, 0.25]]
    # the same pixels with black borders around them: A1111 crops them before reading
    padded = np.pad(np.asarray(Image.open(io.BytesIO(png))), ((3, 5), (7, 2), (0, 0)))
    assert load_image_embedding(encode(Image.fromarray(padded)), source="p")["name"] == "hand"


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 768), (2, 1024)], ids=["sd1-3x768", "sd2-2x1024"])
def test_png_round_trip_text_chunk_and_side_band(shape):
    data = a1111_data(shape, seed=shape[0])
    png = dump_png_embedding(data, caption="<cat-toy>")
    assert_same(load_image_embedding(png, source="a.png"), data)
    band_only = strip_text(png)
    assert b"tEXt" not in band_only
    assert_same(load_image_embedding(band_only, source="b.png"), data)


def test_text_chunk_is_read_first():
    png = dump_png_embedding(a1111_data(name="from-pixels"), caption="x", preview=NOISE)
    other = base64.b64encode(json.dumps({"name": "from-text"}).encode())
    chunks = [(k, b) for k, b in png_chunks(png) if k != b"tEXt"]
    chunks.insert(1, (b"tEXt", b"sd-ti-embedding\0" + other))
    assert load_image_embedding(build_png(chunks), source="x")["name"] == "from-text"


def test_webp_round_trip_side_band_only():
    data = a1111_data((3, 768), seed=5)
    webp = dump_webp_embedding(data, caption="<cat-toy>")
    assert image_kind(webp) == "webp"
    assert b"sd-ti-embedding" not in webp
    assert_same(load_image_embedding(webp, source="a.webp"), data)


def test_sdxl_dict_and_custom_preview():
    rng = np.random.default_rng(1)
    data = {"clip_l": rng.standard_normal((2, 768)).astype(np.float32),
            "clip_g": rng.standard_normal((2, 1280)).astype(np.float32)}
    preview = Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 128, 3), np.uint8))
    for blob in (dump_png_embedding(data, caption="x", preview=preview),
                 strip_text(dump_png_embedding(data, caption="x", preview=np.asarray(preview)))):
        got = load_image_embedding(blob, source="xl.png")
        assert np.array_equal(got["clip_l"], data["clip_l"]) and np.array_equal(got["clip_g"], data["clip_g"])
        assert Image.open(io.BytesIO(blob)).size[1] == 96


def test_unicode_caption_and_bad_previews():
    data = a1111_data((1, 768))
    assert load_image_embedding(dump_png_embedding(data, caption="<猫-toy>"), source="u")["name"] == "cat-toy"
    for bad in (np.zeros((4, 4, 3), np.uint8), np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32)):
        with pytest.raises(UnsupportedFormatError):
            dump_png_embedding(data, caption="x", preview=bad)
    with pytest.raises(UnsupportedFormatError):
        dump_png_embedding({"x": object()}, caption="x")


# -- bad input ----------------------------------------------------------------------------------


def expect_format_error(blob: bytes, *words: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        load_image_embedding(blob, source="bad.png")
    for w in words:
        assert w in str(info.value)
    assert len(str(info.value)) < 400
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_image_without_embedding(fmt):
    photo = Image.fromarray(np.random.default_rng(0).integers(30, 256, (64, 64, 3), np.uint8))
    expect_format_error(encode(photo, fmt), "no embedding found in this image")
    expect_format_error(encode(Image.new("RGB", (64, 64)), fmt), "no embedding found")  # all black
    letterboxed = np.zeros((64, 80, 3), np.uint8)  # black bars: separators but no zlib stream
    letterboxed[:, 10:70] = 200
    letterboxed[:, :5] = 99
    letterboxed[:, 75:] = 99
    expect_format_error(encode(Image.fromarray(letterboxed), fmt), "no embedding found")


def test_not_an_image():
    expect_format_error(b"PK\x03\x04 not an image", "not a PNG or WebP")


def test_zlib_bomb_side_band_is_refused():
    bomb = zlib.compress(b" " * (ai.MAX_JSON_BYTES + 1024), 9)
    expect_format_error(encode(hand_band_image(bomb, NOISE)), "MiB", "refusing")


def test_damaged_and_incomplete_side_band():
    compressed = zlib.compress(json.dumps({"name": "x" * 3000}).encode(), 9)
    damaged = bytearray(compressed)
    damaged[10:30] = bytes(20)
    expect_format_error(encode(hand_band_image(bytes(damaged), NOISE)), "damaged")
    # cut mid-stream and pad with zeros (not a cyclic repeat) so the stream never ends
    cut = compressed[:len(compressed) // 2] + bytes(len(compressed))
    expect_format_error(encode(hand_band_image(cut, NOISE)))
    with pytest.raises(FormatError, match="incomplete"):  # a stream that simply stops
        ai.inflate_band(compressed[:len(compressed) // 2], "x.png")


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (5000, 5000)])
def test_huge_claimed_dimensions_refused_before_decoding(w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    blob = build_png([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"")), (b"IEND", b"")])
    expect_format_error(blob, "refusing to decode")


@pytest.mark.parametrize("value,words", [
    ("!!!not base64!!!", ["not valid base64"]),
    (base64.b64encode(b"not json {").decode(), ["not valid embedding JSON"]),
    (base64.b64encode(b"[1, 2, 3]").decode(), ["not an embedding dict"]),
    (base64.b64encode(b'{"a": {"TORCHTENSOR": [[1.0, 2.0], [3.0]]}}').decode(), ["different lengths"]),
    (base64.b64encode(b'{"a": {"TORCHTENSOR": [[1.0, "2"]]}}').decode(), ["not numbers"]),
    (base64.b64encode(b'{"a": {"TORCHTENSOR": [[true, false]]}}').decode(), ["not numbers"]),
    (base64.b64encode(b'{"a": {"TORCHTENSOR": [[1.0], 2.0]}}').decode(), ["different lengths"]),
    (base64.b64encode(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}").decode(), ["JSON"]),
], ids=["base64", "json", "list", "ragged", "string", "bool", "mixed", "deep"])
def test_text_chunk_garbage(value, words):
    expect_format_error(png_with_text(value), *words)


def test_json_is_parsed_plainly():
    doc = {"py/object": "os.system", "__class__": "subprocess.Popen", "$type": "x",
           "t": {"TORCHTENSOR": [[1, 2]], "extra": "ignored, as A1111's decoder does"},
           "nested": [{"TORCHTENSOR": 3.5}], "inf": {"TORCHTENSOR": [1e400]}}
    got = load_image_embedding(png_with_text(base64.b64encode(json.dumps(doc).encode())), source="x")
    assert got["py/object"] == "os.system" and got["__class__"] == "subprocess.Popen"
    assert got["t"].dtype == np.float32 and got["t"].tolist() == [[1.0, 2.0]]
    assert got["nested"][0].shape == () and float(got["nested"][0]) == 3.5
    assert np.isinf(got["inf"]).all()  # left for Embedding's NaN/Inf check to refuse


@pytest.mark.parametrize("make", [
    lambda: dump_png_embedding(a1111_data(), caption="x"),
    lambda: strip_text(dump_png_embedding(a1111_data(), caption="x")),
    lambda: dump_webp_embedding(a1111_data(), caption="x"),
], ids=["png", "png-band", "webp"])
def test_truncated_at_half(make):
    blob = make()
    expect_format_error(blob[:len(blob) // 2])


@fuzz(150)
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**9)))
def test_fuzzed_png_gives_a_dict_or_a_textinv_error(edits, cut):
    blob = bytearray(small_png())
    for pos, byte in edits:
        blob[pos % len(blob)] = byte
    if cut is not None:
        blob = blob[:cut % len(blob)]
    with time_bound():
        try:
            result = load_image_embedding(bytes(blob), source="fuzz.png")
        except TextinvError:
            return
    assert isinstance(result, dict)


def test_writer_refuses_an_image_readers_would_refuse(monkeypatch):
    """The band widens the canvas past the preview: an image over the pixel cap is never written."""
    data = a1111_data(shape=(2, 768))  # random values: ~10 KB compressed, a band ~300 columns wide
    monkeypatch.setattr(ai, "MAX_PIXELS", 1024)  # the 16x16 preview fits, preview + band does not
    with pytest.raises(UnsupportedFormatError, match="exceed 1,024 pixels"):
        dump_png_embedding(data, caption="x", preview=np.full((16, 16, 3), 90, np.uint8))
