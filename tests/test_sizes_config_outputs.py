"""#14, everyday use: image sizes refused before anything loads (model's native size, memory),
the default model set once (TEXTINV_MODEL, `textinv config`), `convert -o out/` and one
default path per format, backend versions read without importing the libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from textinv_cli import formats
from textinv_cli.engine import checks
from textinv_cli.errors import OptionError
from textinv_cli.formats.writers import default_output_path
from textinv_cli.models import resolve

from .support.helpers import random_embedding


def tiny_configs(root: Path, family: str = "sd1") -> Path:
    """The built-in tiny model's JSON files (models/tiny.recipe_files), without its weights:
    what the size rule reads, at no cost."""
    from textinv_cli.models.tiny import recipe_files

    for name, data in recipe_files(family).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def fake_model(root: Path, sample_size: int = 8, vae_blocks=(32, 32, 64, 64)) -> Path:
    """Only the configs the size rule reads (8 x 2**3 = 64 px native, as the tiny models)."""
    if (sample_size, tuple(vae_blocks)) == (8, (32, 32, 64, 64)):
        return tiny_configs(root)
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": list(vae_blocks)}))
    return root


# -- sizes -------------------------------------------------------------------------------------

def test_native_size_is_read_from_the_model_folder(tmp_path):
    for family in ("sd1", "sdxl"):
        assert resolve.model_geometry(str(tiny_configs(tmp_path / family, family))) == (64, 32)
    assert resolve.model_geometry(str(fake_model(tmp_path / "sd15", 64, (128, 256, 512, 512)))) == (512, 128)
    assert resolve.model_geometry(str(tmp_path / "nothing")) is None


def test_a_side_beyond_the_limit_is_refused_with_the_way_out(tmp_path):
    model = str(fake_model(tmp_path / "m"))
    big = 2**50
    checks.check_size(64, 64, model, flag="--resolution", memory=big)
    checks.check_size(2048, 768, model, flag="--size", memory=big)  # the floor: tiny models take real sizes
    checks.check_size(None, None, model, flag="--size", memory=1)   # the model's own size
    with pytest.raises(OptionError) as e:
        checks.check_size(4096, 4096, model, flag="--resolution", memory=big)
    assert "--resolution 4096 is larger than this model takes: at most 2048 px" in e.value.message
    assert "Use --resolution 64 (the model's size), or add --allow-large" in e.value.hint
    sd15 = str(fake_model(tmp_path / "sd15", 64, (128, 256, 512, 512)))
    checks.check_size(2048, 2048, sd15, flag="--size", memory=big)
    with pytest.raises(OptionError, match="at most 2048 px"):
        checks.check_size(2056, 512, sd15, flag="--size", memory=big)


def test_a_size_that_cannot_fit_in_memory_is_refused(tmp_path, monkeypatch):
    model = str(fake_model(tmp_path / "m"))
    # 1024 x 1024 x 32 channels x 4 bytes x 3 tensors = 384 MiB, more than 100 MiB
    with pytest.raises(OptionError, match=r"needs at least 0\.4 GiB .* 0\.1 GiB is available"):
        checks.check_size(1024, 1024, model, flag="--size", memory=100 * 2**20)
    checks.check_size(1024, 1024, model, flag="--size", memory=400 * 2**20)
    checks.check_size(1024, 1024, model, flag="--size", memory=1, allow=True)
    monkeypatch.setenv(checks.ALLOW_LARGE_ENV, "1")
    checks.check_size(10**6, 10**6, model, flag="--size", memory=1)
    assert checks.available_memory() is None or checks.available_memory() > 0


def test_train_and_sample_refuse_huge_sizes_before_loading(cli, tmp_path, demo_images, monkeypatch, no_backend):
    monkeypatch.chdir(tmp_path)
    model = fake_model(tmp_path / "m")
    r = cli("train", demo_images, "--token", "<big-toy>", "--init", "toy", "--model", model, "--resolution", "4096")
    assert r.exit_code == 2 and "at most 2048 px a side" in r.stderr and "--allow-large" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = cli("sample", "a photo", "--model", model, "--size", "100000", "-o", tmp_path / "s")
    assert r.exit_code == 2 and "--size 100000x100000 is larger than this model takes" in r.stderr
    assert not (tmp_path / "s").exists()


# -- the default model, set once ---------------------------------------------------------------

def test_config_sets_shows_and_unsets_the_default_model(cli, tmp_path, monkeypatch, textinv_home):
    monkeypatch.delenv("TEXTINV_MODEL", raising=False)
    r = cli("config")
    assert r.exit_code == 0 and "model = tiny  (the built-in default)" in r.stdout
    assert resolve.configured_model(None) is None and resolve.default_model() == "tiny"
    model = fake_model(tmp_path / "my model")
    monkeypatch.chdir(tmp_path)
    assert cli("config", "set", "model", "my model").exit_code == 0  # relative: stored absolute
    assert cli("config", "get", "model").stdout.strip() == str(model.resolve())
    assert resolve.configured_model(None) == str(model.resolve()) and resolve.configured_model("x") == "x"
    assert 'model = "' in (textinv_home / "config.toml").read_text()
    monkeypatch.setenv("TEXTINV_MODEL", "tiny-sd2")  # the environment wins over the file
    listed = json.loads(cli("config", "list", "--json").stdout)
    assert listed["model"] == {"value": "tiny-sd2", "from": "TEXTINV_MODEL", "env": "TEXTINV_MODEL"}
    assert resolve.default_model() == "tiny-sd2"
    monkeypatch.delenv("TEXTINV_MODEL")
    r = cli("config", "unset", "model")
    assert r.exit_code == 0 and "model is now tiny (the built-in default)" in r.stdout


@pytest.mark.parametrize("args, code, words", [
    (["config", "set", "modle", "x"], 2, "Unknown setting 'modle'"),
    (["config", "set", "model"], 2, "needs a value"),
    (["config", "get"], 2, "textinv config get model"),
    (["config", "frob"], 2, "Unknown action"),
    (["config", "set", "model", "no-such-folder"], 1, "neither a local folder nor a Hub id"),
])
def test_config_mistakes_are_said_in_words(cli, args, code, words):
    r = cli(*args)
    assert r.exit_code == code and words in r.stderr


def test_a_damaged_config_file_is_named(cli, textinv_home):
    (textinv_home / "config.toml").write_text("model = [unclosed")
    r = cli("config")
    assert r.exit_code == 1 and "config.toml cannot be read" in r.stderr and "Fix or delete it" in r.stderr


# -- convert: -o out/ and one path per format --------------------------------------------------

def test_one_default_path_per_format_keeps_the_word_to_type():
    emb = random_embedding("<cat-toy>")
    paths = {fmt: default_output_path(emb, fmt) for fmt in formats.WRITERS}
    assert len(set(paths.values())) == len(paths)
    assert paths["safetensors"] == "cat-toy.safetensors" and paths["a1111"] == "cat-toy.pt"
    assert paths["kohya"] == "kohya/cat-toy.safetensors" and paths["kohya-pt"] == "kohya-pt/cat-toy.pt"
    assert all(Path(p.rstrip("/")).name.startswith("cat-toy") for p in paths.values())


def test_convert_into_a_new_folder_and_every_format_beside_the_others(cli, tmp_path):
    src = tmp_path / "cat-toy.pt"
    formats.write_embedding(random_embedding("<cat-toy>"), src, "a1111")
    for fmt in ("safetensors", "kohya", "comfyui"):
        r = cli("convert", src, "--to", fmt, "-o", f"{tmp_path / 'out'}/")  # the README's `-o out/`
        assert r.exit_code == 0, r.output
        assert "In A1111/Forge type: cat-toy" in r.stdout
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors")) == [
        "cat-toy.safetensors", "comfyui/cat-toy.safetensors", "kohya/cat-toy.safetensors"]
    r = cli("convert", src, "--to", "kohya", "-o", f"{out}/")  # again: refused, nothing replaced
    assert r.exit_code == 1 and "--force" in r.output


# -- backends: versions from metadata ----------------------------------------------------------

def test_library_versions_come_from_metadata_without_importing():
    import sys

    import numpy

    from textinv_cli.engine.lib_versions import MISSING, installed_version

    assert installed_version("numpy") == numpy.__version__
    assert installed_version("no_such_library_textinv") == MISSING
    if "xformers" not in sys.modules:
        installed_version("xformers")
        assert "xformers" not in sys.modules


# -- errors that need only the tokenizer or the files: before any backend loads ----------------

def tiny_with_tokenizer(root: Path, family: str = "sd1") -> Path:
    from textinv_cli.models.tiny_tokenizer import write_tokenizer

    tiny_configs(root, family)
    for sub in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        write_tokenizer(root / sub)
    return root


@pytest.fixture
def no_backend(monkeypatch):
    """Fails the test if a backend is asked for: the error must come before."""
    from textinv_cli.engine import plugins

    def refuse(*a, **k):
        raise AssertionError("a backend was loaded before the error")

    monkeypatch.setattr(plugins, "require_backend", refuse)


@pytest.mark.parametrize("args, words", [
    (["--token", "toy", "--init", "toy"], "The token 'toy' is already in the clip_l tokenizer's vocabulary"),
    (["--token", "<zz-toy>", "--init", "qqxqzzy"], "init word 'qqxqzzy' is 7 tokens"),
    (["--token", "<zz-toy>", "--init", "toy figure"], "--init has 2 words but --vectors is 1"),
])
def test_token_and_init_mistakes_come_before_any_backend(cli, tmp_path, demo_images, no_backend, args, words):
    model = tiny_with_tokenizer(tmp_path / "m", "sdxl")
    r = cli("train", demo_images, "--model", model, *args)
    assert r.exit_code == 1 and words in r.stderr


def test_an_unreadable_image_comes_before_any_backend(cli, tmp_path, demo_images, no_backend):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    (data / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = cli("train", data, "--token", "<zz-toy>", "--init", "toy", "--model", tiny_with_tokenizer(tmp_path / "m"))
    assert r.exit_code == 1 and "Cannot read the image" in r.stderr and "zz-broken.png" in r.stderr


def test_the_light_vocabulary_tokenizes_as_clip_does(tmp_path):
    from transformers import CLIPTokenizer

    from textinv_cli.models.vocab import Vocabulary

    folder = tiny_with_tokenizer(tmp_path / "m") / "tokenizer"
    real, light = CLIPTokenizer.from_pretrained(str(folder)), Vocabulary(folder)
    assert light.unk_token_id == real.unk_token_id and light.get_vocab() == real.get_vocab()
    for text in ("toy", "Toy", "toy figure", "qqxqzzy", "<cat-toy>", "cat-toy", "a photo of a dog's toy", "x2", "  ",
                 "watercolor,painting", "<|endoftext|>"):
        assert light.tokenize(text) == real.tokenize(text), text
        assert light.encode(text) == real.encode(text, add_special_tokens=False), text


# -- widths that are no text encoder's ---------------------------------------------------------

def test_an_unknown_width_is_said_not_passed_off_as_sd1(cli, tmp_path):
    import numpy as np

    from textinv_cli.embedding import Embedding, width_note
    from textinv_cli.formats.safetensors_io import dump_safetensors

    for widths in ({"clip_l": 768}, {"clip_l": 32}, {"clip_h": 48}, {"clip_l": 32, "clip_g": 64},
                   {"clip_l": 768, "clip_g": 1280, "t5": 4096}):
        assert width_note(Embedding("<x>", {s: np.ones((1, w), np.float32) for s, w in widths.items()})) is None
    src = tmp_path / "odd.safetensors"
    src.write_bytes(dump_safetensors({"<odd>": np.ones((1, 777), np.float32)}))
    r = cli("convert", src, "--to", "a1111", "-o", tmp_path / "odd.pt")
    assert r.exit_code == 0
    assert "Warning: The width 777 (clip_l) is not any known text encoder's" in r.stderr


def test_a_recorded_base_model_becomes_the_way_out_of_a_family_mismatch(tmp_path):
    model = fake_model(tmp_path / "sd21")
    assert resolve.base_model_hint({"base_model": str(resolve.models_dir() / "tiny-sd2")}, "sd2") == \
        "Pass --model tiny-sd2 (the tiny model it was trained on)."
    assert resolve.base_model_hint({"base_model": str(model)}, "sd2") == f"Pass --model {model} (the model it was trained on)."
    assert "--model stabilityai/stable-diffusion-2-1 " in resolve.base_model_hint(
        {"base_model": "stabilityai/stable-diffusion-2-1"}, "sd2")
    hint = resolve.base_model_hint({"base_model": str(tmp_path / "gone"), "sd_checkpoint_name": "v1-5-pruned"}, "sd1")
    assert hint.startswith("It was trained on v1-5-pruned (A1111's checkpoint name)")
    assert resolve.base_model_hint({}, "sd1") is None


def test_on_an_accelerator_its_memory_is_the_limit(tmp_path):
    from textinv_cli.engine.contract import BackendInfo

    class OnGpu:
        def probe(self):
            return BackendInfo("fake", devices=["cuda:0 small"], details={checks.GPU_MEMORY: str(200 * 2**20)})

    class OnCpu:
        def probe(self):
            return BackendInfo("fake", devices=["cpu"])

    assert checks.available_memory(OnGpu()) == 200 * 2**20
    assert checks.available_memory(OnCpu()) == checks.available_memory()
    model = str(fake_model(tmp_path / "m"))
    with pytest.raises(OptionError, match=r"0\.2 GiB is available"):  # 1024^2 x 32 x 12 bytes: 384 MiB
        checks.check_size(1024, 1024, model, flag="--size", backend=OnGpu())


def test_sample_says_a_family_mismatch_before_any_backend(cli, tmp_path, no_backend):
    src = tmp_path / "two-toy.safetensors"
    formats.write_embedding(random_embedding("<two-toy>", "sd2"), src, "safetensors")
    assert cli("import", src).exit_code == 0
    model = tiny_with_tokenizer(tmp_path / "m")
    r = cli("sample", "a <two-toy> on a table", "--model", model, "-o", tmp_path / "s")
    assert r.exit_code == 1 and "is a Stable Diffusion 2.x embedding but m is Stable Diffusion 1.x" in r.stderr
