"""The eval loss on the fixed evaluation batch (engine/eval_batch.py) on the real backends and
the tiny model: it falls as the rows train, it leaves training bit-identical, and the JAX
backend reads the same number as torch for the same rows (the same draws, the same model)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.training import assert_same, final_vectors, run_all, train_spec
from textinv_cli.engine.batch_plan import BatchPlan
from textinv_cli.engine.eval_batch import EVAL_SAMPLES, eval_draw

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from textinv_torch.backend import TorchBackend  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: a second thread only spins
    yield
    torch.set_num_threads(before)


def spec_for(tiny_model, demo_images, tmp_path, name, **kw):
    return train_spec(demo_images, tiny_model("sd1"), tmp_path / name, **{"steps": 2, "device": "cpu",
                                                                          "deterministic": True, **kw})


def evals_of(events) -> list[tuple[int, float]]:
    return [(e.data["step"], e.data["loss"]) for e in events if e.kind == "eval"]


def test_the_eval_batch_is_fixed_and_apart_from_training_draws():
    a, b = (eval_draw(3, 4, (4, 8, 8), 1000) for _ in range(2))
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("images", "eps", "noise", "timesteps"))
    assert sorted(a.timesteps) == [62, 187, 312, 437, 562, 687, 812, 937]  # evenly spread noise levels
    assert sorted(a.images) == [0, 0, 1, 1, 2, 2, 3, 3]  # every image, as often as the others
    train = BatchPlan(seed=3, n_images=4, batch_size=EVAL_SAMPLES, grad_accum=1, latent_shape=(4, 8, 8),
                      num_timesteps=1000).draw(0, 0)
    assert not np.array_equal(a.noise, train.noise)  # its own stream, not step 0's
    assert not np.array_equal(eval_draw(4, 4, (4, 8, 8), 1000).noise, a.noise)  # drawn from the seed


def test_eval_loss_falls_on_the_tiny_model_and_training_stays_bit_identical(tiny_model, demo_images, tmp_path):
    plain = run_all(TorchBackend(), spec_for(tiny_model, demo_images, tmp_path, "plain"))
    watched = run_all(TorchBackend(), spec_for(tiny_model, demo_images, tmp_path, "watched", eval_every=1))
    evals = evals_of(watched)
    assert [s for s, _ in evals] == [0, 1, 2]
    assert evals[-1][1] < evals[0][1] - 1e-4, evals  # the same batch, better rows: a lower loss
    assert_same(final_vectors(plain), final_vectors(watched))
    losses = [[e.data.get("loss") for e in ev if e.kind == "progress"] for ev in (plain, watched)]
    assert losses[0] == losses[1]
    told = watched[-1].data["summary"]
    assert (told["eval_first"], told["eval_last"]) == (evals[0][1], evals[-1][1])


def test_jax_reads_the_same_eval_loss_as_torch(tiny_model, demo_images, tmp_path):
    """The init rows' eval loss from both sessions, loaded as the engine loads them (only the
    eval's forward pass compiles: a training step's would cost the test budget)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    from textinv_cli.engine.captions import captions_for, find_images
    from textinv_jax.backend import JaxBackend

    spec = spec_for(tiny_model, demo_images, tmp_path, "run")
    images, _ = find_images(demo_images)
    captions = captions_for(images, spec.token, spec.property, spec.captions)
    got = {}
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)  # halves the compile; one tiny forward
    try:
        for backend in (TorchBackend(), JaxBackend()):
            session = backend.open_session(spec)
            with session.running():
                session.load(images, captions)
                got[backend.name] = session.eval_loss()
                assert session.eval_loss() == got[backend.name]  # the same batch every time
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    assert got["jax"] == pytest.approx(got["torch"], rel=1e-4)
