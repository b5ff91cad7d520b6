"""The DDPM noise schedule and the training-side maths in JAX, torch-free:

    sched = noise_schedule(config)                      # the model's scheduler_config.json, as a dict
    ac = jnp.asarray(sched.alphas_cumprod)              # float32 [num_train_timesteps]
    noisy = add_noise(ac, latents, noise, t)
    target = training_target(sched.prediction_type, ac, latents, noise, t)   # noise, or v

Numbers follow diffusers 0.42 (DDPMScheduler), which the tests compare against. The betas
and alphas_cumprod tables reproduce torch's bit for bit (see _linspace_f32), so a JAX and a
torch training step see the same noise levels. Configs are read as
`<Scheduler>.from_config(config)` does: the keys the class knows (config_fields), its
defaults for the rest. The samplers built on this schedule are in samplers.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from textinv_cli.errors import TextinvError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# -- the schedule ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """DDPM betas as a diffusers scheduler config describes them (DDPMScheduler's defaults)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"          # linear | scaled_linear (SD) | squaredcos_cap_v2
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"       # epsilon | v_prediction | sample
    rescale_betas_zero_snr: bool = False

    @property
    def betas(self) -> np.ndarray:
        return _betas(self)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """float32 [num_train_timesteps], equal to diffusers': alphas = 1 - betas in float32,
        their running product accumulated in float64 (as torch's CPU cumprod does)."""
        alphas = np.float32(1.0) - self.betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: float32 endpoints and step,
    the first half counted up from start and the second down from end, each product-sum
    rounded once (torch's CPU kernel compiles it to a fused multiply-add)."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i)).astype(np.float32)


def _betas(s: NoiseSchedule) -> np.ndarray:
    n = s.num_train_timesteps
    if s.trained_betas is not None:
        betas = np.asarray(s.trained_betas, np.float32)
    elif s.beta_schedule == "linear":
        betas = _linspace_f32(s.beta_start, s.beta_end, n)
    elif s.beta_schedule == "scaled_linear":  # latent diffusion's: linear in sqrt(beta)
        betas = _linspace_f32(s.beta_start ** 0.5, s.beta_end ** 0.5, n) ** 2
    elif s.beta_schedule == "squaredcos_cap_v2":  # improved DDPM's cosine schedule
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise TextinvError(f"Unknown beta_schedule {s.beta_schedule!r} in the scheduler config.",
                           "Supported: linear, scaled_linear, squaredcos_cap_v2.")
    if s.rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    return betas


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr (arXiv 2305.08891, Algorithm 1), in float32."""
    bar = np.sqrt(np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32))
    first, last = bar[0].copy(), bar[-1].copy()
    bar = (bar - last) * (first / (first - last))
    bar = bar ** 2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def config_fields(cls, config: Mapping, **defaults) -> dict:
    """The config keys `cls` has, the way from_config keeps only its own parameters."""
    names = {f.name for f in dataclasses.fields(cls)} - {"schedule"}
    out = {k: v for k, v in config.items() if k in names}
    for k, v in defaults.items():
        out.setdefault(k, v)
    return out


def noise_schedule(config: Mapping) -> NoiseSchedule:
    """The training schedule of a scheduler config (any class's: PNDM, DDIM, Euler... all
    carry the betas and prediction type), read as DDPMScheduler.from_config(config)."""
    kw = config_fields(NoiseSchedule, config)
    if kw.get("trained_betas") is not None:
        kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
    s = NoiseSchedule(**kw)
    if s.prediction_type not in PREDICTION_TYPES:
        raise TextinvError(f"The scheduler config's prediction_type {s.prediction_type!r} is not one of "
                           f"{', '.join(PREDICTION_TYPES)}.")
    s.betas  # noqa: B018  (validates beta_schedule now, not at first use)
    return s


# -- training ------------------------------------------------------------------------------------

def _per_sample(values, x):
    """alphas_cumprod[t] ([B]) shaped to broadcast against x ([B, ...])."""
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def add_noise(alphas_cumprod, original, noise, timesteps):
    """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (DDPMScheduler.add_noise)."""
    abar = _per_sample(jnp.asarray(alphas_cumprod)[timesteps], original)
    return jnp.sqrt(abar) * original + jnp.sqrt(1 - abar) * noise


def get_velocity(alphas_cumprod, sample, noise, timesteps):
    """The v-prediction target: sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (DDPMScheduler.get_velocity)."""
    abar = _per_sample(jnp.asarray(alphas_cumprod)[timesteps], sample)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * sample


def training_target(prediction_type: str, alphas_cumprod, original, noise, timesteps):
    """What the UNet is trained to output: the noise (epsilon), v (v_prediction) or x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(alphas_cumprod, original, noise, timesteps)
    if prediction_type == "sample":
        return original
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
