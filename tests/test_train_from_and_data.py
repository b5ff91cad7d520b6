"""Training data and starts users bring from A1111 and kohya: caption template files with
[name]/[filewords], kohya's `N_name/` repeat folders, and continuing a registered embedding
(`train --from NAME`, `--init "<token>"`); validation PNGs carry A1111's parameters and
`sample --grid` writes a contact sheet. CLI tests run the real entry point on the tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from textinv_cli.engine import init_from
from textinv_cli.engine.captions import captions_for, filewords, find_images, kohya_folder
from textinv_cli.errors import OptionError, TextinvError

TOKEN = "<k-toy>"


def _png(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


# -- kohya folders and A1111 templates (no model) ---------------------------------------------------

def test_kohya_folder_names_follow_kohya():
    assert kohya_folder("10_cat toy") == (10, "cat toy")
    assert kohya_folder("3_a_b") == (3, "a_b")  # only the first "_" splits
    assert kohya_folder("2") == (2, "") and kohya_folder("2_") == (2, "")
    assert kohya_folder("0_cat") is None and kohya_folder("cat_10") is None and kohya_folder("x10_cat") is None


def test_kohya_layout_repeats_images_and_reports_other_folders(tmp_path):
    a = _png(tmp_path / "3_[name] toy" / "a.png")
    b = _png(tmp_path / "1_other" / "b.png")
    (tmp_path / "1_other" / "notes.md").write_text("x")
    top = _png(tmp_path / "top.png")
    _png(tmp_path / "misc" / "c.png")
    images, ignored = find_images(tmp_path)
    assert images == [top, b, a, a, a]  # each N_name image N times per epoch; beside them: once
    assert sorted(p.name for p in ignored) == ["misc", "notes.md"]
    flat = tmp_path / "3_[name] toy"
    assert find_images(flat) == ([a], [])  # a folder of images is read as before, whatever its name

    caps = captions_for([a, a], TOKEN, mode="files")  # kohya: the folder's words caption its images
    assert caps == [["<k-toy> toy"], ["<k-toy> toy"]]
    with pytest.raises(TextinvError, match="top.png"):  # no .txt and no folder words: named
        captions_for([top], TOKEN, mode="files")
    with pytest.raises(TextinvError, match=r"missing from 1 caption.*1_other/: 'other'"):
        captions_for([b], TOKEN, mode="files")


def test_template_file_fills_name_and_filewords_as_a1111(tmp_path):
    tpl = tmp_path / "t.txt"
    tpl.write_text("a photo of [name], [filewords]\n\n  [filewords] by [name]  \n")
    plain = _png(tmp_path / "00012-red toy.png")
    captioned = _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("[name] on a table, blue\n")
    kohya = _png(tmp_path / "5_green toy" / "003.png")
    assert filewords(plain) == "red toy"  # leading digits and dashes dropped, as A1111 does
    assert filewords(kohya) == "green toy"
    caps = captions_for([plain, captioned, kohya], TOKEN, template=str(tpl))
    assert caps[0] == ["a photo of <k-toy>, red toy", "red toy by <k-toy>"]
    # [filewords] is filled first, so a caption's own [name] becomes the token too
    assert caps[1] == ["a photo of <k-toy>, <k-toy> on a table, blue", "<k-toy> on a table, blue by <k-toy>"]
    assert caps[2][0] == "a photo of <k-toy>, green toy"
    both = captions_for([captioned], TOKEN, mode="both", template=str(tpl))
    assert both[0] == ["<k-toy> on a table, blue"] + caps[1]

    no_name = tmp_path / "bad.txt"
    no_name.write_text("a photo of [filewords]\n")
    with pytest.raises(TextinvError, match="missing from"):
        captions_for([plain], TOKEN, template=str(no_name))
    with pytest.raises(OptionError, match="--captions files"):
        captions_for([captioned], TOKEN, mode="files", template=str(tpl))
    with pytest.raises(TextinvError, match="template file"):
        captions_for([plain], TOKEN, template=str(tmp_path / "none.txt"))


def test_init_reference_words():
    sha = "ab" * 32
    assert init_from.parse(["toy"]) is None
    assert init_from.parse([f"registry:cat-toy@{sha}"]) == ("cat-toy", sha)
    with pytest.raises(OptionError, match="alone"):
        init_from.parse([f"registry:cat-toy@{sha}", "toy"])
    with pytest.raises(OptionError, match="not a registry reference"):
        init_from.parse(["registry:cat-toy"])
    with pytest.raises(OptionError, match="mixes a token with words"):
        init_from.start_options(None, "<x>", "<cat-toy> toy", None, 1)
    assert init_from.start_options(None, "<x>", "toy, figure", None, 2) == ("<x>", ["toy", "figure"], 2, None)


# -- through the CLI on the tiny model --------------------------------------------------------------

def _final(run):
    from safetensors.numpy import load_file

    return load_file(run / "learned_embeds.safetensors")


def test_continue_a_registered_embedding_and_see_its_images(cli, tiny_model, demo_images, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from textinv_cli.registry.store import Registry

    monkeypatch.chdir(tmp_path)
    model = tiny_model("sd1")
    base = ["--model", model, "--steps", "1", "--checkpoint-every", "0"]
    r = cli("train", demo_images, "--token", TOKEN, "--init", "toy", *base, "--vectors", "2",
            "--run-dir", tmp_path / "first")
    assert r.exit_code == 0, r.output
    start = Registry().load("k-toy").vectors["clip_l"]
    r = cli("train", demo_images, "--from", "k-toy", "--name", "k-toy-more", *base, "--lr", "1e-9",
            "--run-dir", tmp_path / "more")
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "more" / "spec.json").read_text())
    assert spec["init"] == [f"registry:k-toy@{Registry().get('k-toy').sha256}"] and spec["vectors"] == 2
    assert spec["token"] == TOKEN  # --from's token unless --token says otherwise
    assert np.allclose(_final(tmp_path / "more")[TOKEN], start, atol=1e-6)  # started from its rows
    from textinv_cli.formats import read_embedding

    assert read_embedding(tmp_path / "more" / "learned_embeds.safetensors").meta["init_from"] == \
        f"k-toy@{Registry().get('k-toy').sha256[:12]}"  # the file says where it started

    # the registered token as the init names the same start (its token's active entry, now k-toy-more)
    more = Registry().get("k-toy-more")
    assert init_from.start_options(None, "<k-two>", TOKEN, None, 1) == ("<k-two>", [init_from.reference(more)], 2,
                                                                         "k-toy-more")

    r = cli("train", demo_images, "--from", "k-toy", "--vectors", "1", *base)
    assert r.exit_code == 2 and "--vectors 1 does not match k-toy, which has 2" in r.output
    sd2 = tmp_path / "sd2"  # what model_family reads: refused before anything else of the model is
    (sd2 / "text_encoder").mkdir(parents=True)
    (sd2 / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (sd2 / "text_encoder" / "config.json").write_text('{"hidden_act": "gelu"}')
    r = cli("train", demo_images, "--from", "k-toy", "--model", sd2, "--steps", "1")
    assert r.exit_code == 1 and "Stable Diffusion 1.x embedding but sd2 is" in r.output
    assert f"--model {model}" in r.output  # the model it was trained on, as a command
    r = cli("train", demo_images, "--token", "<x>", "--init", "<none-such>", *base)
    assert r.exit_code == 1 and "no registered embedding has it" in r.output
    assert not (tmp_path / "runs").exists()  # refused before any run folder

    r = cli("sample", f"a photo of {TOKEN}", "--model", model, "-n", "3", "--steps", "1", "--grid",
            "-o", tmp_path / "pics")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "pics" / "grid-0000.png") as grid, Image.open(tmp_path / "pics" / "00000-0.png") as one:
        assert grid.size == (128, 128) and grid.info["parameters"] == one.info["parameters"]
    assert "Wrote grid" in r.output


def test_validation_pngs_carry_a1111_parameters(tiny_model, demo_images, tmp_path):
    torch = pytest.importorskip("torch")
    from tests.support.training import run_all, train_spec
    from textinv_cli.embedding import Embedding
    from textinv_torch.backend import TorchBackend

    model = tiny_model("sd1")
    spec = train_spec(demo_images, model, tmp_path / "run", steps=1, validate=[f"a photo of {TOKEN}, 2"],
                      validate_steps=1, token=TOKEN, name="k-val", seed=5, device="cpu", threads=1)
    events = run_all(TorchBackend(), spec)
    (png,) = events[-2].data["paths"]
    with Image.open(png) as im:
        text = im.info["parameters"]
    rows = events[-1].data["vectors"]  # the validation rows are the final ones after 1 step
    short = Embedding(TOKEN, rows).content_sha256()[:12]
    assert text.startswith(f'a photo of {TOKEN}, 2\nSteps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, '
                           f'Model: {model.name}, TI hashes: "k-val: {short}"')
    assert torch is not None


def test_kohya_folders_train_through_the_cli(cli, tiny_model, demo_images, tmp_path):
    pytest.importorskip("torch")
    data = tmp_path / "data"
    shutil.copytree(demo_images, data / "3_[name] toy")
    r = cli("train", data, "--token", TOKEN, "--init", "toy", "--model", tiny_model("sd1"), "--steps", "1",
            "--captions", "files", "--checkpoint-every", "0", "--run-dir", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    started = json.loads(r.stdout.splitlines()[0])
    assert started["images"] == 3 * len(find_images(demo_images)[0])  # repeated per epoch, encoded once


def test_a_run_finds_its_start_after_a_rename_and_refuses_it_once_gone():
    from textinv_cli.embedding import Embedding
    from textinv_cli.registry.store import Registry

    reg = Registry()
    vec = np.arange(6, dtype=np.float32).reshape(2, 3)
    entry, _ = reg.add(Embedding("<r-toy>", {"clip_l": vec}), name="r-toy", source="imported", origin={})
    words = [init_from.reference(entry)]
    got = init_from.start_vectors(words, 2, {"clip_l": 3}, model_name="m", model_family="sd1")
    assert np.array_equal(got["clip_l"], vec)
    reg.rename("r-toy", "r-toy-renamed")  # the recorded name is gone, the content is not
    assert np.array_equal(init_from.start_vectors(words, 2, {"clip_l": 3}, model_name="m",
                                                  model_family="sd1")["clip_l"], vec)
    with pytest.raises(TextinvError, match="does not fit m"):  # same family, another width
        init_from.start_vectors(words, 2, {"clip_l": 4}, model_name="m", model_family="sd1")
    with pytest.raises(TextinvError, match="Stable Diffusion 1.x embedding but m is Stable Diffusion XL"):
        init_from.start_vectors(words, 2, {"clip_l": 3, "clip_g": 5}, model_name="m", model_family="sdxl")
    reg.remove("r-toy-renamed")
    with pytest.raises(TextinvError, match="no longer holds"):
        init_from.start_vectors(words, 2, {"clip_l": 3}, model_name="m", model_family="sd1")


def test_jax_start_rows_and_validation_parameters(tmp_path):
    """The JAX backend's side, without compiling anything: rows from a registered start, and a
    validation PNG's A1111 block from the run's spec.json."""
    pytest.importorskip("jax")
    from textinv_jax import tokens as jax_tokens
    from textinv_jax import validation as jax_validation

    from textinv_cli.embedding import Embedding
    from textinv_cli.engine.spec import TrainSpec
    from textinv_cli.registry.store import Registry

    vec = np.full((1, 4), 0.5, np.float32)
    entry, _ = Registry().add(Embedding("<j-toy>", {"clip_l": vec}), name="j-toy", source="imported", origin={})
    table = np.zeros((10, 4), np.float32)
    rows = jax_tokens.init_rows(None, table, [init_from.reference(entry)], 1, "clip_l tokenizer")
    assert np.array_equal(rows, vec)
    with pytest.raises(TextinvError, match="Stable Diffusion 1.x embedding but m is Stable Diffusion 2.x"):
        jax_tokens.init_rows(None, np.zeros((10, 5), np.float32), [init_from.reference(entry)], 1, "clip_h tokenizer",
                             model_name="m")

    run = tmp_path / "run"
    run.mkdir()
    TrainSpec(data_dir="d", token="<j-toy>", init=["toy"], model=str(tmp_path), run_dir=str(run), name="j-toy",
              seed=4, validate_steps=9).save(run)
    text = jax_validation._parameters(run / "samples", "a <j-toy>", 1, 64, {"clip_l": vec}, token="<j-toy>", steps=9, seed=4)
    assert text.startswith(f"a <j-toy>\nSteps: 9, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, "
                           f'Model: {tmp_path.name}, TI hashes: "j-toy: {entry.sha256[:12]}"')


def test_a_run_trains_on_its_template_captions(tiny_model, demo_images, tmp_path):
    pytest.importorskip("torch")
    from tests.support.training import run_all, train_spec
    from textinv_torch.backend import TorchBackend

    tpl = tmp_path / "long.txt"
    tpl.write_text("a photo of " + "very " * 80 + "[name]\n")  # the token falls past CLIP's 77 tokens
    spec = train_spec(demo_images, tiny_model("sd1"), tmp_path / "run", steps=1, template=str(tpl), device="cpu",
                      threads=1)
    warnings = [e.data["message"] for e in run_all(TorchBackend(), spec) if e.kind == "warning"]
    assert any("cut off" in w for w in warnings), warnings  # only the template's caption is that long


def test_torch_cache_encodes_a_repeated_image_once(tiny_model, demo_images):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    from textinv_torch.data import latent_cache

    vae = AutoencoderKL.from_pretrained(tiny_model("sd1") / "vae")
    a, b = find_images(demo_images)[0][:2]
    once = latent_cache([a, b], vae, 64, False, 0.5, torch.device("cpu"))
    calls = []
    vae.encode = (lambda f: lambda x: calls.append(len(x)) or f(x))(vae.encode)
    rep = latent_cache([a, b, a], vae, 64, False, 0.5, torch.device("cpu"))
    assert sum(calls) == 4  # two images, two flips each: the repeat is not encoded again
    assert rep.n_images == 3 and torch.equal(rep.mean, once.mean[[0, 1, 2, 3, 0, 1]])
    assert torch.equal(rep.std, once.std[[0, 1, 2, 3, 0, 1]]) and torch.equal(rep.time_ids[4:], once.time_ids[:2])
