"""What a JAX sampler is configured with, and the per-step tables it follows, on the host in
NumPy: the configs read from a model's scheduler config (as `<Scheduler>.from_config` reads
it), sigmas (Karras too) and timesteps of DDIM, DPM-Solver++ 2M and Euler, as diffusers 0.42
computes them. samplers.py turns them into plans and steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from textinv_cli.errors import TextinvError

from .noise_schedule import NoiseSchedule, config_fields, noise_schedule


# -- sampler configs ------------------------------------------------------------------------------

_OFF = {"thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None,
        "use_dynamic_shifting": False}


def _refuse(config: Mapping, keys) -> None:
    for key in keys:
        if config.get(key, _OFF[key]) != _OFF[key]:
            raise TextinvError(f"The scheduler config sets {key}={config[key]!r}, which the JAX samplers do not "
                               "support.", "Use --backend torch for this model.")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """DDIMScheduler's settings (its defaults where a config is silent)."""

    schedule: NoiseSchedule
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0


def ddim_config(config: Mapping) -> DDIMConfig:
    """As DDIMScheduler.from_config(config)."""
    _refuse(config, ("thresholding",))
    return DDIMConfig(schedule=noise_schedule(config), **config_fields(DDIMConfig, config))


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig:
    """DPMSolverMultistepScheduler's settings for algorithm_type="dpmsolver++", solver_order=2
    (its defaults where a config is silent)."""

    schedule: NoiseSchedule
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    solver_type: str = "midpoint"          # midpoint | heun
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"        # zero | sigma_min
    lambda_min_clipped: float = -math.inf
    use_karras_sigmas: bool = False


def dpmpp_2m_config(config: Mapping) -> DPMSolverConfig:
    """As DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    (the torch backend's "dpm++" sampler; with use_karras_sigmas=True, its "dpm++-karras")."""
    _refuse(config, ("thresholding", "use_exponential_sigmas", "use_beta_sigmas",
                     "use_lu_lambdas", "use_flow_sigmas", "variance_type", "use_dynamic_shifting"))
    cfg = DPMSolverConfig(schedule=noise_schedule(config), **config_fields(DPMSolverConfig, config))
    if cfg.solver_type not in ("midpoint", "heun") or cfg.final_sigmas_type not in ("zero", "sigma_min"):
        raise TextinvError(f"Unsupported DPM-Solver settings: solver_type={cfg.solver_type!r}, "
                           f"final_sigmas_type={cfg.final_sigmas_type!r}.")
    return cfg


@dataclasses.dataclass(frozen=True)
class EulerConfig:
    """EulerDiscreteScheduler's settings (ancestral=False) or EulerAncestralDiscreteScheduler's
    (ancestral=True; that class knows none of the sigma options, so they keep their defaults)."""

    schedule: NoiseSchedule
    ancestral: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"        # zero | sigma_min (Euler only)
    use_karras_sigmas: bool = False        # Euler only
    sigma_min: float | None = None         # Euler's Karras range, else the table's
    sigma_max: float | None = None


_EULER_ONLY = ("final_sigmas_type", "use_karras_sigmas", "sigma_min", "sigma_max")


def euler_config(config: Mapping, *, ancestral: bool = False) -> EulerConfig:
    """As EulerDiscreteScheduler.from_config(config) (the torch backend's "euler") or, with
    ancestral=True, EulerAncestralDiscreteScheduler.from_config(config) ("euler-a")."""
    fields = config_fields(EulerConfig, config)
    fields.pop("ancestral", None)
    schedule = noise_schedule(config)
    if ancestral:
        for key in _EULER_ONLY:
            fields.pop(key, None)
        if schedule.prediction_type == "sample":  # as diffusers, which raises NotImplementedError
            raise TextinvError("Euler a does not sample models trained to predict the sample (prediction_type "
                               "'sample').", "Pass --scheduler Euler or DDIM.")
    else:
        _refuse(config, ("use_exponential_sigmas", "use_beta_sigmas"))
        if config.get("interpolation_type", "linear") != "linear":
            raise TextinvError(f"The scheduler config sets interpolation_type={config['interpolation_type']!r}, "
                               "which the JAX samplers do not support.", "Use --backend torch for this model.")
        if config.get("timestep_type", "discrete") != "discrete" and schedule.prediction_type == "v_prediction":
            raise TextinvError(f"The scheduler config sets timestep_type={config['timestep_type']!r}, which the JAX "
                               "samplers do not support.", "Use --backend torch for this model.")
    cfg = EulerConfig(schedule=schedule, ancestral=ancestral, **fields)
    if cfg.final_sigmas_type not in ("zero", "sigma_min"):
        raise TextinvError(f"Unsupported Euler setting: final_sigmas_type={cfg.final_sigmas_type!r}.")
    return cfg


