"""The JAX noise schedule and samplers equal diffusers' DDPM / DDIM / DPM-Solver++ 2M.

Tables (betas, alphas_cumprod), the training-side maths (add_noise, get_velocity) and every
step of a sampling run with a fixed fake model (an affine function of the sample and the
timestep) are compared with diffusers' schedulers built from the same config, for the
spacings SD configs use ("leading" + steps_offset 1) and the others, epsilon and
v-prediction. Configs are read the way the torch backend reads them: the model's scheduler
config (PNDM for SD 1.x, DDIM for SD 2.x) through each sampler class's from_config.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from textinv_cli.errors import TextinvError

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from textinv_jax import noise_schedule as S  # noqa: E402
from textinv_jax import sampler_tables, samplers  # noqa: E402

# diffusers' DPM-Solver builds its sigmas with np.array(tensor), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1)


def on_disk(scheduler) -> dict:
    """A scheduler's config as scheduler_config.json holds it (what both backends read)."""
    return json.loads(scheduler.to_json_string())


def sd1_config() -> dict:
    """What an SD 1.5 folder ships (PNDM): no clip_sample key, so DDIM's default applies."""
    return on_disk(diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False))


def sd2_config(**kw) -> dict:
    """What SD 2.1 ships (DDIM, v-prediction, no clipping)."""
    kw = {"clip_sample": False, "set_alpha_to_one": False, "prediction_type": "v_prediction", **kw}
    return on_disk(diffusers.DDIMScheduler(**SD_BETAS, **kw))


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def fake_model(x, t):
    """A fixed 'UNet': affine in the sample, varying with the timestep (works on numpy, torch, jax)."""
    return 0.8 * x + 0.1 * (t / 1000.0) - 0.05


# -- the schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(SD_BETAS),
    dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD_BETAS, rescale_betas_zero_snr=True),
    dict(num_train_timesteps=10, beta_start=0.001, beta_end=0.2, beta_schedule="scaled_linear"),
])
def test_tables_equal_ddpm_scheduler(kw):
    ref = diffusers.DDPMScheduler(**kw)
    ours = S.noise_schedule(on_disk(ref))
    assert ours.alphas_cumprod.dtype == np.float32
    # Zero-terminal-SNR betas are 1 - (ratio of neighbours): a one-ulp difference in the
    # neighbours moves them by ~1e-7, near the end by ~3e-6; alphas_cumprod is what counts.
    assert maxdiff(ours.betas, ref.betas.numpy()) <= (5e-6 if kw.get("rescale_betas_zero_snr") else 1e-6)
    # (bit-identical here for linear/scaled_linear; not asserted, as it rests on torch's
    # CPU kernels rounding the same way on every machine)
    assert maxdiff(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) <= 1e-6


def test_schedule_read_like_ddpm_from_config():
    for config in (sd1_config(), sd2_config()):
        ref = diffusers.DDPMScheduler.from_config(config)
        ours = S.noise_schedule(config)
        assert ours.prediction_type == ref.config.prediction_type
        assert (ours.beta_start, ours.beta_end, ours.beta_schedule) == (
            ref.config.beta_start, ref.config.beta_end, ref.config.beta_schedule)
    assert S.noise_schedule({}) == S.NoiseSchedule()  # DDPMScheduler's defaults
    with pytest.raises(TextinvError, match="beta_schedule"):
        S.noise_schedule({"beta_schedule": "sigmoid-ish"})
    with pytest.raises(TextinvError, match="prediction_type"):
        S.noise_schedule({"prediction_type": "flow_prediction"})


def test_add_noise_and_velocity_equal_diffusers():
    ref = diffusers.DDPMScheduler(**SD_BETAS, prediction_type="v_prediction")
    ac = jnp.asarray(S.noise_schedule(on_disk(ref)).alphas_cumprod)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    assert maxdiff(S.add_noise(ac, x0, noise, t), ref.add_noise(tx, tn, tt).numpy()) <= 1e-6
    v = ref.get_velocity(tx, tn, tt).numpy()
    assert maxdiff(S.get_velocity(ac, x0, noise, t), v) <= 1e-6
    assert maxdiff(S.training_target("v_prediction", ac, x0, noise, t), v) <= 1e-6
    assert S.training_target("epsilon", ac, x0, noise, t) is noise
    # jit- and grad-friendly (the trainer calls these inside its step)
    jitted = jax.jit(S.add_noise)(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert maxdiff(jitted, ref.add_noise(tx, tn, tt).numpy()) <= 1e-6
    with pytest.raises(ValueError):
        S.training_target("flow", ac, x0, noise, t)


# -- DDIM ------------------------------------------------------------------------------------------

def _run_torch(scheduler, steps: int, x: np.ndarray, **step_kw):
    scheduler.set_timesteps(steps)
    out, sample = [], torch.from_numpy(x)
    for t in scheduler.timesteps:
        sample = scheduler.step(fake_model(sample, float(t)), t, sample, **step_kw).prev_sample
        out.append(sample.numpy().copy())
    return scheduler.timesteps.numpy(), out


DDIM_CASES = [  # (config, steps): SD 1.x (leading+offset, clip_sample from DDIM's default) and SD 2.x
    (sd1_config(), 7),
    (sd2_config(), 7),
    (sd2_config(timestep_spacing="trailing"), 6),
    (sd2_config(timestep_spacing="linspace", prediction_type="epsilon"), 5),
    (dict(sd2_config(), set_alpha_to_one=True, clip_sample=True, clip_sample_range=0.5), 4),
]


@pytest.mark.parametrize("config,steps", DDIM_CASES)
def test_ddim_steps_equal_diffusers(config, steps):
    ref = diffusers.DDIMScheduler.from_config(config)
    cfg = sampler_tables.ddim_config(config)
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.timestep_spacing, cfg.steps_offset) == (
        ref.config.clip_sample, ref.config.set_alpha_to_one, ref.config.timestep_spacing, ref.config.steps_offset)
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32) * 3
    ts, want = _run_torch(ref, steps, x)
    plan = samplers.ddim_plan(cfg, steps)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ts)
    sample = jnp.asarray(x)
    for i, t in enumerate(ts):
        sample, _ = samplers.ddim_step(plan, i, fake_model(sample, float(t)), sample)
        assert maxdiff(sample, want[i]) <= 1e-5, f"step {i} (t={t})"
    final = jax.jit(samplers.sample_loop, static_argnums=1)(plan, fake_model, jnp.asarray(x))
    assert maxdiff(final, want[-1]) <= 1e-5


