"""The samplers on the model's noise schedule, in JAX, torch-free: DDIM, DPM-Solver++ 2M
(with or without Karras sigmas), Euler and Euler ancestral.

    plan = ddim_plan(ddim_config(cfg_dict), steps)     # or dpmpp_2m_plan(dpmpp_2m_config(cfg_dict), steps),
                                                       # euler_plan(euler_config(cfg_dict, ancestral=...), steps)
    x, x0 = dpmpp_2m_step(plan, i, model_output, x, x0)  # one step (sampling.denoise_step), or
    x0 = sample_loop(plan, lambda x, t: unet(x, t), noise)  # jax.lax.fori_loop over the steps

Euler plans start from noise * plan.init_noise_sigma and feed the UNet
model_input(plan, i, x) (x / sqrt(sigma^2 + 1)), as diffusers' pipelines do; for DDIM and
DPM++ both are the identity. Numbers follow diffusers 0.42 (DDIMScheduler,
DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler), which
the tests compare against. A plan is every per-step number the sampler needs, worked out once on the
host in float64 from the same float32 tables diffusers uses (sampler_tables.py, noise_schedule.py); the step
itself is a few fused multiply-adds that jit and scan well. Configs (sampler_tables.py) are read as
`<Scheduler>.from_config(config)` does: keys of the model's scheduler config that the
sampler knows, that sampler's defaults for the rest (a PNDM config without clip_sample gets
DDIM's clip_sample=True, as in diffusers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .sampler_tables import DDIMConfig, DPMSolverConfig, EulerConfig, ddim_timesteps, dpmpp_2m_sigmas, euler_sigmas


# -- plans -------------------------------------------------------------------------------------------

def _pytree(cls):
    """A frozen dataclass as a pytree: array fields are leaves, the rest static (hashable)."""
    data = [f.name for f in dataclasses.fields(cls) if f.metadata.get("array")]
    meta = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("array")]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def _array():
    return dataclasses.field(metadata={"array": True})


@_pytree
@dataclasses.dataclass(frozen=True)
class DDIMPlan:
    """Per-step numbers of a DDIM run (arrays [steps]); pass it into jit as an argument."""

    prediction_type: str
    clip_range: float | None
    timesteps: jax.Array = _array()      # int32, descending
    sqrt_abar: jax.Array = _array()      # sqrt(abar_t)
    sqrt_1m_abar: jax.Array = _array()   # sqrt(1 - abar_t)
    sqrt_abar_prev: jax.Array = _array()
    abar_prev: jax.Array = _array()
    variance: jax.Array = _array()       # DDIM's sigma_t^2 for eta = 1

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    init_noise_sigma = 1.0


def ddim_plan(cfg: DDIMConfig, num_steps: int) -> DDIMPlan:
    """Everything DDIMScheduler.step needs for `num_steps` steps. The previous timestep is
    t - T // steps for every spacing, as diffusers computes it."""
    ts = ddim_timesteps(cfg, num_steps)
    ac = cfg.schedule.alphas_cumprod.astype(np.float64)
    prev = ts - cfg.schedule.num_train_timesteps // num_steps
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))  # noqa: E731
    return DDIMPlan(prediction_type=cfg.schedule.prediction_type,
                    clip_range=float(cfg.clip_sample_range) if cfg.clip_sample else None,
                    timesteps=jnp.asarray(ts.astype(np.int32)), sqrt_abar=f32(np.sqrt(a_t)),
                    sqrt_1m_abar=f32(np.sqrt(1 - a_t)), sqrt_abar_prev=f32(np.sqrt(a_prev)),
                    abar_prev=f32(a_prev), variance=f32(variance))


def ddim_step(plan: DDIMPlan, i, model_output, sample, *, eta=0.0, noise=None):
    """Step i of a DDIM run: x_{t_i} -> x_{t_i - T//steps}. Returns (prev_sample, pred_x0).

    eta > 0 adds eta * sigma_t * noise (pass `noise`, a standard normal like `sample`).
    """
    a, s, ap = plan.sqrt_abar[i], plan.sqrt_1m_abar[i], plan.sqrt_abar_prev[i]
    if plan.prediction_type == "epsilon":
        x0, eps = (sample - s * model_output) / a, model_output
    elif plan.prediction_type == "v_prediction":
        x0, eps = a * sample - s * model_output, a * model_output + s * sample
    else:  # "sample"
        x0, eps = model_output, (sample - a * model_output) / s
    if plan.clip_range is not None:
        x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
    std = eta * jnp.sqrt(plan.variance[i])
    prev = ap * x0 + jnp.sqrt(1 - plan.abar_prev[i] - std ** 2) * eps
    if noise is not None:
        prev = prev + std * noise
    return prev, x0


