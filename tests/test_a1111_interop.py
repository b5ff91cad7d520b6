"""What AUTOMATIC1111 accepts, written as facts from its code, checked against every file
textinv writes. Forge's load_from_file names embeddings by the same rule (read in
lllyasviel/stable-diffusion-webui-forge, modules/textual_inversion/textual_inversion.py).

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
import json
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


# -- diffusers' SDXL script checkpoints: either file of a step pair reads as the pair ---------------
# Fact (diffusers examples/textual_inversion/textual_inversion_sdxl.py): with --save_steps N it
# writes learned_embeds-steps-N.safetensors + learned_embeds_2-steps-N.safetensors, and at the end
# learned_embeds.safetensors + learned_embeds_2.safetensors, the placeholder token as the key of both.

def sdxl_script_files(folder: Path, step: int | None, seed: int = 0, token: str = "<cat-toy>"):
    from textinv_cli.formats.safetensors_io import dump_safetensors

    rng = np.random.default_rng(seed)
    l, g = rng.standard_normal((2, 768)).astype(np.float32), rng.standard_normal((2, 1280)).astype(np.float32)
    tail = "" if step is None else f"-steps-{step}"
    (folder / f"learned_embeds{tail}.safetensors").write_bytes(dump_safetensors({token: l}))
    (folder / f"learned_embeds_2{tail}.safetensors").write_bytes(dump_safetensors({token: g}))
    return l, g


def test_either_file_of_a_step_pair_reads_as_the_pair(tmp_path):
    l, g = sdxl_script_files(tmp_path, 500)
    for name in ("learned_embeds-steps-500.safetensors", "learned_embeds_2-steps-500.safetensors"):
        emb = formats.read_embedding(tmp_path / name)
        assert emb.family == "sdxl" and emb.token == "<cat-toy>" and emb.meta["format"] == "diffusers-sdxl"
        assert np.array_equal(emb.vectors["clip_l"], l) and np.array_equal(emb.vectors["clip_g"], g)
        assert emb.meta["paired_with"] != name and "steps-500" in emb.meta["paired_with"]
    assert formats.read_embedding(tmp_path).family == "sdxl"  # the folder: its one step pair


def test_a_half_without_its_partner_is_refused_naming_it(tmp_path):
    sdxl_script_files(tmp_path, 500)
    sdxl_script_files(tmp_path, 1000)
    (tmp_path / "learned_embeds-steps-500.safetensors").unlink()
    (tmp_path / "learned_embeds_2-steps-1000.safetensors").unlink()
    with pytest.raises(formats.FormatError) as e:  # the second file given alone
        formats.read_embedding(tmp_path / "learned_embeds_2-steps-500.safetensors")
    assert "'learned_embeds-steps-500.safetensors'" in e.value.message
    with pytest.raises(formats.FormatError) as e:  # the first: its folder holds the script's second files
        formats.read_embedding(tmp_path / "learned_embeds-steps-1000.safetensors")
    assert "'learned_embeds_2-steps-1000.safetensors'" in e.value.message


def test_the_sd1_scripts_step_file_still_reads_alone(tmp_path):
    """textual_inversion.py (SD 1.x) writes learned_embeds-steps-N too, with no _2 files."""
    from textinv_cli.formats.safetensors_io import dump_safetensors

    (tmp_path / "learned_embeds-steps-500.safetensors").write_bytes(
        dump_safetensors({"<cat-toy>": np.ones((1, 768), np.float32)}))
    emb = formats.read_embedding(tmp_path / "learned_embeds-steps-500.safetensors")
    assert emb.family == "sd1" and emb.token == "<cat-toy>"


def test_unrelated_files_named_x_and_x_2_read_alone(tmp_path):
    """Only SDXL's two halves (768 + 1280) make a pair, or the refusal of a mismatched one."""
    from textinv_cli.formats.safetensors_io import dump_safetensors

    (tmp_path / "style.safetensors").write_bytes(dump_safetensors({"<a>": np.ones((1, 1024), np.float32)}))
    (tmp_path / "style_2.safetensors").write_bytes(dump_safetensors({"<b>": np.ones((1, 768), np.float32)}))
    assert formats.read_embedding(tmp_path / "style.safetensors").family == "sd2"
    assert formats.read_embedding(tmp_path / "style_2.safetensors").family == "sd1"


