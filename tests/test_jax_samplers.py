"""The JAX backend's Euler, Euler a and DPM++ 2M Karras samplers against diffusers' schedulers,
configured as the torch backend builds them for the same A1111 name (engine/samplers.py):
the sigma and timestep schedules on the tiny models' scheduler configs, and a few steps of
each update rule with a stand-in model (a fixed linear function of the input), Euler a fed
the very noise diffusers draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from textinv_cli.engine import samplers as table  # noqa: E402
from textinv_cli.errors import TextinvError  # noqa: E402
from textinv_jax import sampler_tables, samplers  # noqa: E402
from textinv_jax.sampling import make_plan, step_keys  # noqa: E402

NEW = ("Euler", "Euler a", "DPM++ 2M Karras")


def model_config(tiny_model, family) -> dict:
    return json.loads((Path(tiny_model(family)) / "scheduler" / "scheduler_config.json").read_text())


def torch_scheduler(name, config):
    from textinv_torch.sampling import make_scheduler

    return make_scheduler(name, config)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("spacing", [None, "linspace", "trailing", "zero-snr"])
@pytest.mark.parametrize("name", NEW)
def test_schedules_equal_diffusers(tiny_model, family, spacing, name):
    config = model_config(tiny_model, family)
    if spacing == "zero-snr":  # the zero-terminal-SNR setup: trailing spacing, abar_T = 2^-24
        config.update(timestep_spacing="trailing", rescale_betas_zero_snr=True)
    elif spacing:
        config["timestep_spacing"] = spacing
    for steps in (10, 30):
        ref = torch_scheduler(name, config)
        ref.set_timesteps(steps)
        plan = make_plan(name, config, steps)
        assert plan.steps == steps
        t = np.asarray(plan.timesteps)
        np.testing.assert_allclose(t, ref.timesteps.numpy(), rtol=0, atol=1e-4 if name != "DPM++ 2M Karras" else 0)
        if name == "DPM++ 2M Karras":
            _, sigmas = sampler_tables.dpmpp_2m_sigmas(sampler_tables.dpmpp_2m_config({**config, **table.get(name).config}), steps)
            np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)
            assert plan.init_noise_sigma == ref.init_noise_sigma == 1.0
        else:
            np.testing.assert_allclose(np.asarray(plan.sigma), ref.sigmas.numpy()[:-1], rtol=1e-6)
            np.testing.assert_allclose(plan.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
            if name == "Euler":
                np.testing.assert_allclose(np.asarray(plan.sigma_to), ref.sigmas.numpy()[1:], rtol=1e-6)


def test_karras_sigmas_are_karras_and_euler_follows_a_config_that_asks(tiny_model):
    """DPM++ 2M Karras runs from the table's largest to smallest sigma; an Euler config with
    use_karras_sigmas (some SDXL models ship one) gets Karras sigmas and fractional timesteps, as in diffusers."""
    config = model_config(tiny_model, "sd1")
    ts, sig = sampler_tables.dpmpp_2m_sigmas(sampler_tables.dpmpp_2m_config({**config, "use_karras_sigmas": True}), 10)
    full = sampler_tables._sigma_table(sampler_tables.noise_schedule(config))
    assert sig[0] == pytest.approx(full[-1], rel=1e-6) and sig[-2] == pytest.approx(full[0], rel=1e-6) and sig[-1] == 0
    assert ts[0] == 999 and ts[-1] == 0
    karras = {**config, "use_karras_sigmas": True}
    ref = diffusers.EulerDiscreteScheduler.from_config(karras)
    ref.set_timesteps(12)
    plan = make_plan("euler", karras, 12)
    np.testing.assert_allclose(np.asarray(plan.timesteps), ref.timesteps.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(plan.sigma), ref.sigmas.numpy()[:-1], rtol=1e-6)
    assert not np.allclose(np.asarray(plan.timesteps), np.asarray(make_plan("euler", config, 12).timesteps))


WEIGHTS = np.random.default_rng(1).uniform(-1, 1, (4, 8, 8)).astype(np.float32)


def stand_in(x, t):
    """A fixed 'UNet': linear in its input, depending on the timestep (torch or JAX arrays)."""
    w = torch.from_numpy(WEIGHTS) if isinstance(x, torch.Tensor) else jnp.asarray(WEIGHTS)
    return 0.6 * x + 0.0004 * t * w * x - 0.1


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # epsilon, v_prediction
@pytest.mark.parametrize("name", NEW)
def test_steps_equal_diffusers_step(tiny_model, family, name):
    config = model_config(tiny_model, family)
    steps, run = 10, 6
    ref = torch_scheduler(name, config)
    ref.set_timesteps(steps)
    plan = make_plan(name, config, steps)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * float(ref.init_noise_sigma)  # NCHW for diffusers
    gen = torch.Generator().manual_seed(5)
    xt, xj, prev_x0 = torch.from_numpy(x0), jnp.asarray(x0), jnp.zeros_like(jnp.asarray(x0))
    for i, t in enumerate(ref.timesteps[:run]):
        out_t = stand_in(ref.scale_model_input(xt, t), t.float())
        noise = None
        if name == "Euler a":  # the noise diffusers' step is about to draw, drawn ahead from a copy of its generator
            state = gen.get_state()
            noise = jnp.asarray(torch.randn(xt.shape, generator=gen, dtype=torch.float32).numpy())
            gen.set_state(state)
        xt = ref.step(out_t, t, xt, generator=gen).prev_sample
        out_j = stand_in(samplers.model_input(plan, i, xj), plan.timesteps[i])
        if name == "DPM++ 2M Karras":
            xj, prev_x0 = samplers.dpmpp_2m_step(plan, i, out_j, xj, prev_x0)
        else:
            xj = jax.jit(samplers.euler_step)(plan, i, out_j, xj, noise)[0]
        np.testing.assert_allclose(np.asarray(xj), xt.numpy(), rtol=1e-5, atol=1e-5 * float(ref.init_noise_sigma))


def test_euler_a_loop_needs_a_key_and_each_image_has_its_own_noise(tiny_model):
    plan = make_plan("Euler a", model_config(tiny_model, "sd1"), 4)
    x = jnp.ones((2, 4, 8, 8)) * plan.init_noise_sigma
    with pytest.raises(ValueError, match="key"):
        samplers.sample_loop(plan, stand_in, x)
    loop = jax.jit(samplers.sample_loop, static_argnums=1)
    a = loop(plan, stand_in, x, key=jax.random.key(1))
    b = loop(plan, stand_in, x, key=jax.random.key(2))
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    # the sampler's per-image keys: image j's stream depends on its seed alone
    keys = step_keys([7, 8, 9])
    assert jax.random.key_data(keys[1]).tolist() == jax.random.key_data(step_keys([8])[0]).tolist()
    assert len({tuple(jax.random.key_data(k).tolist()) for k in keys}) == 3


def test_euler_configs_the_jax_samplers_do_not_run_are_refused(tiny_model):
    config = model_config(tiny_model, "sd1")
    with pytest.raises(TextinvError, match="use_exponential_sigmas"):
        make_plan("euler", {**config, "use_exponential_sigmas": True}, 5)
    with pytest.raises(TextinvError, match="interpolation_type"):
        make_plan("euler", {**config, "interpolation_type": "log_linear"}, 5)
    with pytest.raises(TextinvError, match="Euler a"):
        make_plan("euler-a", {**config, "prediction_type": "sample"}, 5)
    with pytest.raises(TextinvError, match="not 'Heun'"):
        make_plan("Heun", config, 5)


@pytest.fixture
def fast_compiles():
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)  # 2 steps: the compiles dominate
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_cli_samples_with_euler_a_each_image_the_same_alone_or_in_a_batch(cli, tiny_model, tmp_path, fast_compiles):
    """`textinv sample --backend jax --scheduler "Euler a"`: its fresh noise comes from each image's
    own seed, so seed 2 gives the same picture second in one batch and first in another (the
    batch's shape kept, so the UNet compiles once); the PNG names the sampler."""
    pytest.importorskip("transformers")
    from PIL import Image

    from textinv_cli.engine import infotext

    model = tiny_model("sd1")
    common = ("--backend", "jax", "--scheduler", "Euler a", "--model", model, "--steps", "2", "-n", "2",
              "--batch-size", "2")
    for seed in (1, 2):
        r = cli("sample", "a toy", *common, "--seed", seed, "-o", tmp_path / str(seed))
        assert r.exit_code == 0, r.output
    first, second = sorted((tmp_path / "1").glob("*.png")), sorted((tmp_path / "2").glob("*.png"))
    assert len(first) == len(second) == 2
    assert "Sampler: Euler a, " in infotext.read_png_parameters(second[0])
    with Image.open(first[1]) as a, Image.open(second[0]) as b, Image.open(second[1]) as c:
        a, b, c = (np.asarray(im.convert("RGB")).astype(int) for im in (a, b, c))
    assert np.abs(a - b).max() <= 3  # batched kernels may round differently (test_jax_sample_batches)
    assert np.abs(a - c).max() > 30