@_pytree
@dataclasses.dataclass(frozen=True)
class DPMPlan:
    """Per-step numbers of a DPM-Solver++ 2M run (arrays [steps]).

    Step i: x0_i from the model output at sigma_i (alpha_s, sigma_s), then
    x = ratio * x + first * x0_i + second * (x0_i - x0_{i-1}),
    with second = 0 on first-order steps (the first; the last where diffusers lowers it).
    """

    prediction_type: str
    timesteps: jax.Array = _array()
    alpha_s: jax.Array = _array()
    sigma_s: jax.Array = _array()
    ratio: jax.Array = _array()
    first: jax.Array = _array()
    second: jax.Array = _array()

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    init_noise_sigma = 1.0


def dpmpp_2m_plan(cfg: DPMSolverConfig, num_steps: int) -> DPMPlan:
    """Everything DPMSolverMultistepScheduler.step (dpmsolver++, order 2) needs."""
    ts, sig = dpmpp_2m_sigmas(cfg, num_steps)
    sig = sig.astype(np.float64)
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    sigma = sig * alpha
    n = len(ts)
    ratio, first, second = np.zeros(n), np.zeros(n), np.zeros(n)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma
    for i in range(n):
        # exp(-h) with h = lambda_{i+1} - lambda_i, written without h so that sigma = 0 gives 0
        em = (sigma[i + 1] / alpha[i + 1]) / (sigma[i] / alpha[i])
        ratio[i] = sigma[i + 1] / sigma[i]
        first[i] = -alpha[i + 1] * (em - 1.0)
        lower = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                or cfg.final_sigmas_type == "zero")
        if i > 0 and not lower:
            h, h0 = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            r0 = h0 / h
            if cfg.solver_type == "midpoint":
                second[i] = -0.5 * alpha[i + 1] * (em - 1.0) / r0
            else:  # heun
                second[i] = alpha[i + 1] * ((em - 1.0) / h + 1.0) / r0
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))  # noqa: E731
    return DPMPlan(prediction_type=cfg.schedule.prediction_type, timesteps=jnp.asarray(ts.astype(np.int32)),
                   alpha_s=f32(alpha[:n]), sigma_s=f32(sigma[:n]), ratio=f32(ratio), first=f32(first),
                   second=f32(second))


def dpmpp_2m_step(plan: DPMPlan, i, model_output, sample, prev_x0):
    """Step i of a DPM-Solver++ 2M run. `prev_x0` is what the previous step returned as its
    x0 (ignored at i = 0; pass zeros). Returns (prev_sample, x0)."""
    a, s = plan.alpha_s[i], plan.sigma_s[i]
    if plan.prediction_type == "epsilon":
        x0 = (sample - s * model_output) / a
    elif plan.prediction_type == "v_prediction":
        x0 = a * sample - s * model_output
    else:  # "sample"
        x0 = model_output
    prev = plan.ratio[i] * sample + plan.first[i] * x0 + plan.second[i] * (x0 - prev_x0)
    return prev, x0


