"""The math of a torch training step, flat in the spirit of nanoGPT's train.py: what a
micro-step draws (Sampler), the text conditioning (encode_text), the loss (forward_loss),
and one optimizer step's micro-step loop and update (accumulate, update). The run around
it (checkpoints, events, Ctrl-C, resume) is the core's engine; trainer.py is the session
that holds the model and calls these.

Exact resume is designed in rather than bolted on. Every random draw of a micro-step
(images, caption, flip, latent sample, noise, timestep) comes from the core's BatchPlan,
a pure function of (seed, step, micro-step) shared with the JAX backend; the learning
rate is a function of the step. Nothing random carries over from one step to the next
except the rows and AdamW's moments, so a checkpoint holds just those (state.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from textinv_cli.engine.batch_plan import BatchPlan, Draw
from textinv_cli.engine.eval_batch import chunks
from textinv_cli.engine.spec import TrainSpec

from .data import LatentCache


@dataclass
class Batch:
    ids: list[torch.Tensor]      # token ids per text encoder [B, 77]
    latents: torch.Tensor        # scaled VAE latents [B, C, h, w] (fp32)
    noise: torch.Tensor
    timesteps: torch.Tensor      # [B] long
    time_ids: torch.Tensor       # SDXL size/crop conditioning [B, 6]


class Sampler:
    """Which image, caption, flip, noise and timestep a micro-step uses; pure in (step, micro).

    `rank`/`world` let data-parallel processes take disjoint samples of the same global
    order (each micro-step's world x batch samples are cut into one block per rank, and each
    rank seeds its own draws); a single process is rank 0 of 1.
    """

    def __init__(self, spec: TrainSpec, cache: LatentCache, caption_ids: list[torch.Tensor],
                 choices: list[list[int]], scaling: float, num_timesteps: int, device, rank: int = 0, world: int = 1,
                 batch_size: int | None = None):
        self.spec, self.cache = spec, cache
        self.caption_ids = [t.to(device) for t in caption_ids]
        self.offsets = torch.tensor(np.cumsum([0] + [len(c) for c in choices[:-1]]), dtype=torch.long)
        self.counts = torch.tensor([len(c) for c in choices], dtype=torch.long)
        self.flat = torch.tensor([i for c in choices for i in c], dtype=torch.long)
        self.scaling, self.device = scaling, device
        self.plan = BatchPlan(seed=spec.seed, n_images=cache.n_images, batch_size=batch_size or spec.batch_size,
                              grad_accum=spec.grad_accum, latent_shape=tuple(cache.mean.shape[1:]),
                              num_timesteps=num_timesteps, rank=rank, world=world)

    def batch(self, step: int, micro: int) -> Batch:
        return self.from_draw(self.plan.draw(step, micro))  # host numpy: the same numbers on every device and backend

    def from_draw(self, d: Draw) -> Batch:
        """A draw's samples as model inputs on the device (a training micro-step's, or the
        fixed evaluation batch's)."""
        images = torch.from_numpy(d.images)
        u_caption, u_flip = torch.from_numpy(d.caption_u), torch.from_numpy(d.flip_u)
        eps, noise, timesteps = torch.from_numpy(d.eps), torch.from_numpy(d.noise), torch.from_numpy(d.timesteps)
        pick = torch.minimum((u_caption * self.counts[images]).long(), self.counts[images] - 1)
        caption = self.flat[self.offsets[images] + pick]
        entry = self.cache.entry(images, u_flip < self.spec.flip_p)
        caption, entry, timesteps, eps, noise = (self._put(t) for t in (caption, entry, timesteps, eps, noise))
        latents = (self.cache.mean[entry] + self.cache.std[entry] * eps) * self.scaling
        return Batch(ids=[t[caption] for t in self.caption_ids], latents=latents, noise=noise,
                     timesteps=timesteps, time_ids=self.cache.time_ids[entry])

    def fused(self, step: int) -> Batch:
        """All of a step's micro-steps as one batch: the mean of its loss is the mean of the
        micro-steps' means (they are the same size), so loss and gradient are the same up to
        rounding, in one UNet call per step instead of grad_accum."""
        parts = [self.batch(step, m) for m in range(self.spec.grad_accum)]
        return Batch(ids=[torch.cat(t) for t in zip(*(b.ids for b in parts))],
                     **{f: torch.cat([getattr(b, f) for b in parts]) for f in ("latents", "noise", "timesteps", "time_ids")})

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        # A plain host->GPU copy waits for the GPU to drain; from pinned memory it is queued
        # like a kernel, so the CPU can prepare the next micro-step while the GPU works.
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def encode_text(comp, ids: list[torch.Tensor]) -> tuple[torch.Tensor, dict | None]:
    """UNet conditioning as the family's pipeline computes it (so trained == used).

    SD 1.x/2.x: the last hidden state. SDXL: both encoders' penultimate hidden states
    concatenated, plus the second encoder's pooled, projected output as `text_embeds`.
    With A1111's "Clip skip" N (comp.clip_skip) the layer N-1 before those is taken, and for
    SD 1.x/2.x passed through the final layer norm, as A1111 and diffusers' clip_skip (N-1) do.
    """
    skip = max(1, int(getattr(comp, "clip_skip", 1)))
    if comp.family != "sdxl":
        if skip == 1:
            return comp.text_encoders[0](ids[0])[0], None
        te = comp.text_encoders[0]
        hidden = te(ids[0], output_hidden_states=True).hidden_states[-skip]
        return getattr(te, "text_model", te).final_layer_norm(hidden), None  # transformers 5 dropped .text_model
    h1 = comp.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-1 - skip]
    out2 = comp.text_encoders[1](ids[1], output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-1 - skip]], dim=-1), {"text_embeds": out2[0]}


