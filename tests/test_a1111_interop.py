"""What AUTOMATIC1111 (and Forge, which keeps its loader) accepts, written as facts from its
code, checked against every file textinv writes.

Facts (AUTOMATIC1111/stable-diffusion-webui, read at file level; no code copied):
- modules/safe.py check_zip_filenames: with the safe unpickler on (the default), a .pt/.bin
  zip may only hold members `<dir>/data.pkl`, `<dir>/data/<digits>` and `<dir>/version`
  (allowed_zip_names_re; later releases add `<dir>/byteorder` and `<dir>/.data/serialization_id`);
  anything else is "bad file inside ..." and the embedding is not loaded. There must be
  exactly one `<dir>/data.pkl`.
- modules/safe.py RestrictedUnpickler: find_class allows only the globals in A1111_GLOBALS
  below; persistent_load asserts the id's first item is 'storage'.
- modules/textual_inversion/textual_inversion.py load_from_file: the name to type is the file
  name without its extension for .pt/.bin/.safetensors, and the embedded `name` field for
  .png/.webp images (falling back to the file name). A1111 builds its own names from letters,
  digits and "._- " only (create_embedding), so its images carry the bare name.
ComfyUI (comfy/sd1_clip.py load_embed): .pt/.bin through torch.load(weights_only=True,
map_location="cpu"); then string_to_param's first value, else the encoder's key
(clip_l / clip_g), else the dict's first value.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from textinv_cli import formats
from textinv_cli.embedding import Embedding
from textinv_cli.families import FAMILY_SLOTS, SLOT_WIDTHS
from textinv_cli.formats.pickle_reader import load_torch_pickle

torch = pytest.importorskip("torch")

# Written by us from the fact above: the members every A1111 release accepts.
A1111_MEMBER = re.compile(r"[^/]+/(data\.pkl|data/[0-9]+|version)\Z")
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}
# Every writer whose output is (or holds) a torch pickle, and where that pickle is.
PICKLE_WRITERS = {"a1111": "", "bin": "", "kohya-pt": "", "sd-concepts": "learned_embeds.bin"}


def family_embedding(family: str, token: str = "<cat-toy>", n: int = 2, seed: int = 0) -> Embedding:
    """An embedding with every slot of `family`, at the real widths."""
    rng = np.random.default_rng(seed)
    vectors = {s: rng.standard_normal((n, SLOT_WIDTHS[s])).astype(np.float32) for s in FAMILY_SLOTS[family]}
    return Embedding(token=token, vectors=vectors)


def a1111_check_pt(data: bytes) -> None:
    """A1111's check_pt, from the facts above: member names, one data.pkl, allowed globals."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    bad = [n for n in zf.namelist() if not A1111_MEMBER.match(n)]
    assert not bad, f"A1111 refuses: bad file inside: {bad}"
    pkls = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    assert len(pkls) == 1
    ops = list(pickletools.genops(zf.read(pkls[0])))
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            assert (module, name) in A1111_GLOBALS, f"A1111 forbids global {module}/{name}"
        assert op.name not in ("STACK_GLOBAL", "INST", "OBJ", "PERSID", "EXT1", "EXT2", "EXT4"), op.name
        if op.name == "BINPERSID":  # the id tuple was built just before: its first item is 'storage'
            mark = max(j for j in range(i) if ops[j][0].name == "MARK")
            assert ops[mark + 1][1] == "storage"


def pickle_cases():
    for fmt, member in PICKLE_WRITERS.items():
        for family in sorted(formats.WRITERS[fmt].families):
            yield pytest.param(fmt, member, family, id=f"{fmt}-{family}")


@pytest.mark.parametrize("fmt,member,family", list(pickle_cases()))
def test_every_pickle_writer_and_family_passes_a1111_and_loads_in_torch(tmp_path, fmt, member, family):
    emb = family_embedding(family)
    out = tmp_path / formats.default_output_name(emb, fmt).rstrip("/")
    formats.write_embedding(emb, out, fmt)
    path = out / member if member else out
    data = path.read_bytes()
    a1111_check_pt(data)
    loaded = torch.load(path, weights_only=True, map_location="cpu")  # also what ComfyUI calls
    tensors = _tensors(loaded)
    got = sorted(t.numpy().reshape(-1, t.shape[-1]).tobytes() for t in tensors)
    assert got == sorted(v.tobytes() for v in emb.vectors.values())  # byte-exact, nothing else
    back = formats.read_embedding(out)  # kohya-pt has no token field: it comes from the file name
    assert back.family == family and back.vectors.keys() == emb.vectors.keys()
    assert all(np.array_equal(back.vectors[s], v) for s, v in emb.vectors.items())


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("fmt", ["a1111", "bin", "kohya-pt"])
def test_comfyui_picks_our_vectors(tmp_path, fmt, family):
    """ComfyUI's lookup (facts above) finds the right tensor for each of its encoders."""
    emb = family_embedding(family, seed=3)
    if fmt not in formats.WRITERS or family not in formats.WRITERS[fmt].families:
        pytest.skip(f"{fmt} does not hold {family}")
    out = tmp_path / formats.default_output_name(emb, fmt)
    formats.write_embedding(emb, out, fmt)
    embed = torch.load(out, weights_only=True, map_location="cpu")
    for slot, vec in emb.vectors.items():
        if "string_to_param" in embed:
            found = next(iter(embed["string_to_param"].values()))
        elif slot in embed:
            found = embed[slot]
        else:
            found = next(iter(embed.values()))
        np.testing.assert_array_equal(found.numpy().reshape(vec.shape), vec)


def test_fp16_and_sdxl_pairs_are_byte_exact_after_torch_load(tmp_path):
    """The writer keeps the stored dtype: fp16 SDXL pairs and odd-length storages read back exactly."""
    from textinv_cli.formats.pickle_writer import dump_torch_pickle

    rng = np.random.default_rng(5)
    obj = {"clip_l": rng.standard_normal((3, 768)).astype(np.float16),
           "clip_g": rng.standard_normal((3, 1280)).astype(np.float16),
           "odd": np.array([1.0, 2.0, 3.0], np.float16), "f32": rng.standard_normal((1, 1024)).astype(np.float32)}
    path = tmp_path / "pair.pt"
    path.write_bytes(dump_torch_pickle(obj))
    a1111_check_pt(path.read_bytes())
    for mmap in (False, True):
        back = torch.load(path, weights_only=True, mmap=mmap)
        assert {k: (v.dtype, v.numpy().tobytes()) for k, v in back.items()} == \
               {k: (getattr(torch, str(v.dtype)), v.tobytes()) for k, v in obj.items()}


def test_our_reader_reads_torch_save_files_and_ours(tmp_path):
    """Files with torch 2.x's extra records (.format_version, byteorder, ...) and ours both read."""
    vec = torch.randn(2, 768)
    old = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "old"}, old)
    assert "old/.format_version" in zipfile.ZipFile(old).namelist()
    emb = formats.read_embedding(old)
    np.testing.assert_array_equal(emb.vectors["clip_l"], vec.numpy())
    new = tmp_path / "old-new.pt"
    formats.write_embedding(emb, new, "a1111")
    assert len(zipfile.ZipFile(new).namelist()) == 3
    np.testing.assert_array_equal(load_torch_pickle(new.read_bytes(), source="x")["string_to_param"]["*"], vec.numpy())


def test_the_member_rule_can_fail():
    """The check refuses what torch.save itself writes (the reason for the writer's layout)."""
    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf)
    with pytest.raises(AssertionError, match="bad file inside"):
        a1111_check_pt(buf.getvalue())