@_pytree
@dataclasses.dataclass(frozen=True)
class EulerPlan:
    """Per-step numbers of an Euler or Euler ancestral run (arrays [steps]).

    Step i: x0 from the model output at sigma_i, then
    x = x + (x - x0) / sigma_i * (sigma_to_i - sigma_i) + sigma_up_i * noise,
    with sigma_to = sigma_{i+1} and sigma_up = 0 for Euler, and k-diffusion's ancestral split
    of sigma_{i+1} into sigma_down and sigma_up for Euler a. The UNet sees model_input(plan, i, x).
    """

    prediction_type: str
    ancestral: bool
    init_noise_sigma: float               # the pipeline's noise * init_noise_sigma
    timesteps: jax.Array = _array()       # float32 (fractional with Karras sigmas or linspace spacing)
    sigma: jax.Array = _array()
    sigma_to: jax.Array = _array()
    sigma_up: jax.Array = _array()

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def euler_plan(cfg: EulerConfig, num_steps: int) -> EulerPlan:
    """Everything Euler(Ancestral)DiscreteScheduler.step needs (s_churn = 0, as the pipelines call it)."""
    ts, sig = euler_sigmas(cfg, num_steps)
    s_from, s_next = sig[:-1], sig[1:]
    if cfg.ancestral:  # float32 arithmetic, as diffusers
        up = (s_next ** 2 * (s_from ** 2 - s_next ** 2) / s_from ** 2) ** 0.5
        to = (s_next ** 2 - up ** 2) ** 0.5
    else:
        up, to = np.zeros_like(s_from), s_next
    top = np.float32(sig.max())
    init = top if cfg.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))  # noqa: E731
    return EulerPlan(prediction_type=cfg.schedule.prediction_type, ancestral=cfg.ancestral,
                     init_noise_sigma=float(np.float32(init)), timesteps=f32(ts), sigma=f32(s_from),
                     sigma_to=f32(to), sigma_up=f32(up))


def model_input(plan, i, sample):
    """What the UNet sees at step i: x / sqrt(sigma_i^2 + 1) for Euler plans (diffusers'
    scale_model_input), x itself for DDIM and DPM++."""
    if isinstance(plan, EulerPlan):
        return sample / (plan.sigma[i] ** 2 + 1) ** 0.5
    return sample


def euler_step(plan: EulerPlan, i, model_output, sample, noise=None):
    """Step i of an Euler (ancestral) run; model_output is the UNet's at model_input(plan, i, x).
    Euler a needs `noise` (a standard normal like `sample`). Returns (prev_sample, pred_x0)."""
    sigma = plan.sigma[i]
    if plan.prediction_type == "epsilon":
        x0 = sample - sigma * model_output
    elif plan.prediction_type == "v_prediction":
        x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
    else:  # "sample"
        x0 = model_output
    prev = sample + (sample - x0) / sigma * (plan.sigma_to[i] - sigma)
    if plan.ancestral:
        if noise is None:
            raise ValueError("Euler a needs noise for each step")
        prev = prev + noise * plan.sigma_up[i]
    return prev, x0


# -- the loop ------------------------------------------------------------------------------------

def sample_loop(plan: DDIMPlan | DPMPlan | EulerPlan, model_fn: Callable, latents, *, eta=0.0, key=None):
    """Run every step of `plan` from `latents` (already scaled by plan.init_noise_sigma) with
    `model_fn(x, t) -> model output` (t a scalar: int32, float32 for Euler plans;
    classifier-free guidance, if any, belongs inside model_fn). Returns the final sample.

    jax.lax.fori_loop, so the UNet is traced once whatever the step count. DDIM with
    eta > 0 and Euler a need `key` (fresh noise per step, fold_in(key, i)). Under jit, let model_fn
    close over *traced* params (jit a function that takes them as an argument and calls
    sample_loop inside): concrete arrays closed over become constants that XLA folds, which
    took minutes for an SD-sized UNet on a GPU.
    """
    latents = jnp.asarray(latents, jnp.float32)
    if isinstance(plan, DDIMPlan):
        if key is None and not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError("DDIM with eta > 0 needs a PRNG key")

        def body(i, x):
            out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
            noise = None if key is None else jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            return ddim_step(plan, i, out, x, eta=eta, noise=noise)[0]

        return jax.lax.fori_loop(0, plan.steps, body, latents)
    if isinstance(plan, DPMPlan):
        def body(i, carry):
            x, prev_x0 = carry
            out = model_fn(x, plan.timesteps[i]).astype(jnp.float32)
            return dpmpp_2m_step(plan, i, out, x, prev_x0)

        return jax.lax.fori_loop(0, plan.steps, body, (latents, jnp.zeros_like(latents)))[0]
    if isinstance(plan, EulerPlan):
        if plan.ancestral and key is None:
            raise ValueError("Euler a needs a PRNG key")

        def body(i, x):
            out = model_fn(model_input(plan, i, x), plan.timesteps[i]).astype(jnp.float32)
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if plan.ancestral else None
            return euler_step(plan, i, out, x, noise)[0]

        return jax.lax.fori_loop(0, plan.steps, body, latents)
    raise TypeError(f"not a sampler plan: {type(plan).__name__}")
