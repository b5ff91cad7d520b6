"""--clip-skip (A1111's "Clip skip"): training conditions on the layer sampling uses, the
same tensor diffusers' pipeline computes with clip_skip N-1; recorded in the run, the
embedding's metadata and the PNG parameters, and read back by --params-from."""

from __future__ import annotations

import json

import pytest

from textinv_cli.engine.checks import check_train_backend, check_train_spec
from textinv_cli.engine.infotext import sample_options
from textinv_cli.errors import TextinvError
from tests.support.training import train_spec

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_training_conditions_on_what_the_pipeline_samples_with(tiny_model, family):
    from diffusers import DiffusionPipeline

    from textinv_torch.loading import load_text_side
    from textinv_torch.step import encode_text

    model = tiny_model(family)
    comp = load_text_side(str(model))
    from textinv_cli.engine.spec import SampleRequest
    from textinv_torch.sampling import _clip_skip_ready

    pipe = DiffusionPipeline.from_pretrained(str(model))
    _clip_skip_ready(pipe, SampleRequest(prompt="", model="", out_dir="", clip_skip=2))  # as sampling does
    prompt = "a photo of a red toy"
    ids = [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in comp.tokenizers]
    for skip in (1, 2, 3):
        comp.clip_skip = skip
        with torch.no_grad():
            ours, _ = encode_text(comp, ids)
            kw = {"clip_skip": skip - 1} if skip > 1 else {}
            theirs = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False, **kw)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    comp.clip_skip = 1
    with torch.no_grad():
        last = encode_text(comp, ids)[0]
        comp.clip_skip = 2
        assert not torch.allclose(last, encode_text(comp, ids)[0])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_jax_conditions_as_torch_does(tiny_model, family):
    """The JAX backend's conditioning (training, validation and sampling share it) is the
    torch backend's encode_text, which the test above ties to diffusers' pipelines."""
    jax = pytest.importorskip("jax")
    import numpy as np

    from textinv_jax.clip import split_frozen
    from textinv_jax.loading import load_text_sides
    from textinv_jax.sampling import text_states
    from textinv_jax.tokens import encode
    from textinv_torch.loading import load_text_side
    from textinv_torch.step import encode_text

    model = tiny_model(family)
    comp = load_text_side(str(model))
    texts = load_text_sides(model, family)
    prompt = "a photo of a red toy"
    ids = [encode(t.tokenizer, [prompt]) for t in texts]
    graphs, frozens = zip(*(split_frozen(t.model) for t in texts))
    rows = [np.zeros((0, t.width), np.float32) for t in texts]
    for skip in (1, 2, 3):
        comp.clip_skip = skip
        with torch.no_grad():
            want, added = encode_text(comp, [torch.from_numpy(i) for i in ids])
        got, pooled = text_states(tuple(graphs), list(frozens), rows, ids, clip_skip=skip, dtype=jax.numpy.float32)
        print(f"\n{family} clip skip {skip}: max |diff| {np.abs(np.asarray(got) - want.numpy()).max():.1e}")
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-5)
        if family == "sdxl":
            np.testing.assert_allclose(np.asarray(pooled), added["text_embeds"].numpy(), rtol=0, atol=1e-5)
        else:
            assert pooled is None and added is None


def test_range_and_backend_rules():
    from textinv_cli.engine.contract import Backend
    from textinv_jax.backend import JaxBackend
    from textinv_torch.backend import TorchBackend

    for bad in (0, 13):
        with pytest.raises(TextinvError, match="--clip-skip must be between 1 and 12"):
            check_train_spec(train_spec("d", "m", "r", clip_skip=bad))
    check_train_backend(train_spec("d", "m", "r", clip_skip=2), TorchBackend)
    check_train_backend(train_spec("d", "m", "r", clip_skip=2), JaxBackend)

    class LastLayerOnly(Backend):  # a backend that does not declare it is refused before loading
        name = "other"

    with pytest.raises(TextinvError, match="--clip-skip 2 is for"):
        check_train_backend(train_spec("d", "m", "r", clip_skip=2), LastLayerOnly)


