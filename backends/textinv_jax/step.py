"""The math of a JAX training step, Flax-examples style: a pure `train_step(state, frozen,
batch, lr, max_norm) -> (state, metrics)`, jitted once per model configuration with the
state donated. The run around it (checkpoints, events, Ctrl-C, resume) is the core's
engine; trainer.py is the session that places the arrays and calls this.

The models are flax.nnx modules, split once (trainer.py): their graphdefs are static (in
StepConfig, the jit cache key), their Frozen weights are the `frozen` argument, and the
rows (the text model's TokenRows, clip.py) are the trained state, merged back in per
micro-step (`graph.merge(rows_state(rows), weights)`: trace-time work only). Only the
new rows train (one block per text encoder: SDXL has two): state = (rows {slot: [n, width]} fp32, optax AdamW state over those rows
alone, the same moments the torch backend checkpoints). The frozen CLIP and UNet weights,
the caption id table and the latent cache are jit *arguments* (never constants baked into
the program) and stay on the devices for the whole run.

A step is everything the torch step does per optimizer step: for each of `grad_accum`
micro-steps (a lax.scan) the latents `(mean + std * eps) * scale` from the cache (the
draws come from the host, trainer.step_batch), the text conditioning with the rows spliced in (conditioning.py; SDXL adds the
pooled text and the size/crop ids), the UNet's epsilon or v MSE in fp32 divided by grad_accum; gradients summed, clipped to
max_grad_norm by torch's rule, and one AdamW update at the step's learning rate (a host
number passed in, so schedules never recompile). Nothing random carries from step to step,
so a checkpoint is rows + moments + count (state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax

from textinv_cli.engine.spec import TrainSpec

from .clip import rows_state
from .conditioning import text_conditioning
from .layers import Graph
from .noise_schedule import add_noise, training_target

# One optimizer for every run: all its numbers (lr, betas, eps, weight decay) are injected
# hyperparameters, i.e. arrays in the state, so runs with other settings reuse the compiled step.
TX = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


@dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (hashable: the jit cache key besides shapes)."""

    texts: tuple[Graph, ...]  # the text models' graphdefs, in encoder order; weights: frozen["text_encoders"][slot]
    unet: Graph  # the UNet's graphdef; its weights come as frozen["unet"]
    slots: tuple[str, ...]  # the rows' slot of each text model (SDXL: clip_l, clip_g)
    prediction_type: str
    scaling: float
    dtype: str
    remat: bool
    clip_skip: int = 1  # A1111's Clip skip (conditioning.text_conditioning)

    @property
    def xl(self) -> bool:
        return len(self.slots) == 2


def micro_loss(rows, frozen, mb, cfg: StepConfig):
    """One micro-step's MSE (fp32 scalar) of the frozen UNet on noised cached latents."""
    dt = jnp.dtype(cfg.dtype)
    entry = mb["entry"]
    latents = (frozen["mean"][entry] + frozen["std"][entry] * mb["eps"]) * cfg.scaling
    models = [graph.merge(rows_state(rows[slot]), frozen["text_encoders"][slot])
              for graph, slot in zip(cfg.texts, cfg.slots)]
    ids = [frozen["tables"][slot][mb["caption"]] for slot in cfg.slots]
    cond, pooled = text_conditioning(models, ids, xl=cfg.xl, clip_skip=cfg.clip_skip, dtype=dt)
    # SDXL: the pooled text and each sample's size/crop ids (data.latent_cache), as torch's forward_loss
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": frozen["time_ids"][entry]}
    noisy = add_noise(frozen["ac"], latents, mb["noise"], mb["t"])

    def unet(weights, sample, timesteps, context, added):
        return cfg.unet.merge(weights)(sample, timesteps, context, added_cond=added, dtype=dt)

    if cfg.remat:  # --gradient-checkpointing: recompute the UNet's activations in the backward pass
        unet = jax.checkpoint(unet)
    pred = unet(frozen["unet"], noisy.transpose(0, 2, 3, 1), mb["t"], cond, added)
    target = training_target(cfg.prediction_type, frozen["ac"], latents, mb["noise"], mb["t"])
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.transpose(0, 2, 3, 1).astype(jnp.float32)))


@partial(jax.jit, static_argnames=("cfg",), donate_argnums=(0,))
def train_step(st, frozen, batch, lr, max_norm, *, cfg: StepConfig):
    """(rows, opt_state), batch [accum, B, ...] -> new state, {loss, grads, grad_norm} (grads and
    norm before clipping; [n, width] per slot, so returning them costs nothing)."""
    rows, opt = st
    accum = batch["t"].shape[0]

    def micro(carry, mb):
        grads, loss = carry
        value, g = jax.value_and_grad(lambda r: micro_loss(r, frozen, mb, cfg) / accum)(rows)
        return (jax.tree.map(jnp.add, grads, g), loss + value), None

    zero = (jax.tree.map(jnp.zeros_like, rows), jnp.zeros((), jnp.float32))
    (grads, loss), _ = jax.lax.scan(micro, zero, batch)
    # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up (inf: no clipping)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    clipped = jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-6)), grads)
    opt = opt._replace(hyperparams={**opt.hyperparams, "learning_rate": lr})
    updates, opt = TX.update(clipped, opt, rows)
    return (optax.apply_updates(rows, updates), opt), {"loss": loss, "grads": grads, "grad_norm": norm}


@partial(jax.jit, static_argnames=("cfg",))
def eval_step(rows, frozen, batch, *, cfg: StepConfig):
    """Mean loss of `rows` on the fixed evaluation batch [pieces, B, ...] (one piece at a time,
    lax.map: an eval needs no more memory than a training micro-step); rows not donated."""
    return jnp.mean(jax.lax.map(lambda mb: micro_loss(rows, frozen, mb, cfg), batch))


def opt_state(spec: TrainSpec, rows, mu=None, nu=None, count: int = 0):
    """AdamW state for `rows` with the spec's betas/eps/decay, optionally restored moments."""
    opt = TX.init(rows)
    adam = opt.inner_state[0]
    assert isinstance(adam, optax.ScaleByAdamState), type(adam)  # adamw = chain(scale_by_adam, ...)
    adam = adam._replace(count=jnp.asarray(count, jnp.int32), mu=mu if mu is not None else adam.mu,
                         nu=nu if nu is not None else adam.nu)
    hyper = {**opt.hyperparams, **{k: jnp.asarray(v, jnp.float32) for k, v in (
        ("b1", spec.adam_beta1), ("b2", spec.adam_beta2), ("eps", spec.adam_eps),
        ("weight_decay", spec.weight_decay))}}
    return opt._replace(count=jnp.asarray(count, jnp.int32), hyperparams=hyper,
                        inner_state=(adam, *opt.inner_state[1:]))


