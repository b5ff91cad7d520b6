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
    """`rank`/`world` let data-parallel processes take disjoint samples of one global order:
    each micro-step's world x batch samples are cut into one block per rank, and each rank
    seeds its own draws. A single process is rank 0 of 1."""

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
        first = ((step * self.accum + micro) * self.world + self.rank) * self.b
        images = np.array([self.order(g // self.n)[g % self.n] for g in range(first, first + self.b)], dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, step, micro, self.rank)))
        shape = (self.b,) + self.latent_shape
        # a fixed order of draws: changing it changes every run, so don't
        caption_u = rng.random(self.b)
        flip_u = rng.random(self.b)
        eps = rng.standard_normal(shape, dtype=np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32)
        timesteps = rng.integers(0, self.num_timesteps, self.b, dtype=np.int64)
        return Draw(images, caption_u, flip_u, eps, noise, timesteps)