def test_ddim_eta_with_given_noise_equals_diffusers():
    config = sd2_config()
    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(5)
    plan = samplers.ddim_plan(sampler_tables.ddim_config(config), 5)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
    sample, ours = torch.from_numpy(x), jnp.asarray(x)
    for i, t in enumerate(ref.timesteps):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        sample = ref.step(fake_model(sample, float(t)), t, sample, eta=0.7, variance_noise=torch.from_numpy(noise)).prev_sample
        ours, _ = samplers.ddim_step(plan, i, fake_model(ours, float(t)), ours, eta=0.7, noise=jnp.asarray(noise))
        assert maxdiff(ours, sample.numpy()) <= 1e-5
    # the loop draws its own noise per step from the key: deterministic, and different from eta=0
    loop = jax.jit(samplers.sample_loop, static_argnums=1)
    a = loop(plan, fake_model, jnp.asarray(x), eta=0.7, key=jax.random.key(0))
    b = loop(plan, fake_model, jnp.asarray(x), eta=0.7, key=jax.random.key(0))
    c = loop(plan, fake_model, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert maxdiff(a, c) > 1e-3
    with pytest.raises(ValueError, match="key"):
        samplers.sample_loop(plan, fake_model, x, eta=0.5)


# -- DPM-Solver++ 2M -------------------------------------------------------------------------------

DPM_CASES = [  # (config, extra settings, steps)
    (sd1_config(), {}, 6),                                   # what the torch backend's "dpm++" builds for SD 1.x
    (sd2_config(), {}, 6),                                   # ... and for SD 2.x (v-prediction)
    (sd2_config(timestep_spacing="trailing"), {}, 5),
    (sd2_config(timestep_spacing="linspace", prediction_type="epsilon"), {}, 5),
    (sd1_config(), {"final_sigmas_type": "sigma_min"}, 16),  # last step second order (>= 15 steps)
    (sd1_config(), {"final_sigmas_type": "sigma_min"}, 6),   # ... lowered to first order (< 15)
    (sd2_config(), {"solver_type": "heun"}, 5),
    (sd1_config(), {"lambda_min_clipped": -2.0}, 5),          # drops the noisiest timesteps
]


@pytest.mark.parametrize("config,extra,steps", DPM_CASES)
def test_dpmpp_2m_steps_equal_diffusers(config, extra, steps):
    config = {**config, **extra}
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    x = np.random.default_rng(3).standard_normal((2, 4, 4, 4)).astype(np.float32) * 3
    ts, want = _run_torch(ref, steps, x)
    plan = samplers.dpmpp_2m_plan(sampler_tables.dpmpp_2m_config(config), steps)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ts)
    sample, prev_x0 = jnp.asarray(x), jnp.zeros_like(jnp.asarray(x))
    for i, t in enumerate(ts):
        sample, prev_x0 = samplers.dpmpp_2m_step(plan, i, fake_model(sample, float(t)), sample, prev_x0)
        assert maxdiff(sample, want[i]) <= 1e-5, f"step {i} (t={t})"
    final = jax.jit(samplers.sample_loop, static_argnums=1)(plan, fake_model, jnp.asarray(x))
    assert maxdiff(final, want[-1]) <= 1e-5


def test_sampler_configs_refuse_what_they_do_not_do():
    with pytest.raises(TextinvError, match="use_exponential_sigmas"):  # Karras sigmas: test_jax_samplers.py
        sampler_tables.dpmpp_2m_config({**sd1_config(), "use_exponential_sigmas": True})
    with pytest.raises(TextinvError, match="thresholding"):
        sampler_tables.ddim_config({**sd1_config(), "thresholding": True})
    cfg = sampler_tables.ddim_config(sd1_config())
    for bad in (0, 1001, 2.5):
        with pytest.raises(TextinvError, match="steps"):
            samplers.ddim_plan(cfg, bad)
    with pytest.raises(TextinvError, match="timestep_spacing"):
        samplers.ddim_plan(sampler_tables.ddim_config({**sd1_config(), "timestep_spacing": "sideways"}), 5)
    with pytest.raises(TypeError):
        samplers.sample_loop("ddim", fake_model, np.zeros((1, 2, 2, 4), np.float32))


def test_plans_are_pytrees_with_static_settings():
    plan = samplers.dpmpp_2m_plan(sampler_tables.dpmpp_2m_config(sd2_config()), 4)
    leaves, tree = jax.tree_util.tree_flatten(plan)
    assert len(leaves) == 6 and all(leaf.shape == (4,) for leaf in leaves)
    assert jax.tree_util.tree_unflatten(tree, leaves).prediction_type == "v_prediction"
    assert not math.isfinite(sampler_tables.dpmpp_2m_config(sd1_config()).lambda_min_clipped)