def test_the_png_parameters_carry_it_and_params_from_reads_it():
    found, problems = sample_options("a <x>\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, "
                                     "Model: m, Clip skip: 2")
    assert found["clip_skip"] == 2 and not problems
    assert "clip_skip" not in sample_options("a <x>\nSteps: 20, Seed: 3")[0]


def test_train_and_sample_with_clip_skip(cli, tiny_model, demo_images, tmp_path):
    from PIL import Image

    from textinv_cli.formats import read_embedding

    model = tiny_model("sd1")
    r = cli("train", demo_images, "--token", "<cs-toy>", "--init", "toy", "--model", model, "--steps", "1",
            "--clip-skip", "2", "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["clip_skip"] == 2
    assert read_embedding(tmp_path / "run" / "learned_embeds.safetensors").meta["clip_skip"] == "2"
    r = cli("sample", "a <cs-toy>", "--model", model, "--steps", "2", "--clip-skip", "2", "-o", tmp_path / "out",
            "--json")
    assert r.exit_code == 0, r.output
    (png,) = (tmp_path / "out").glob("*.png")
    assert "Clip skip: 2" in Image.open(png).text["parameters"]
    assert cli("sample", "a <cs-toy>", "--clip-skip", "0").exit_code == 2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_negative_prompt_is_encoded_at_the_clip_skip_layer_too(tiny_model, family):
    """A1111 encodes every text at its Clip skip layer, the negative prompt too; diffusers'
    encode_prompt gives clip_skip to the prompt alone. Sampling's negative conditioning on
    both backends equals training's conditioning of that text at that layer (the path the
    tests above tie to diffusers), SDXL's pooled text too."""
    jax = pytest.importorskip("jax")
    import numpy as np

    from textinv_cli.engine.spec import SampleRequest
    from textinv_cli.families import FAMILY_SLOTS
    from textinv_jax.loading import load_text_sides
    from textinv_jax.sampling import prompt_states
    from textinv_jax.tokens import add_embeddings
    from textinv_torch.loading import load_text_side
    from textinv_torch.sampling import _negative_with_clip_skip, load_pipeline
    from textinv_torch.step import encode_text

    model, negative = tiny_model(family), "blurry, low quality"
    request = SampleRequest(prompt="a toy", model=str(model), out_dir="", negative=negative, clip_skip=2)
    comp = load_text_side(str(model))
    comp.clip_skip = 2
    ids = [tok(negative, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in comp.tokenizers]
    with torch.no_grad():
        want, added = encode_text(comp, ids)

    pipe, _ = load_pipeline(str(model))
    got = _negative_with_clip_skip(pipe, request, "cpu")  # what the torch backend hands the pipeline
    np.testing.assert_allclose(got["negative_prompt_embeds"].numpy(), want.numpy(), rtol=0, atol=1e-5)

    texts = load_text_sides(model, family)
    rows, firsts = add_embeddings(texts, FAMILY_SLOTS[family], [], "m", family)
    context, pooled = prompt_states(model, texts, rows, firsts, request, jax.numpy.float32, jax.device_put)
    np.testing.assert_allclose(np.asarray(context[0]), want.numpy()[0], rtol=0, atol=1e-5)  # [negative, prompt]
    if family == "sdxl":
        np.testing.assert_allclose(got["negative_pooled_prompt_embeds"].numpy(), added["text_embeds"].numpy(),
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(pooled[0]), added["text_embeds"].numpy()[0], rtol=0, atol=1e-5)
    assert _negative_with_clip_skip(pipe, SampleRequest(prompt="a", model="", out_dir="", negative=negative),
                                    "cpu") == {}  # Clip skip 1: diffusers' own path
