"""The torch backend's samplers against diffusers' own schedulers, on the tiny model.

tests/test_sampler_names.py checks the name -> scheduler table; this checks the pictures:
`sample` with each A1111 name gives the pixels of a stock diffusers pipeline whose scheduler
was built by hand from diffusers' "A1111/k-diffusion -> Diffusers" table (written out in
tests/support/a1111_samplers.py, not read from engine/samplers.py), for the
same prompt, seed and steps. A wrong class, a dropped Karras flag or a scheduler config not
taken from the model would each change the image.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import torch  # noqa: E402

from tests.support.a1111_samplers import A1111_SCHEDULERS  # noqa: E402
from textinv_cli.engine.spec import SampleRequest  # noqa: E402
from textinv_torch import sampling  # noqa: E402
from textinv_torch.tiny import write_tiny_model  # noqa: E402

A1111 = A1111_SCHEDULERS  # name -> (diffusers class, config over the model's own)
STEPS, SEED, PROMPT = 4, 7, "a toy on a table"


@pytest.fixture(scope="module")
def pipe_and_model(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("parity") / "tiny-sd2", "sd2")  # v-prediction: the harder case
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, str(folder), pipe.scheduler.config  # the model's own config: each reference starts from it


@pytest.mark.parametrize("name", list(A1111))
def test_each_sampler_draws_what_diffusers_draws(name, pipe_and_model, tmp_path):
    cls, extra = A1111[name]
    if name == "DPM++ SDE Karras" and importlib.util.find_spec("torchsde") is None:
        pytest.skip("DPM++ SDE Karras needs torchsde, which is not installed here")
    pipe, model, model_config = pipe_and_model
    list(sampling.sample(SampleRequest(prompt=PROMPT, model=model, out_dir=str(tmp_path), steps=STEPS,
                                       scheduler=name, seed=SEED, guidance=5.0)))
    (png,) = tmp_path.glob("*.png")
    ours = np.asarray(Image.open(png).convert("RGB"), np.int16)

    pipe.scheduler = getattr(diffusers, cls).from_config(model_config, **extra)
    reference = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, width=64, height=64,
                     generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images[0]
    theirs = np.round(reference * 255).astype(np.int16)
    # Same weights, seed and scheduler: equal up to PNG rounding (one level of 255) and float noise.
    assert np.abs(ours - theirs).max() <= 1, name
    assert pipe.scheduler.config.prediction_type == "v_prediction"