# -- sigmas ---------------------------------------------------------------------------------------

def _sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """sqrt((1 - abar) / abar) in float32, ascending in t, as the Euler and DPM schedulers build
    it (abar_T = 2^-24 under zero-terminal-SNR, so that sigma stays finite)."""
    ac = schedule.alphas_cumprod
    if schedule.rescale_betas_zero_snr:
        ac[-1] = 2.0 ** -24
    return ((1 - ac) / ac) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022)'s schedule: n sigmas from sigma_max down to sigma_min (float64),
    as diffusers' _convert_to_karras."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timesteps of `sigmas`, interpolating log sigma (diffusers' _sigma_to_t)."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


# -- timesteps ----------------------------------------------------------------------------------

def _check_steps(n: int, total: int) -> None:
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
        raise TextinvError(f"The number of sampling steps must be from 1 to {total}, not {n!r}.")


def ddim_timesteps(cfg: DDIMConfig, n: int) -> np.ndarray:
    """DDIMScheduler.set_timesteps(n).timesteps (int64, descending)."""
    total = cfg.schedule.num_train_timesteps
    _check_steps(n, total)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    else:
        raise TextinvError(f"Unknown timestep_spacing {cfg.timestep_spacing!r} (linspace, leading or trailing).")
    return _in_range(ts, total)


def _in_range(ts: np.ndarray, total: int) -> np.ndarray:
    if ts.min() < 0 or ts.max() >= total:
        raise TextinvError(f"The scheduler config gives timesteps outside 0..{total - 1} ({ts.min()}..{ts.max()}); "
                           "check steps_offset.")
    return ts


def _lambdas(ac: np.ndarray) -> np.ndarray:
    alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
    return np.log(alpha) - np.log(sigma)


def dpmpp_2m_timesteps(cfg: DPMSolverConfig, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps(n).timesteps (int64, descending)."""
    total = cfg.schedule.num_train_timesteps
    _check_steps(n, total)
    ac = cfg.schedule.alphas_cumprod
    clipped = int(np.searchsorted(np.flip(_lambdas(ac)), cfg.lambda_min_clipped, side="left"))
    last = total - clipped
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.arange(last, 0, -total / n).round().copy().astype(np.int64) - 1
    else:
        raise TextinvError(f"Unknown timestep_spacing {cfg.timestep_spacing!r} (linspace, leading or trailing).")
    return _in_range(ts, total)


def dpmpp_2m_sigmas(cfg: DPMSolverConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler.set_timesteps(n): (timesteps int64 [n], sigmas float32 [n + 1])."""
    ts = dpmpp_2m_timesteps(cfg, n)
    full = _sigma_table(cfg.schedule)
    if cfg.use_karras_sigmas:  # over the whole table; the timesteps follow the sigmas
        sig = karras_sigmas(float(full[0]), float(full[-1]), n)
        ts = sigma_to_t(sig, np.log(full))
        if cfg.schedule.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:
        sig = full[ts]
    last = 0.0 if cfg.final_sigmas_type == "zero" else float(full[0])
    return ts, np.concatenate([sig, [last]]).astype(np.float32)


def euler_sigmas(cfg: EulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Euler(Ancestral)DiscreteScheduler.set_timesteps(n): (timesteps float32 [n], sigmas float32 [n + 1])."""
    total = cfg.schedule.num_train_timesteps
    _check_steps(n, total)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.float32) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.arange(total, 0, -total / n).round().copy().astype(np.float32) - 1
    else:
        raise TextinvError(f"Unknown timestep_spacing {cfg.timestep_spacing!r} (linspace, leading or trailing).")
    _in_range(ts, total)
    full = _sigma_table(cfg.schedule)
    sig = np.interp(ts, np.arange(0, total), full)
    if cfg.use_karras_sigmas:
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(sig[-1])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(sig[0])
        sig = karras_sigmas(lo, hi, n)
        ts = sigma_to_t(sig, np.log(full)).astype(np.float32)
    last = float(full[0]) if cfg.final_sigmas_type == "sigma_min" and not cfg.ancestral else 0.0
    return ts, np.concatenate([sig, [last]]).astype(np.float32)
