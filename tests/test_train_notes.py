"""What train and sample say before they start: options that are valid but do nothing (or not
what was meant), and that the default tiny model has random weights."""

from __future__ import annotations

import shutil

import pytest

from textinv_cli.engine.checks import train_warnings
from textinv_cli.models.resolve import model_notes
from tests.support.training import train_spec



@pytest.mark.parametrize("change, sidecars, on_gpu, said", [
    ({"validate_every": 5}, None, None, "--validate-every 5 makes no images without --validate"),
    ({"validate": ["a photo of a dog"]}, None, None, "does not contain <cat-toy>"),
    ({"warmup_steps": 7}, None, None, "--warmup-steps 7 is more than --steps 6"),
    ({"captions": "both"}, 0, None, "no image has a .txt caption"),
    ({"precision": "bf16"}, None, False, "--precision bf16 on a CPU"),
])
def test_each_silent_option_gets_a_warning(change, sidecars, on_gpu, said):
    notes = train_warnings(train_spec("data", "model", "run", **change), sidecars=sidecars, on_gpu=on_gpu)
    assert len(notes) == 1 and said in notes[0]


@pytest.mark.parametrize("change, sidecars, on_gpu", [
    ({}, None, None),
    ({"validate": ["a photo of <cat-toy>"], "validate_every": 5}, None, None),
    ({"warmup_steps": 6}, None, None),
    ({"captions": "both"}, 2, None),
    ({"precision": "bf16"}, None, True),
    ({"precision": "fp32"}, None, False),
])
def test_meant_options_get_none(change, sidecars, on_gpu):
    assert train_warnings(train_spec("data", "model", "run", **change), sidecars=sidecars, on_gpu=on_gpu) == []


def test_only_tiny_models_get_the_random_weights_note():
    assert "random weights" in model_notes(None)[0] and "(the default)" in model_notes(None)[0]
    assert "SDXL" in model_notes("tiny-sdxl")[0] and "(the default)" not in model_notes("tiny-sdxl")[0]
    assert model_notes("runwayml/stable-diffusion-v1-5") == [] and model_notes("/models/sd15") == []


def test_train_says_it_before_the_first_step(cli, tiny_model, demo_images, textinv_home, tmp_path):
    pytest.importorskip("torch")
    shutil.copytree(tiny_model("sd1"), textinv_home / "models" / "tiny-sd1")  # the default, already built
    r = cli("train", demo_images, "--token", "<note-toy>", "--init", "toy", "--steps", "1", "--warmup-steps", "3",
            "--validate-every", "1", "--run-dir", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "Warning: --warmup-steps 3 is more than --steps 1" in err
    assert "Warning: --validate-every 1 makes no images" in err
    assert "tiny (the default), a built-in tiny SD1 model with random weights" in err
    assert all(line.startswith("{") for line in r.stdout.splitlines())  # stdout stays JSON lines
