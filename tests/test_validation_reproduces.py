"""A validation image's PNG parameters reproduce it: `sample --params-from` on the image a run
drew at its last step gives the same picture (the run's embedding is that step's, registered
under its token). This holds the backends' validation to the settings the PNG records (DDIM,
CFG 7.5, the seed, the size): SDXL's pipeline would otherwise draw at its own default CFG 5.0."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.mark.parametrize("family, backend", [("sd1", "torch"), ("sdxl", "torch"),
                                             pytest.param("sd1", "jax", marks=pytest.mark.slow)])
def test_sample_params_from_a_validation_image_draws_it_again(cli, tiny_model, demo_images, tmp_path, family, backend):
    if backend == "jax":
        pytest.importorskip("jax")
    token = f"<val-{family}-{backend}>"
    r = cli("train", demo_images, "--token", token, "--init", "toy", "--model", tiny_model(family), "--steps", "1",
            "--validate", f"a photo of {token}", "--run-dir", tmp_path / "run", "--backend", backend)
    assert r.exit_code == 0, r.output
    (png,) = (tmp_path / "run" / "samples").glob("step-000001-0.png")
    assert "CFG scale: 7.5" in Image.open(png).text["parameters"]
    r = cli("sample", "--params-from", png, "--model", tiny_model(family), "-o", tmp_path / "again",
            "--backend", backend)
    assert r.exit_code == 0, r.output
    (again,) = (tmp_path / "again").glob("*.png")
    drawn = np.asarray(Image.open(png).convert("RGB"), np.int16)
    redrawn = np.asarray(Image.open(again).convert("RGB"), np.int16)
    assert drawn.shape == redrawn.shape and np.abs(drawn - redrawn).max() <= 2  # float noise of two code paths
