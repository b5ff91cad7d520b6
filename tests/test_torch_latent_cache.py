"""Latent caching encodes one 512 px image per VAE call (it set the whole run's peak GPU
memory at batch 8), and that changes nothing the trainer learns from: the cached latent
distributions and the loss trajectory are those of the old batches of 8, up to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from textinv_cli.engine.batch_sizes import encode_batch_size
from textinv_cli.engine.captions import find_images
from textinv_cli.engine.spec import TrainSpec

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from textinv_torch import data as datamod  # noqa: E402
from textinv_torch.backend import TorchBackend  # noqa: E402
from textinv_torch.loading import load_image_side, load_text_side  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: a second thread only adds OpenMP spinning
    yield
    torch.set_num_threads(before)


def test_one_image_per_vae_call_at_512_and_above():
    assert encode_batch_size(512) == 1 and encode_batch_size(768) == 1 and encode_batch_size(1024) == 1
    assert encode_batch_size(256) == 4 and encode_batch_size(64) == 8  # the tiny models' batches, as before


def test_cache_in_batches_of_one_equals_batches_of_eight(tiny_model, demo_images):
    comp = load_image_side(load_text_side(str(tiny_model("sd1"))))
    images, _ = find_images(demo_images)
    args = (images, comp.vae, 128, False, 0.5, torch.device("cpu"))
    one, eight = datamod.latent_cache(*args, batch=1), datamod.latent_cache(*args, batch=8)
    assert one.mean.shape == (2 * len(images), 4, 16, 16) and one.flips == eight.flips == (False, True)
    torch.testing.assert_close(one.mean, eight.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.std, eight.std, rtol=1e-5, atol=1e-5)
    assert torch.equal(one.time_ids, eight.time_ids)
    assert (one.mean[0] - one.mean[1]).abs().max() > 1e-2  # an image and its flip: entries are distinct


def test_loss_trajectory_is_unchanged(tiny_model, demo_images, tmp_path, monkeypatch):
    def run(batch: int, name: str) -> tuple[list[float], np.ndarray]:
        monkeypatch.setattr(datamod, "encode_batch_size", lambda resolution: batch)
        spec = TrainSpec(data_dir=str(demo_images), token="<cat-toy>", init=["toy"], model=str(tiny_model("sd1")),
                         run_dir=str(tmp_path / name), steps=4, checkpoint_every=0, seed=3, lr=5e-2,
                         resolution=128, extra={"device": "cpu"})
        events = list(TorchBackend().train(spec))
        assert events[-1].kind == "finished"
        losses = [e.data["loss"] for e in events if e.kind == "progress" and "loss" in e.data]
        return losses, events[-1].data["vectors"]["clip_l"]

    (losses_one, rows_one), (losses_eight, rows_eight) = run(1, "one"), run(8, "eight")
    assert len(losses_one) == 4
    np.testing.assert_allclose(losses_one, losses_eight, rtol=1e-5, atol=1e-7)
    # the rows integrate every step's gradient, so they see a latent change the loss hides
    np.testing.assert_allclose(rows_one, rows_eight, rtol=1e-5, atol=1e-6)
