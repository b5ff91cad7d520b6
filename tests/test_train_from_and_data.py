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
            "--validate", f"a photo of {TOKEN}", "--run-dir", tmp_path / "first")
    assert r.exit_code == 0, r.output
    (png,) = (tmp_path / "first" / "samples").iterdir()
    with Image.open(png) as im:
        text = im.info["parameters"]
    short = Registry().get("k-toy").sha256[:12]  # the validation rows are the final ones after 1 step
    assert text.startswith(f"a photo of {TOKEN}\nSteps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 64x64, "
                           f'Model: {model.name}, TI hashes: "k-toy: {short}"')

    start = Registry().load("k-toy").vectors["clip_l"]
    r = cli("train", demo_images, "--from", "k-toy", "--name", "k-toy-more", *base, "--lr", "1e-9",
            "--run-dir", tmp_path / "more")
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "more" / "spec.json").read_text())
    assert spec["init"] == [f"registry:k-toy@{Registry().get('k-toy').sha256}"] and spec["vectors"] == 2
    assert spec["token"] == TOKEN  # --from's token unless --token says otherwise
    assert np.allclose(_final(tmp_path / "more")[TOKEN], start, atol=1e-6)  # started from its rows

    r = cli("train", demo_images, "--token", "<k-two>", "--init", TOKEN, *base, "--lr", "1e-9",
            "--run-dir", tmp_path / "by-token")  # the registered token as the init: the same start
    assert r.exit_code == 0, r.output
    assert np.allclose(_final(tmp_path / "by-token")["<k-two>"], Registry().load("k-toy-more").vectors["clip_l"],
                       atol=1e-6)

    r = cli("train", demo_images, "--from", "k-toy", "--vectors", "1", *base)
    assert r.exit_code == 2 and "--vectors 1 does not match k-toy, which has 2" in r.output
    r = cli("train", demo_images, "--from", "k-toy", "--model", tiny_model("sd2"), "--steps", "1")
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


def test_kohya_folders_train_through_the_cli(cli, tiny_model, demo_images, tmp_path):
    pytest.importorskip("torch")
    data = tmp_path / "data"
    shutil.copytree(demo_images, data / "3_[name] toy")
    r = cli("train", data, "--token", TOKEN, "--init", "toy", "--model", tiny_model("sd1"), "--steps", "1",
            "--captions", "files", "--checkpoint-every", "0", "--run-dir", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    started = json.loads(r.stdout.splitlines()[0])
    assert started["images"] == 3 * len(find_images(demo_images)[0])  # repeated per epoch, encoded once
