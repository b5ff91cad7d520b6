"""Model folders (#15): the `model-dirs` setting (config file and TEXTINV_MODEL_DIRS), `--model NAME`
found there as A1111 names checkpoints (sub/NAME, with or without the suffix), ambiguous and
missing names said with the folders searched and close names, and the --vae view folders
(links only: pruning them never touches the model)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from textinv_cli.errors import NotFoundError
from textinv_cli.models import model_files, model_views, resolve


def _files(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not read by the lookup")
    return root


def test_config_sets_model_dirs_as_absolute_folders(cli, tmp_path, monkeypatch, textinv_home):
    a, b = tmp_path / "a1111", tmp_path / "comfy"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(tmp_path)
    r = cli("config", "set", "model-dirs", f"a1111{os.pathsep}comfy")
    assert r.exit_code == 0, r.output
    assert cli("config", "get", "model-dirs").stdout.strip() == f"{a}{os.pathsep}{b}"
    assert model_files.model_dirs() == [a, b]
    monkeypatch.setenv("TEXTINV_MODEL_DIRS", f"{b}{os.pathsep}{os.pathsep}")  # the variable wins; empty parts dropped
    assert model_files.model_dirs() == [b]
    r = cli("config", "set", "model-dirs", str(tmp_path / "missing"))
    assert r.exit_code == 1 and "is not a folder" in r.stderr
    r = cli("config", "set", "model-dirs")
    assert r.exit_code == 2 and "textinv config set model-dirs ~/stable-diffusion-webui" in r.stderr


def test_names_are_found_as_a1111_shows_them(tmp_path, monkeypatch):
    root = _files(tmp_path / "Stable-diffusion", "v1-5-pruned-emaonly.safetensors", "anime/anything-v3.ckpt",
                  "notes.txt", ".hidden/secret.safetensors")
    monkeypatch.setenv("TEXTINV_MODEL_DIRS", str(root))
    names = [f.name for f in model_files.list_model_files()]
    assert names == ["anime/anything-v3", "v1-5-pruned-emaonly"]
    want = root / "anime" / "anything-v3.ckpt"
    for typed in ("anime/anything-v3", "anime/anything-v3.ckpt", "anything-v3"):  # the last part, when unique
        assert resolve.locate_model(typed) == str(want)
    assert resolve.locate_model("v1-5-pruned-emaonly.safetensors") == str(root / "v1-5-pruned-emaonly.safetensors")
    assert resolve.locate_model("owner/repo") == "owner/repo"  # not in the folders: still a Hub id
    assert resolve.canonical_model("anything-v3") == "anything-v3"  # follows the folders
    monkeypatch.chdir(root)
    assert resolve.canonical_model("anime/anything-v3.ckpt") == str(want)  # a path: absolute


def test_an_ambiguous_name_lists_the_files(tmp_path, monkeypatch):
    a = _files(tmp_path / "a", "model.safetensors", "x/foo.safetensors")
    b = _files(tmp_path / "b", "model.ckpt", "y/foo.safetensors")
    monkeypatch.setenv("TEXTINV_MODEL_DIRS", f"{a}{os.pathsep}{b}")
    with pytest.raises(NotFoundError) as e:
        resolve.locate_model("model")  # in both folders
    assert "2 models are named 'model'" in e.value.message and str(b / "model.ckpt") in e.value.message
    assert "full name" in e.value.hint
    assert resolve.locate_model("model.ckpt") == str(b / "model.ckpt")
    with pytest.raises(NotFoundError, match="2 models are named 'foo'"):
        resolve.locate_model("foo")  # the last part of two names
    assert resolve.locate_model("y/foo") == str(b / "y" / "foo.safetensors")


def test_a_missing_name_says_where_it_looked_and_suggests(cli, tmp_path, monkeypatch):
    root = _files(tmp_path / "models", "v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors")
    monkeypatch.setenv("TEXTINV_MODEL_DIRS", f"{root}{os.pathsep}{tmp_path / 'gone'}")
    with pytest.raises(NotFoundError) as e:
        resolve.locate_model("v1-5-pruned-ema")
    assert str(root) in e.value.message and f"{tmp_path / 'gone'} (missing)" in e.value.message
    assert "Did you mean v1-5-pruned-emaonly?" in e.value.hint and "textinv models" in e.value.hint
    r = cli("sample", "a cat", "--model", "sdxl_base")
    assert r.exit_code == 1 and "No model named 'sdxl_base'" in r.stderr and "sd_xl_base_1.0" in r.stderr
    monkeypatch.delenv("TEXTINV_MODEL_DIRS")
    with pytest.raises(NotFoundError) as e:
        resolve.locate_model("v1-5-pruned-emaonly")
    assert "textinv config set model-dirs" in e.value.hint


def test_a_missing_checkpoint_path_is_not_taken_for_a_hub_id(cli, tmp_path):
    r = cli("sample", "a cat", "--model", str(tmp_path / "x.safetensors"))
    assert r.exit_code == 1 and "does not exist" in r.stderr and "Hub" not in r.stderr


def test_a_view_links_the_model_and_swaps_the_vae(tmp_path, textinv_home):
    model = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder"):
        (model / part).mkdir(parents=True)
        (model / part / "config.json").write_text(part)
    (model / "model_index.json").write_text("{}")
    vae = tmp_path / "converted-vae"
    vae.mkdir()
    (vae / "config.json").write_text("mine")
    view = model_views.vae_view(model, vae, label="v1-5+vae-ft-mse")
    assert view.parent == textinv_home / "models" / "views" and view.name.startswith("v1-5+vae-ft-mse-")
    assert (view / "vae" / "config.json").read_text() == "mine"
    assert (view / "unet" / "config.json").read_text() == "unet" and (view / "unet").is_symlink()
    assert model_views.view_info(view)["model"] == str(model.resolve())
    assert model_views.vae_view(model, vae, label="v1-5+vae-ft-mse") == view  # made once
    assert model_views.prune_views() == 1 and not view.exists()
    assert (model / "vae" / "config.json").read_text() == "vae" and (vae / "config.json").exists()  # untouched
def test_models_without_folders_says_a_command_that_works(cli, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "stable-diffusion-webui" / "models" / "Stable-diffusion").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    r = cli("models")
    assert r.exit_code == 0 and "No model folders are set" in r.stdout
    command = r.stdout[r.stdout.index("textinv config set"):].split(" (")[0]
    words = [os.path.expanduser(w) for w in shlex.split(command)]  # the shell's tilde
    assert cli(*words[1:]).exit_code == 0
    r = cli("models")
    assert r.exit_code == 0 and "No .safetensors or .ckpt files there." in r.stdout




def test_an_a1111_embeddings_checkpoint_name_is_found_in_the_model_folders(tmp_path, monkeypatch):
    meta = {"sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    assert resolve.base_model_hint(meta, "sd1").startswith("It was trained on v1-5-pruned-emaonly")
    monkeypatch.setenv("TEXTINV_MODEL_DIRS", str(_files(tmp_path / "sd", "sd15/v1-5-pruned-emaonly.safetensors")))
    assert resolve.base_model_hint(meta, "sd1") == \
        "Pass --model v1-5-pruned-emaonly (the model it was trained on, in your model folders)."


def test_a_folder_that_links_back_up_is_walked_once(tmp_path, monkeypatch):
    root = _files(tmp_path / "models", "a.safetensors")
    (root / "loop").symlink_to(root)
    monkeypatch.setenv("TEXTINV_MODEL_DIRS", str(root))
    assert [f.name for f in model_files.list_model_files()] == ["a"]