def test_a_folder_of_step_pairs_never_mixes_them(tmp_path):
    sdxl_script_files(tmp_path, 500, seed=1)
    sdxl_script_files(tmp_path, 1000, seed=2)
    with pytest.raises(formats.FormatError) as e:
        formats.read_embedding(tmp_path)
    assert "500, 1000" in e.value.message
    hint_path = e.value.hint.rsplit(" ", 1)[-1]  # the hint's command names a file that reads as that step
    assert Path(hint_path).name == "learned_embeds-steps-1000.safetensors"
    l, g = sdxl_script_files(tmp_path, None, seed=3)  # the final pair: what the folder reads as
    emb = formats.read_embedding(tmp_path)
    assert np.array_equal(emb.vectors["clip_l"], l) and np.array_equal(emb.vectors["clip_g"], g)
    assert formats.file_sha256(tmp_path) == emb.meta["file_sha256"]  # the hash covers the same files
    (tmp_path / "learned_embeds_2.safetensors").unlink()  # a final first file without its second half
    with pytest.raises(formats.FormatError, match="learned_embeds_2.safetensors"):
        formats.read_embedding(tmp_path)


def test_convert_keeps_both_halves_of_a_step_pair(cli, tmp_path):
    sdxl_script_files(tmp_path, 500)
    r = cli("convert", tmp_path / "learned_embeds-steps-500.safetensors", "--to", "kohya", "-o",
            tmp_path / "out.safetensors", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["family"] == "sdxl" and out["a1111_trigger"] == "out"


# -- the word A1111 users type: the same for every container textinv writes -------------------------

def a1111_word_of(path: Path) -> str:
    """A1111's load_from_file rule (facts at the top): the image's `name`, else the file stem."""
    from textinv_cli.formats.a1111_image import load_image_embedding

    if path.suffix in (".png", ".webp"):
        return load_image_embedding(path.read_bytes(), source=str(path)).get("name", path.stem)
    return path.stem


# The writers whose SD 1.x output A1111 loads (string_to_param, a one-tensor dict, an image).
A1111_LOADABLE = ["a1111", "a1111-png", "a1111-webp", "bin", "safetensors", "kohya", "kohya-pt"]


@pytest.mark.parametrize("fmt", A1111_LOADABLE)
def test_every_container_gives_a1111_the_bare_token(cli, tmp_path, fmt):
    src = tmp_path / "src.safetensors"
    formats.write_embedding(family_embedding("sd1"), src, "safetensors")  # token <cat-toy>
    out = tmp_path / "out"
    out.mkdir()
    r = cli("convert", src, "--to", fmt, "-o", f"{out}/")
    assert r.exit_code == 0, r.output
    (written,) = (p for p in out.rglob("*") if p.is_file())  # kohya's in out/kohya/: the name stays the word
    assert a1111_word_of(written) == "cat-toy"
    assert "In A1111/Forge type: cat-toy" in r.stdout
    back = formats.read_embedding(written)
    assert back.token == ("cat-toy" if fmt == "kohya-pt" else "<cat-toy>")  # kohya-pt has no token field


def test_no_a1111_line_for_what_a1111_cannot_load(cli, tmp_path):
    src = tmp_path / "src.safetensors"
    formats.write_embedding(family_embedding("sd1"), src, "safetensors")
    r = cli("convert", src, "--to", "sd-concepts", "-o", tmp_path / "concept", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["a1111_trigger"] is None


def test_image_name_is_bare_and_the_token_survives_a_rename(tmp_path):
    from textinv_cli.formats.a1111_image import load_image_embedding

    emb = family_embedding("sd1")
    png = tmp_path / "cat-toy.png"
    formats.write_embedding(emb, png, "a1111-png")
    data = load_image_embedding(png.read_bytes(), source="p")
    assert data["name"] == "cat-toy" and data["textinv.token"] == "<cat-toy>"
    renamed = tmp_path / "whatever.png"  # A1111 keeps using `name` for images: so do we
    png.rename(renamed)
    assert formats.read_embedding(renamed).content_sha256() == emb.content_sha256()


# -- A1111 .pt/.bin: the token is the file name A1111 shows ----------------------------------------

def a1111_pt(path: Path, name: str | None, seed: int = 0) -> np.ndarray:
    vec = np.random.default_rng(seed).standard_normal((2, 768)).astype(np.float32)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "step": 5}
    if name is not None:
        data["name"] = name
    from textinv_cli.formats.pickle_writer import dump_torch_pickle

    path.write_bytes(dump_torch_pickle(data))
    return vec


def test_a_copied_a1111_file_takes_its_new_name(cli, tmp_path):
    a1111_pt(tmp_path / "charturner2.pt", "charturner")
    (tmp_path / "turner.pt").write_bytes((tmp_path / "charturner2.pt").read_bytes())
    emb = formats.read_embedding(tmp_path / "turner.pt")
    assert emb.token == "turner" and emb.meta["a1111_name"] == "charturner" and emb.meta["name"] == "charturner"
    assert emb.meta["token_source"] == "file name"
    r = cli("convert", tmp_path / "turner.pt", "--to", "safetensors")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "turner.safetensors").exists() and not (tmp_path / "charturner.safetensors").exists()
    assert "'charturner'" in r.stdout and "In A1111/Forge type: turner" in r.stdout
    j = cli("convert", tmp_path / "turner.pt", "--to", "bin", "--json")
    assert json.loads(j.stdout)["a1111_name"] == "charturner"


