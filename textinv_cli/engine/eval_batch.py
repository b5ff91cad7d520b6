"""The fixed evaluation batch: an honest "is it learning" number.

The training loss is one fresh random batch per step (a new image, noise and timestep each
time), so its readings jump around more than the embedding improves. The eval loss is the
same loss on one batch that never changes: the same images, captions, flips, latent
samples, noise and timesteps at every evaluation, drawn once from the run's seed. Only the
rows change between two readings, so a falling eval loss means the rows got better at the
denoising task. (Variance-based early stopping needs the same number.)

It is drawn through its own BatchPlan, seeded by mix_seed(seed, EVAL_STREAM): a training
step's draws are a pure function of (seed, step, micro, sample) and consume no shared RNG,
so evaluating never changes what training draws (training stays bit-identical with or
without --eval-every). Timesteps are evenly spaced over the schedule instead of random:
with a handful of samples, a random timestep set would weigh some noise levels far more
than others; spread evenly, the number covers the whole range the training draws from.
"""

from __future__ import annotations

import numpy as np

from .batch_plan import BatchPlan, Draw, mix_seed

EVAL_SAMPLES = 8        # samples in the evaluation batch (images repeat when there are fewer)
EVAL_STREAM = 0xE7A1    # mixed into the seed: a draw stream of its own, never a training step's


def eval_draw(seed: int, n_images: int, latent_shape: tuple[int, ...], num_timesteps: int,
              samples: int = EVAL_SAMPLES) -> Draw:
    """The evaluation batch's draws (host numpy, identical on every backend and process)."""
    plan = BatchPlan(seed=mix_seed(seed, EVAL_STREAM), n_images=n_images, batch_size=samples, grad_accum=1,
                     latent_shape=tuple(latent_shape), num_timesteps=num_timesteps)
    d = plan.draw(0, 0)
    # evenly spaced noise levels, their order shuffled by the draw so no image always gets the same end
    spread = ((np.arange(samples) + 0.5) * num_timesteps / samples).astype(np.int64)
    rank = np.argsort(np.argsort(d.timesteps, kind="stable"), kind="stable")
    d.timesteps = spread[rank]
    return d


def chunks(samples: int, size: int) -> list[slice]:
    """The evaluation batch cut into pieces of at most `size` (the training batch: memory)."""
    size = max(1, int(size))
    return [slice(i, min(i + size, samples)) for i in range(0, samples, size)]


def resolve_eval_every(eval_every: int | None, total: int) -> int:
    """--eval-every as given, or about 50 readings per run when left out (0: off)."""
    return max(1, total // 50) if eval_every is None else int(eval_every)
