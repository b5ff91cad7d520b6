"""scan() (models/checkpoints/reader.py, identify.py): each family told by its keys, EMA, VAE
and variant reported, the prediction a file or its A1111 sidecar .yaml states, and the files
it must refuse, each said as what it is with the command that fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.checkpoint_files import ldm, write_checkpoint
from textinv_cli.errors import FormatError
from textinv_cli.models.checkpoints.reader import scan


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("family, widths, slots", [
    ("sd1", None, {"clip_l": 768}), ("sd2", None, {"clip_h": 1024}), ("sdxl", None, {"clip_l": 768, "clip_g": 1280}),
    ("sd1", (32,), {"clip_l": 32}), ("sd2", (48,), {"clip_h": 48}), ("sdxl", (32, 64), {"clip_l": 32, "clip_g": 64}),
])
def test_scan_tells_each_family_by_its_keys(tmp_path, suffix, family, widths, slots):
    info = scan(write_checkpoint(tmp_path / f"m{suffix}", ldm(family, widths)))
    assert (info.family, info.widths, info.kind) == (family, slots, suffix[1:])
    assert info.has_vae and not info.has_ema and info.variant == "fp16" and info.prediction is None
    assert any("not a full-size model" in n for n in info.notes) == (widths is not None)


def test_scan_reports_ema_vae_and_variant(tmp_path):
    info = scan(write_checkpoint(tmp_path / "m.safetensors", ldm("sd1", vae=False, ema=True, dtype=np.float32)))
    assert (info.has_vae, info.has_ema, info.variant) == (False, True, "fp32")
    counters = ldm("sd1") | {"model_ema.decay": np.zeros((), np.float32),
                             "model_ema.num_updates": np.zeros((), np.int32)}
    assert not scan(write_checkpoint(tmp_path / "p.safetensors", counters)).has_ema  # a pruned file's counters only


@pytest.mark.parametrize("tensors, needle, hint", [
    ({k.replace("embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "embedders.0.model.token_embedding.weight").replace("embedders.1.", "embedders.0."): v
      for k, v in ldm("sdxl").items()}, "SDXL refiner", "sd_xl_base_1.0"),
    (ldm("sd1", in_channels=9), "inpainting", "base model"),
    (ldm("sd2", in_channels=8), "instruct-pix2pix", "base model"),
    ({"lora_unet_down_blocks_0.lora_down.weight": np.zeros((4, 8), np.float32)}, "LoRA", "textinv import"),
    ({"emb_params": np.zeros((2, 768), np.float32)}, "Textual Inversion embedding", "textinv import"),
    ({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32),
      "decoder.conv_out.weight": np.zeros((3, 8, 3, 3), np.float32)}, "a VAE", "--vae"),
    ({k: v for k, v in ldm("sd1").items() if k.startswith("model.")}, "no text encoder", "full checkpoint"),
    (ldm("sd1") | ldm("sdxl"), "mixes", "as it was released"),
    ({"\x1b[31mweird": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}, "\\x1b", "SD 1.x"),
])
def test_scan_refuses_what_it_cannot_train_on_and_says_what_it_is(tmp_path, tensors, needle, hint):
    with pytest.raises(FormatError) as e:
        scan(write_checkpoint(tmp_path / "m.safetensors", tensors))
    assert needle in e.value.message and hint in e.value.hint, str(e.value)
    assert "\x1b" not in str(e.value)


def test_scan_names_an_a1111_embedding_saved_as_pt(tmp_path):
    path = tmp_path / "bad-hands.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)},
                "name": "bad-hands", "step": 1500}, path)
    with pytest.raises(FormatError, match="Textual Inversion embedding") as e:
        scan(path)
    assert f"textinv import {path}" in e.value.hint


@pytest.mark.parametrize("metadata, keys, expected", [
    ({"modelspec.prediction_type": "v"}, {}, "v"),
    ({"modelspec.prediction_type": "v_prediction"}, {}, "v"),
    ({"modelspec.prediction_type": "epsilon"}, {}, "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, "v"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, {}, None),
    ({}, {"v_pred": np.zeros(0, np.float32)}, "v"),
    ({}, {}, None),
])
def test_scan_reads_the_prediction_the_file_states(tmp_path, metadata, keys, expected):
    assert scan(write_checkpoint(tmp_path / "m.safetensors", ldm("sd2") | keys, metadata)).prediction == expected


def test_scan_reads_a1111s_sidecar_yaml(tmp_path):
    path = write_checkpoint(tmp_path / "768-v-ema.ckpt", ldm("sd2"))
    yaml = tmp_path / "768-v-ema.yaml"
    yaml.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
                    "    parameterization: \"v\"\n    linear_start: 0.00085\n")
    info = scan(path)
    assert info.prediction == "v" and any("768-v-ema.yaml" in n for n in info.notes)
    yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert scan(path).prediction == "epsilon"  # a config without it: LDM's default, eps
    yaml.write_text("model: [unclosed\n")
    info = scan(path)
    assert info.prediction is None and any("not valid YAML" in n for n in info.notes)
    yaml.write_text("#" * (65 * 1024))
    assert scan(path).prediction is None
    yaml.write_text("model:\n  params:\n    parameterization: eps\n")
    stated = write_checkpoint(tmp_path / "768-v-ema.safetensors", ldm("sd2"), {"modelspec.prediction_type": "v"})
    info = scan(stated)
    assert info.prediction == "v" and any("the file's word is taken" in n for n in info.notes)