def forward_loss(comp, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
    """Epsilon or v-prediction MSE of the frozen UNet on noised latents; fp32 scalar."""
    cond, added = encode_text(comp, batch.ids)
    if added is not None:
        added["time_ids"] = batch.time_ids.to(dtype)
    noisy = comp.scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    pred = comp.unet(noisy.to(dtype), batch.timesteps, cond.to(dtype), added_cond_kwargs=added).sample
    if comp.prediction_type == "v_prediction":
        target = comp.scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        target = batch.noise
    return F.mse_loss(pred.float(), target.float())


def accumulate(comp, sampler: Sampler, step: int, *, passes: int, dtype: torch.dtype, scaler=None) -> torch.Tensor:
    """Forward and backward of one optimizer step's `passes` micro-steps (1: all of them as
    one fused batch); the gradients accumulate in the rows. Returns the step's mean loss on
    the device (no host sync)."""
    accum = sampler.spec.grad_accum
    loss_sum = torch.zeros((), device=sampler.device)
    for micro in range(passes):
        data = sampler.fused(step) if passes == 1 < accum else sampler.batch(step, micro)
        loss = forward_loss(comp, data, dtype) / passes
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def eval_loss(comp, batch: Batch, dtype: torch.dtype, chunk: int) -> float:
    """Mean loss over the fixed evaluation batch, `chunk` samples per UNet call; no gradient,
    nothing but a forward pass (the rows and optimizer are untouched)."""
    n = batch.latents.shape[0]
    total = torch.zeros((), device=batch.latents.device)
    for part in chunks(n, chunk):
        piece = Batch(ids=[t[part] for t in batch.ids], latents=batch.latents[part], noise=batch.noise[part],
                      timesteps=batch.timesteps[part], time_ids=batch.time_ids[part])
        total += forward_loss(comp, piece, dtype) * (part.stop - part.start)
    return (total / n).item()  # the host sync of an eval step


def update(opt: torch.optim.Optimizer, params: list[torch.Tensor], lr: float, max_grad_norm: float | None,
           scaler=None) -> None:
    """Unscale (fp16), clip, one AdamW step at `lr`, clear the gradients."""
    for group in opt.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.unscale_(opt)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
