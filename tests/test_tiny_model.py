"""The tiny-model factory writes real diffusers models that load offline and run, per family.

Models are written once per module (about a second each); the pipelines run 2 steps at
64 px. Everything here is local: HF_HUB_OFFLINE is set by conftest and every load passes
local_files_only=True.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from textinv_cli.engine.captions import OBJECT_TEMPLATES, STYLE_TEMPLATES
from textinv_cli.errors import OutputExistsError, TextinvError
from textinv_cli.models.demo_images import write_demo_images
from textinv_cli.models.tiny import FAMILIES, TINY_WIDTHS, read_tiny_info
from textinv_cli.models.tiny_tokenizer import INIT_WORDS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from textinv_torch.tiny import write_tiny_model  # noqa: E402

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
TOKENIZERS = {"sd1": ("tokenizer",), "sd2": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny_model(base / f, f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def pipes(models):
    diffusers.utils.logging.disable_progress_bar()
    return {f: PIPELINES[f].from_pretrained(p, local_files_only=True) for f, p in models.items()}


def _tok(models, family, sub="tokenizer"):
    return CLIPTokenizer.from_pretrained(models[family] / sub, local_files_only=True)


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_loads_offline_and_runs(pipes, family):
    pipe = pipes[family]
    assert type(pipe) is PIPELINES[family]
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    out = pipe("a photo of a toy", num_inference_steps=2, height=64, width=64, output_type="np", generator=gen)
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()
    assert pipe.vae_scale_factor == 8  # the real factor: 64 px -> 8x8 latents


def test_families_differ_as_the_real_ones_do(pipes):
    sd1, sd2, xl = pipes["sd1"], pipes["sd2"], pipes["sdxl"]
    assert sd1.text_encoder.config.hidden_size == TINY_WIDTHS["clip_l"] == 32
    assert sd2.text_encoder.config.hidden_size == TINY_WIDTHS["clip_h"] == 48
    assert xl.text_encoder.config.hidden_size == TINY_WIDTHS["clip_l"]
    assert xl.text_encoder_2.config.hidden_size == TINY_WIDTHS["clip_g"] == 64
    assert len(set(TINY_WIDTHS.values())) == 3

    assert sd1.text_encoder.config.hidden_act == "quick_gelu"
    assert sd2.text_encoder.config.hidden_act == "gelu"
    assert sd1.scheduler.config.prediction_type == "epsilon"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert xl.scheduler.config.prediction_type == "epsilon"
    for p in (sd1, sd2, xl):
        c = p.scheduler.config
        assert (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)

    assert not sd1.unet.config.use_linear_projection and sd2.unet.config.use_linear_projection
    assert sd1.unet.config.cross_attention_dim == 32 and sd2.unet.config.cross_attention_dim == 48
    assert xl.unet.config.cross_attention_dim == 32 + 64
    assert xl.unet.config.addition_embed_type == "text_time"
    assert xl.unet.add_embedding.linear_1.in_features == 6 * 8 + xl.text_encoder_2.config.projection_dim
    assert xl.config.force_zeros_for_empty_prompt is True
    assert sd1.vae.config.scaling_factor == 0.18215 and xl.vae.config.scaling_factor == 0.13025
    assert sd1.safety_checker is None and sd1.feature_extractor is None


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizers_are_complete_and_match_their_encoders(models, pipes, family):
    encoders = {"tokenizer": pipes[family].text_encoder}
    if family == "sdxl":
        encoders["tokenizer_2"] = pipes[family].text_encoder_2
    template_words = {w for t in OBJECT_TEMPLATES + STYLE_TEMPLATES for w in re.findall(r"[a-z]+", t)}
    for sub in TOKENIZERS[family]:
        tok = _tok(models, family, sub)
        assert tok.model_max_length == 77
        cfg = encoders[sub].config
        assert cfg.vocab_size == len(tok)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                          tok.pad_token_id)
        for word in (*INIT_WORDS, *sorted(template_words), "backpack", "beach"):
            assert len(tok.encode(word, add_special_tokens=False)) == 1, word
        # SD 1.x pads with <|endoftext|>; OpenCLIP tokenizers (SD 2.x, SDXL's second) with "!"
        openclip = family == "sd2" or sub == "tokenizer_2"
        assert tok.pad_token == ("!" if openclip else "<|endoftext|>")


def test_any_text_tokenizes_without_unknowns(models):
    tok = _tok(models, "sd1")
    for text in ("zebra", "Übermaß ☃ 42", "a photo of a xylophone"):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids and tok.unk_token_id not in ids, text
    assert len(tok.encode("zebra", add_special_tokens=False)) > 1  # not in the vocabulary: characters
    ids = tok("a photo of a zebra").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a zebra"


def test_text_weights_use_the_sd_checkpoint_keys_and_load(models):
    path = models["sd1"] / "text_encoder"
    stored = load_file(path / "model.safetensors")
    assert all(k.startswith("text_model.") for k in stored)
    loaded = CLIPTextModel.from_pretrained(path, local_files_only=True)
    assert torch.equal(loaded.get_input_embeddings().weight, stored["text_model.embeddings.token_embedding.weight"])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_textual_inversion_loader_accepts_the_tiny_model(pipes, family):
    pipe = pipes[family]
    width = pipe.text_encoder.config.hidden_size
    vec = torch.arange(2 * width, dtype=torch.float32).reshape(2, width) / 100
    n = len(pipe.tokenizer)
    pipe.load_textual_inversion(vec, token="<tiny-concept>")
    try:
        ids = pipe.tokenizer.convert_tokens_to_ids(["<tiny-concept>", "<tiny-concept>_1"])
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vec)
        assert len(pipe.tokenizer) == n + 2
    finally:
        pipe.unload_textual_inversion()
    assert len(pipe.tokenizer) == n


def test_same_seed_same_files_other_seed_other_weights(models, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = write_tiny_model(tmp_path / "again", "sd1", seed=0)
    assert torch.equal(torch.rand(3), expected), "the factory must not move the caller's RNG"
    assert _tree(again) == _tree(models["sd1"])
    other = write_tiny_model(tmp_path / "other", "sd1", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != (again / unet).read_bytes()
    assert (other / "tokenizer/vocab.json").read_bytes() == (again / "tokenizer/vocab.json").read_bytes()


def test_second_call_is_idempotent_and_others_are_refused(models, tmp_path):
    path = models["sd2"]
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    assert write_tiny_model(path, "sd2", seed=0) == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    assert read_tiny_info(path)["family"] == "sd2"

    with pytest.raises(OutputExistsError, match="tiny sd2 model with seed 0"):
        write_tiny_model(path, "sd2", seed=5)
    with pytest.raises(OutputExistsError):
        write_tiny_model(path, "sd1", seed=0)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="other files"):
        write_tiny_model(foreign, "sd1")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(TextinvError, match="Unknown model family"):
        write_tiny_model(tmp_path / "x", "sd3")
    (tmp_path / "empty").mkdir()
    assert read_tiny_info(write_tiny_model(tmp_path / "empty", "sd1"))["seed"] == 0  # an empty folder is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_an_incomplete_model_is_not_taken_for_a_complete_one(tmp_path):
    path = write_tiny_model(tmp_path / "m", "sd1")
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (path / "unet" / "config.json").unlink()
    assert read_tiny_info(path) is None
    with pytest.raises(OutputExistsError):
        write_tiny_model(path, "sd1")


def test_demo_images(tmp_path):
    out = write_demo_images(tmp_path / "cat-toy", n=6, size=64, seed=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:03d}.png" for i in range(6)]
    imgs = {n: Image.open(out / n) for n in names}
    for img in imgs.values():
        img.load()
    modes = {img.mode for img in imgs.values()}
    assert {"RGB", "RGBA", "L"} <= modes
    assert any(img.width != img.height for img in imgs.values())
    assert all(min(img.size) == 64 for img in imgs.values())
    rgba = next(img for img in imgs.values() if img.mode == "RGBA")
    alpha = np.asarray(rgba)[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255  # a subject on transparency
    # the concept is visible: every picture has the toy's red somewhere
    for img in imgs.values():
        if img.mode != "L":
            px = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
            assert ((px[:, 0] > 180) & (px[:, 1] < 80) & (px[:, 2] < 80)).sum() > 20

    assert write_demo_images(out, n=6, size=64, seed=0) == out  # idempotent
    with pytest.raises(OutputExistsError):
        write_demo_images(out, n=6, size=64, seed=1)
    other = write_demo_images(tmp_path / "other", n=6, size=64, seed=1)
    assert (other / "000.png").read_bytes() != (out / "000.png").read_bytes()
    with pytest.raises(TextinvError):
        write_demo_images(tmp_path / "bad", n=0)


def test_marker_records_family_seed_and_widths(models):
    info = json.loads((models["sdxl"] / "textinv-tiny.json").read_text())
    assert info["family"] == "sdxl" and info["seed"] == 0
    assert info["widths"] == {"clip_l": 32, "clip_g": 64}
