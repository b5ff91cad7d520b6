"""Every writer round-trips through read_embedding; detection is by content; files made
by the real tools' conventions (torch.save, safetensors.torch, ParameterDict) read right."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from textinv_cli import formats
from textinv_cli.embedding import Embedding, safe_name
from textinv_cli.errors import AmbiguousEmbeddingError, FormatError
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors

from .support.family_embeddings import family_embedding
from .support.helpers import random_embedding

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
CASES = [(fmt, fam) for fmt, info in formats.WRITERS.items() for fam in FAMILIES if fam in info.families]

# What each writer's output is detected as, and which metadata it can carry.
EXPECTED = {
    "safetensors": ("diffusers", "safetensors"),
    "bin": ("diffusers", "pickle"),
    "diffusers-sdxl": ("diffusers-sdxl", "folder"),
    "a1111": ("a1111", "pickle"),
    "kohya": ("kohya", "safetensors"),
    "kohya-pt": ("kohya", "pickle"),
    "a1111-png": ("a1111-png", "png"),
    "a1111-webp": ("a1111-webp", "webp"),
    "sd-concepts": ("sd-concepts", "folder"),
    # the layout is read as the tool whose spelling it has: t5xxl ComfyUI, t5 / emp_params
    # OneTrainer; clip_l / clip_h / clip_g alone are kohya's keys too
    "comfyui": ("kohya", "safetensors"),
    "onetrainer": ("onetrainer", "safetensors"),
}
KEEPS_STEP = {"safetensors", "diffusers-sdxl", "a1111", "kohya", "a1111-png", "a1111-webp", "comfyui", "onetrainer"}
# kohya-pt is {"emb_params": ...} and nothing else (A1111 asserts a single key), so the
# token can only come from the file name, as in A1111.
TOKEN_FROM_NAME = {"kohya-pt"}


def _expected(fmt: str, family: str) -> tuple[str, str]:
    if fmt == "comfyui" and family in ("sd3", "flux"):
        return ("comfyui", "safetensors")
    if fmt == "onetrainer" and family == "sdxl":
        return ("kohya", "safetensors")
    return EXPECTED[fmt]


def _same_vectors(a: Embedding, b: Embedding) -> bool:
    return a.vectors.keys() == b.vectors.keys() and all(
        a.vectors[k].dtype == b.vectors[k].dtype and np.array_equal(a.vectors[k], b.vectors[k]) for k in a.vectors)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fmt,family", CASES)
def test_every_writer_round_trips(tmp_path, fmt, family, n):
    emb = family_embedding("<cat-toy>", family, n=n, seed=n,
                           meta={"step": "1500", "learnable_property": "style", "sd_checkpoint": "a9263745"})
    out = tmp_path / formats.default_output_name(emb, fmt).rstrip("/")
    written = formats.write_embedding(emb, out, fmt)
    assert written == [out] and out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp files left behind

    back = formats.read_embedding(out)
    assert back.family == family and back.n_vectors == n
    assert _same_vectors(back, emb)
    assert back.token == (safe_name(emb.token) if fmt in TOKEN_FROM_NAME else "<cat-toy>")
    assert (back.meta["format"], back.meta["container"]) == _expected(fmt, family)
    assert back.content_sha256() == (emb.content_sha256() if fmt not in TOKEN_FROM_NAME else back.content_sha256())
    assert back.meta["dtype"] == "float32"
    assert back.meta["file_sha256"] == formats.file_sha256(out)
    assert back.meta.get("step") == ("1500" if fmt in KEEPS_STEP else None)
    if fmt in ("a1111", "a1111-png", "a1111-webp"):
        assert back.meta["sd_checkpoint"] == "a9263745"
    if fmt == "sd-concepts":
        assert back.meta["learnable_property"] == "style"
    # --token always wins
    assert formats.read_embedding(out, token="<other>").token == "<other>"


def test_writing_is_deterministic(tmp_path):
    emb = random_embedding(family="sdxl", n=2)
    for fmt in ("kohya", "kohya-pt", "diffusers-sdxl"):
        a, b = tmp_path / f"a-{fmt}", tmp_path / f"b-{fmt}"
        formats.write_embedding(emb, a, fmt)
        formats.write_embedding(emb, b, fmt)
        assert formats.file_sha256(a) == formats.file_sha256(b)


def test_default_output_names():
    emb = random_embedding("<cat-toy>", "sd1")
    names = {fmt: formats.default_output_name(emb, fmt) for fmt in formats.WRITERS}
    assert names == {"safetensors": "cat-toy.safetensors", "bin": "cat-toy.bin", "diffusers-sdxl": "cat-toy-sdxl/",
                     "a1111": "cat-toy.pt", "kohya": "cat-toy.safetensors", "kohya-pt": "cat-toy.pt",
                     "a1111-png": "cat-toy.png", "a1111-webp": "cat-toy.webp", "sd-concepts": "cat-toy/",
                     "comfyui": "cat-toy.safetensors", "onetrainer": "cat-toy.safetensors"}
    assert set(formats.WRITERS) == set(names) and all(i.name == k for k, i in formats.WRITERS.items())
    assert formats.WRITERS["kohya"].families == frozenset({"sd1", "sd2", "sdxl"})
    assert formats.WRITERS["safetensors"].families == frozenset({"sd1", "sd2"})
    for fmt in ("comfyui", "onetrainer"):
        assert formats.WRITERS[fmt].families == frozenset(FAMILIES)
    assert {f for f, i in formats.WRITERS.items() if "sd3" in i.families} == {"comfyui", "onetrainer"}


def test_folder_sha256_covers_its_embedding_files_in_order(tmp_path):
    emb = random_embedding(family="sdxl")
    out = tmp_path / "pair"
    formats.write_embedding(emb, out, "diffusers-sdxl")
    raw = (out / "learned_embeds.safetensors").read_bytes() + (out / "learned_embeds_2.safetensors").read_bytes()
    assert formats.file_sha256(out) == hashlib.sha256(raw).hexdigest()
    (out / "README.md").write_text("not part of the embedding")
    assert formats.file_sha256(out) == hashlib.sha256(raw).hexdigest()


# -- detection by content ---------------------------------------------------------------

@pytest.mark.parametrize("fmt,misleading_name", [
    ("kohya", "learned_embeds.bin"),
    ("a1111", "embedding.safetensors"),
    ("safetensors", "charturner.pt"),
    ("bin", "thing.safetensors"),
    ("a1111-png", "learned_embeds.bin"),
    ("a1111-webp", "picture.png"),
])
def test_detection_ignores_file_names(tmp_path, fmt, misleading_name):
    emb = random_embedding("<cat-toy>", "sd1", n=2)
    out = tmp_path / misleading_name
    formats.write_embedding(emb, out, fmt)
    back = formats.read_embedding(out)
    assert back.meta["format"] == EXPECTED[fmt][0]
    assert back.token == "<cat-toy>" and _same_vectors(back, emb)


def test_token_from_file_name_only_when_the_name_means_something(tmp_path):
    emb = random_embedding("<cat-toy>", "sd1")
    named = tmp_path / "charturner.pt"
    formats.write_embedding(emb, named, "kohya-pt")
    back = formats.read_embedding(named)
    assert back.token == "charturner" and back.meta["token_source"] == "file name"
    generic = tmp_path / "learned_embeds.bin"
    formats.write_embedding(emb, generic, "kohya-pt")
    with pytest.raises(FormatError) as e:
        formats.read_embedding(generic)
    assert "--token" in str(e.value)
    assert formats.read_embedding(generic, token="<cat-toy>").token == "<cat-toy>"


def test_key_and_token_pick_from_several_tensors(tmp_path):
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 768)).astype(np.float32) for _ in range(2))
    path = tmp_path / "two.safetensors"
    path.write_bytes(dump_safetensors({"<a>": a, "<b>": b}))
    with pytest.raises(AmbiguousEmbeddingError):
        formats.read_embedding(path)
    assert np.array_equal(formats.read_embedding(path, key="<b>").vectors["clip_l"], b)
    assert formats.read_embedding(path, key="<b>").token == "<b>"
    by_token = formats.read_embedding(path, token="<a>")
    assert by_token.token == "<a>" and np.array_equal(by_token.vectors["clip_l"], a)
    renamed = formats.read_embedding(path, key="<a>", token="<mine>")
    assert renamed.token == "<mine>" and np.array_equal(renamed.vectors["clip_l"], a)


def test_widths_choose_slots_and_tiny_widths_are_clip_l(tmp_path):
    for width, slot, family in ((768, "clip_l", "sd1"), (1024, "clip_h", "sd2"), (32, "clip_l", "sd1")):
        path = tmp_path / f"w{width}.safetensors"
        path.write_bytes(dump_safetensors({"<t>": np.ones((2, width), np.float32)}))
        emb = formats.read_embedding(path)
        assert list(emb.vectors) == [slot] and emb.family == family


def test_registry_canonical_blob_reads_back(tmp_path):
    for family in FAMILIES:
        emb = family_embedding("<cat-toy>", family)
        blob = tmp_path / f"{emb.content_sha256()}.safetensors"  # stem says nothing: token from metadata
        blob.write_bytes(emb.canonical_bytes())
        back = formats.read_embedding(blob)
        assert back.token == "<cat-toy>" and back.family == family and _same_vectors(back, emb)


def test_kohya_metadata_is_modelspec(tmp_path):
    for family, arch in (("sd1", "stable-diffusion-v1/textual-inversion"),
                         ("sd2", "stable-diffusion-v2-768-v/textual-inversion"),
                         ("sdxl", "stable-diffusion-xl-v1-base/textual-inversion")):
        out = tmp_path / f"{family}.safetensors"
        formats.write_embedding(random_embedding("<cat-toy>", family), out, "kohya")
        tensors, meta = load_safetensors(out.read_bytes())
        assert set(tensors) == ({"clip_l", "clip_g"} if family == "sdxl" else {"emb_params"})
        assert meta["modelspec.sai_model_spec"] == "1.0.1"
        assert meta["modelspec.architecture"] == arch
        assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
        assert meta["modelspec.title"] and meta["modelspec.trigger_phrase"] == "<cat-toy>"


def test_kohya_rewrite_keeps_source_modelspec_but_not_a_stale_architecture(tmp_path):
    src = random_embedding("<t>", "sd1", meta={"modelspec.architecture": "stable-diffusion-v1/textual-inversion",
                                               "modelspec.author": "me", "ss_steps": "900"})
    out = tmp_path / "k.safetensors"
    formats.write_embedding(src, out, "kohya")
    meta = formats.read_embedding(out).meta
    assert meta["modelspec.author"] == "me" and meta["ss_steps"] == "900"
    wrong = random_embedding("<t>", "sdxl", meta={"modelspec.architecture": "stable-diffusion-v1/textual-inversion",
                                                  "modelspec.author": "me"})
    formats.write_embedding(wrong, out, "kohya", force=True)
    assert formats.read_embedding(out).meta["modelspec.architecture"].startswith("stable-diffusion-xl")


def test_pt_files_we_write_load_with_torch_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    emb = random_embedding("<cat-toy>", "sd1", n=2, meta={"step": "1500", "sd_checkpoint": "a9263745",
                                                          "sd_checkpoint_name": "v1-5-pruned"})
    a1111 = tmp_path / "cat-toy.pt"
    formats.write_embedding(emb, a1111, "a1111")
    data = torch.load(a1111, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], torch.from_numpy(emb.vectors["clip_l"]))
    assert data["name"] == "<cat-toy>" and data["step"] == 1500
    assert data["sd_checkpoint"] == "a9263745" and data["sd_checkpoint_name"] == "v1-5-pruned"
    bare = tmp_path / "bare.pt"  # no metadata: None, as A1111 writes for an untrained embedding
    formats.write_embedding(random_embedding(), bare, "a1111")
    assert torch.load(bare, weights_only=True)["step"] is None

    for fmt, expect in (("kohya-pt", {"emb_params"}), ("bin", {"<cat-toy>"})):
        out = tmp_path / f"x-{fmt}"
        formats.write_embedding(emb, out, fmt)
        loaded = torch.load(out, weights_only=True)
        assert set(loaded) == expect
        assert torch.equal(next(iter(loaded.values())), torch.from_numpy(emb.vectors["clip_l"]))
    xl = tmp_path / "xl.pt"
    formats.write_embedding(random_embedding(family="sdxl"), xl, "kohya-pt")
    assert set(torch.load(xl, weights_only=True)) == {"clip_l", "clip_g"}
    concept = tmp_path / "concept"
    formats.write_embedding(random_embedding("<cat-toy>", "sd1", n=1), concept, "sd-concepts")
    one = torch.load(concept / "learned_embeds.bin", weights_only=True)["<cat-toy>"]
    assert one.shape == (768,)  # one vector is stored 1-D, as sd-concepts-library does


# -- files made the way the real tools make them -------------------------------------------

def test_sd_concepts_library_folder_from_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "cat-toy"
    folder.mkdir()
    vec = torch.randn(768)
    torch.save({"<cat-toy>": vec}, folder / "learned_embeds.bin")
    (folder / "token_identifier.txt").write_text("<cat-toy>")
    (folder / "type_of_concept.txt").write_text("object\n")
    emb = formats.read_embedding(folder)
    assert emb.token == "<cat-toy>" and emb.family == "sd1" and emb.n_vectors == 1
    assert np.array_equal(emb.vectors["clip_l"][0], vec.numpy())
    assert emb.meta["format"] == "sd-concepts" and emb.meta["container"] == "folder"
    assert emb.meta["learnable_property"] == "object"
    # token_identifier.txt is authoritative over the dict key
    (folder / "token_identifier.txt").write_text("<kitty>")
    assert formats.read_embedding(folder).token == "<kitty>"
    # the .bin on its own is the diffusers layout, 1-D
    alone = formats.read_embedding(folder / "learned_embeds.bin")
    assert alone.token == "<cat-toy>" and alone.meta["format"] == "diffusers" and alone.n_vectors == 1


def test_a1111_pt_with_a_real_parameter_dict(tmp_path):
    torch = pytest.importorskip("torch")
    vec = torch.randn(4, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    path = tmp_path / "charturner.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "charturner",
                "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned"}, path)
    emb = formats.read_embedding(path)
    assert emb.token == "charturner" and emb.family == "sd1" and emb.n_vectors == 4
    assert np.array_equal(emb.vectors["clip_l"], vec.numpy())
    assert emb.meta["format"] == "a1111" and emb.meta["step"] == "1500"
    assert emb.meta["sd_checkpoint"] == "a9263745" and emb.meta["sd_checkpoint_name"] == "v1-5-pruned"


def test_a1111_pt_from_current_torch_with_byteorder_and_fp16(tmp_path):
    torch = pytest.importorskip("torch")
    vec = torch.randn(2, 1024, dtype=torch.float16).requires_grad_(True)
    path = tmp_path / "sd2-thing.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "sd2-thing",
                "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    import zipfile
    assert any(n.endswith("/byteorder") for n in zipfile.ZipFile(path).namelist())
    emb = formats.read_embedding(path)
    assert emb.family == "sd2" and emb.meta["dtype"] == "float16" and "step" not in emb.meta
    assert np.array_equal(emb.vectors["clip_h"], vec.detach().float().numpy())


def test_kohya_files_from_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": "TextualInversion@1690000000", "ss_steps": "3000"}
    vec = torch.randn(3, 768, dtype=torch.float16)
    path = tmp_path / "charturner.safetensors"
    st.save_file({"emb_params": vec}, str(path), metadata=meta)
    emb = formats.read_embedding(path)
    assert emb.token == "charturner" and emb.meta["format"] == "kohya" and emb.meta["dtype"] == "float16"
    assert all(emb.meta[k] == v for k, v in meta.items())
    assert np.array_equal(emb.vectors["clip_l"], vec.float().numpy())

    xl = tmp_path / "xl-style.safetensors"
    l, g = torch.randn(2, 768, dtype=torch.bfloat16), torch.randn(2, 1280, dtype=torch.bfloat16)
    st.save_file({"clip_g": g, "clip_l": l}, str(xl))
    emb = formats.read_embedding(xl)
    assert emb.family == "sdxl" and emb.token == "xl-style" and emb.meta["dtype"] == "bfloat16"
    assert np.array_equal(emb.vectors["clip_g"], g.float().numpy())

    pt = tmp_path / "old-kohya.pt"  # kohya's .pt: torch.save of the same dict
    torch.save({"emb_params": vec.float()}, pt)
    emb = formats.read_embedding(pt)
    assert emb.meta["format"] == "kohya" and emb.token == "old-kohya"


def test_diffusers_sdxl_script_output(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    l, g = torch.randn(2, 768), torch.randn(2, 1280)
    st.save_file({"<cat-toy>": l}, str(tmp_path / "learned_embeds.safetensors"))
    st.save_file({"<cat-toy>": g}, str(tmp_path / "learned_embeds_2.safetensors"))
    for path in (tmp_path, tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors"):
        emb = formats.read_embedding(path)
        assert emb.family == "sdxl" and emb.token == "<cat-toy>" and emb.meta["format"] == "diffusers-sdxl"
        assert np.array_equal(emb.vectors["clip_l"], l.numpy()) and np.array_equal(emb.vectors["clip_g"], g.numpy())
    # a sibling with another token is not the other half, nor is the file alone SD 1.x (issue
    # #13: never half of a pair read silently): the error names the partner
    st.save_file({"<other>": g}, str(tmp_path / "learned_embeds_2.safetensors"))
    with pytest.raises(FormatError) as e:
        formats.read_embedding(tmp_path / "learned_embeds.safetensors")
    assert "learned_embeds_2.safetensors" in str(e.value)


def test_a1111_sdxl_dict_in_a_pt(tmp_path):
    torch = pytest.importorskip("torch")
    l, g = torch.randn(1, 768), torch.randn(1, 1280)
    path = tmp_path / "xl-embedding.pt"
    torch.save({"clip_l": l, "clip_g": g}, path)
    emb = formats.read_embedding(path)
    assert emb.family == "sdxl" and emb.token == "xl-embedding"


def test_formats_never_import_torch(tmp_path):
    code = f"""
import sys
from pathlib import Path
import numpy as np
from textinv_cli import formats
from textinv_cli.embedding import Embedding
rng = np.random.default_rng(0)
tmp = Path({str(tmp_path)!r})
for fam, vecs in (("sd1", {{"clip_l": rng.standard_normal((2, 768))}}),
                  ("sdxl", {{"clip_l": rng.standard_normal((2, 768)), "clip_g": rng.standard_normal((2, 1280))}})):
    emb = Embedding("<t>", vecs)
    for fmt, info in formats.WRITERS.items():
        if fam in info.families:
            out = tmp / (fam + "-" + fmt)
            formats.write_embedding(emb, out, fmt)
            formats.read_embedding(out, token="<t>")
assert "torch" not in sys.modules, "textinv_cli.formats imported torch"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
