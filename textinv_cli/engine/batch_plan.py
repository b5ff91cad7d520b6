"""Every random choice of a training step, drawn on the host with numpy, identical for all
backends, devices and resumes.

A micro-step's draws depend only on (seed, step, micro, rank): which images (a per-epoch
permutation), which caption and flip, the latent sample, the noise and the timesteps. So a
checkpoint needs no RNG state, resuming from step k continues exactly, and the torch and
JAX backends train on the same batches (same results up to float noise).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; a hash, so (seed, step) and (seed+1, step-1) never collide."""
    digest = hashlib.sha256(("textinv:" + ":".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Draw:
    images: np.ndarray     # int64 [b]: index into the training images
    caption_u: np.ndarray  # float64 [b] in [0, 1): picks one of the image's captions
    flip_u: np.ndarray     # float64 [b] in [0, 1): flipped when < flip_p
    eps: np.ndarray        # float32 [b, *latent]: sample of the cached latent distribution
    noise: np.ndarray      # float32 [b, *latent]: the diffusion noise
    timesteps: np.ndarray  # int64 [b] in [0, num_timesteps)


class BatchPlan:
    """`rank`/`world` let data-parallel processes share one global batch: a micro-step's
    world x batch samples are numbered globally and rank r takes block r. Every sample is
    drawn from its own generator seeded by (seed, step, micro, global index), so 2 processes
    at batch 1 see exactly the inputs 1 process at batch 2 sees."""

    def __init__(self, *, seed: int, n_images: int, batch_size: int, grad_accum: int,
                 latent_shape: tuple[int, ...], num_timesteps: int, rank: int = 0, world: int = 1):
        self.seed, self.n, self.b, self.accum = seed, n_images, batch_size, grad_accum
        self.latent_shape, self.num_timesteps = tuple(latent_shape), num_timesteps
        self.rank, self.world = rank, world
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._orders[epoch]

    def draw(self, step: int, micro: int) -> Draw:
        b, shape = self.b, self.latent_shape
        start = (step * self.accum + micro) * self.world * b  # first global sample of this micro-step
        mine = range(self.rank * b, (self.rank + 1) * b)       # this rank's block of it
        images = np.array([self.order((start + j) // self.n)[(start + j) % self.n] for j in mine], dtype=np.int64)
        caption_u, flip_u = np.empty(b), np.empty(b)
        eps, noise = np.empty((b,) + shape, np.float32), np.empty((b,) + shape, np.float32)
        timesteps = np.empty(b, np.int64)
        for i, j in enumerate(mine):
            rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, step, micro, j)))
            # a fixed order of draws: changing it changes every run, so don't
            caption_u[i], flip_u[i] = rng.random(), rng.random()
            eps[i] = rng.standard_normal(shape, dtype=np.float32)
            noise[i] = rng.standard_normal(shape, dtype=np.float32)
            timesteps[i] = rng.integers(0, self.num_timesteps)
        return Draw(images, caption_u, flip_u, eps, noise, timesteps)