@pytest.mark.parametrize("file_name,name,token", [
    ("cat-toy.pt", "<cat-toy>", "<cat-toy>"),      # what textinv writes by default: the token kept
    ("charturner.pt", "charturner", "charturner"),
    ("learned_embeds.bin", "<cat-toy>", "<cat-toy>"),  # a tool's generic name: the internal name
    ("embedding.pt", "cat", "cat"),
    ("cat.ckpt", "<cat-toy>", "<cat-toy>"),          # A1111 loads no .ckpt embedding: its name
    ("no-name.pt", None, "no-name"),
])
def test_token_of_an_a1111_file(tmp_path, file_name, name, token):
    a1111_pt(tmp_path / file_name, name)
    emb = formats.read_embedding(tmp_path / file_name)
    assert emb.token == token
    assert "a1111_name" not in emb.meta
    assert formats.read_embedding(tmp_path / file_name, token="<x>").token == "<x>"


def test_every_a1111_writer_round_trips_its_token_under_the_default_name(tmp_path):
    emb = family_embedding("sd1")
    for fmt in ("a1111", "a1111-png", "a1111-webp"):
        out = tmp_path / formats.default_output_name(emb, fmt)
        formats.write_embedding(emb, out, fmt)
        back = formats.read_embedding(out)
        assert back.token == "<cat-toy>" and "a1111_name" not in back.meta, fmt


def test_the_internal_name_is_not_written_into_other_files(tmp_path):
    """a1111_name is a fact about the source file (layouts.READ_ONLY_META), never carried on."""
    from textinv_cli.formats.safetensors_io import load_safetensors

    a1111_pt(tmp_path / "turner.pt", "charturner")
    emb = formats.read_embedding(tmp_path / "turner.pt")
    formats.write_embedding(emb, tmp_path / "t.safetensors", "kohya")
    meta = load_safetensors((tmp_path / "t.safetensors").read_bytes(), source="t")[1]
    assert "a1111_name" not in meta and meta.get("textinv.token") == "turner"
