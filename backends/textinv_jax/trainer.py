"""The JAX training loop (a generator of Events), the torch trainer's semantics in the
Flax-examples style: a pure `train_step(state, frozen, batch, lr, max_norm) -> (state,
metrics)`, jitted once per model configuration with the state donated.

Only the new rows train: state = (rows {slot: [n, width]} fp32, optax AdamW state). The
frozen CLIP and UNet, the caption id table and the latent cache are jit *arguments* (never
constants baked into the program) and stay on the devices for the whole run.

A step is everything the torch trainer does per optimizer step: for each of `grad_accum`
micro-steps (a lax.scan) the BatchPlan draws (images, caption, flip, latent sample, noise,
timesteps; host numpy, identical for both backends), the latents `(mean + std * eps) *
scale` from the cache, the text states with the rows spliced in, the UNet's epsilon or v
MSE in fp32 divided by grad_accum; gradients summed, clipped to max_grad_norm by torch's
rule, and one AdamW update at the step's learning rate (lr_at, a host number passed in,
so schedules never recompile). Nothing random carries from step to step, so a checkpoint is
rows + moments + count (train_state.py) and resuming is bit-identical on the CPU.

Many devices: a 1-D Mesh over jax.devices() named "data"; batches are sharded on their
batch axis, everything else replicated; XLA inserts the gradient all-reduce. Several hosts
(jax.distributed, see backend.py) each draw their own block of the global batch, as torch
ranks do, and only process 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from textinv_cli import runs
from textinv_cli.batch_plan import BatchPlan
from textinv_cli.captions import captions_for, find_images
from textinv_cli.errors import TextinvError
from textinv_cli.schedules import lr_at
from textinv_cli.spec import Event, TrainSpec

from . import sampling, text as textmod, train_state as state
from .train_state import check_spec, describe, is_log_step, position, sigint_flag
from .clip import apply_clip
from .schedule import add_noise, training_target
from .unet import apply_unet

# One optimizer for every run: all its numbers (lr, betas, eps, weight decay) are injected
# hyperparameters, i.e. arrays in the state, so runs with other settings reuse the compiled step.
TX = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


@dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (hashable: the jit cache key besides shapes)."""

    clip: object
    unet: object
    slot: str
    prediction_type: str
    scaling: float
    dtype: str
    remat: bool


@dataclass
class Setup:
    """A loaded, checked run: everything train() needs before it writes anything."""

    spec: TrainSpec
    family: str
    text: textmod.TextSide
    image: sampling.ImageSide
    slot: str
    first: int
    init: np.ndarray
    tables: np.ndarray
    choices: list
    truncated: int
    mean: np.ndarray      # latent mean per (image, flip) entry [E, C, h, w] (NCHW: the BatchPlan's shape)
    std: np.ndarray
    flips: tuple
    images: list
    ignored: list
    resolution: int
    dtype: object
    mesh: Mesh

    @property
    def n_images(self) -> int:
        return len(self.images)

    def config(self) -> StepConfig:
        return StepConfig(clip=self.text.config, unet=self.image.unet_config, slot=self.slot,
                          prediction_type=self.image.schedule.prediction_type,
                          scaling=float(self.image.vae_config.scaling_factor), dtype=jnp.dtype(self.dtype).name,
                          remat=bool(self.spec.gradient_checkpointing))


# -- the step -----------------------------------------------------------------------------------

def micro_loss(rows, frozen, mb, cfg: StepConfig):
    """One micro-step's MSE (fp32 scalar) of the frozen UNet on noised cached latents."""
    dt = jnp.dtype(cfg.dtype)
    entry = mb["entry"]
    latents = (frozen["mean"][entry] + frozen["std"][entry] * mb["eps"]) * cfg.scaling
    ids = frozen["tables"][mb["caption"]]
    cond = apply_clip(frozen["clip"], cfg.clip, ids, extra_rows=rows[cfg.slot], dtype=dt)["last_hidden_state"]
    noisy = add_noise(frozen["ac"], latents, mb["noise"], mb["t"])
    unet = partial(apply_unet, config=cfg.unet, dtype=dt)
    if cfg.remat:  # --gradient-checkpointing: recompute the UNet's activations in the backward pass
        unet = jax.checkpoint(unet)
    pred = unet(frozen["unet"], sample=noisy.transpose(0, 2, 3, 1), timesteps=mb["t"], encoder_hidden_states=cond)
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


# -- setup: everything a user can get wrong, before anything is written ---------------------------

def make_mesh(spec: TrainSpec) -> Mesh:
    """A 1-D "data" mesh over every device (spec.extra["devices"] = N: the first N, one host)."""
    devices = jax.devices()
    want = (spec.extra or {}).get("devices")
    if want is not None:
        if not isinstance(want, int) or not 1 <= want <= len(devices) or jax.process_count() > 1:
            raise TextinvError(f"extra devices={want!r}: this machine has {len(devices)} JAX device(s).")
        devices = devices[:want]
    local = sum(d.process_index == jax.process_index() for d in devices)
    if spec.batch_size % local:
        raise TextinvError(f"--batch-size {spec.batch_size} does not split evenly over the {local} "
                           f"{devices[0].platform} devices the jax backend trains on.",
                           f"Pass a multiple of {local} (each device takes an equal share of the batch), or "
                           "use fewer devices (CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS).")
    return Mesh(np.array(devices), ("data",))


def prepare(spec: TrainSpec) -> Setup:
    check_spec(spec)
    mesh = make_mesh(spec)
    dtype = sampling.compute_dtype(spec.precision, mesh.devices.flat[0].platform)
    images, ignored = find_images(Path(spec.data_dir))
    captions = captions_for(images, spec.token, spec.property, spec.captions)
    folder = textmod.model_folder(spec.model)
    family = textmod.model_family(folder)
    slot = {"sd1": "clip_l", "sd2": "clip_h"}[family]
    text = textmod.load_text_side(folder)
    label = f"{slot} tokenizer"
    textmod.check_token(spec.token, text.tokenizer, label)
    words = [spec.init] if isinstance(spec.init, str) else list(spec.init)
    init = textmod.init_rows(text.tokenizer, text.params["embeddings"]["token_embedding"]["embedding"], words,
                             spec.vectors, label)
    first = textmod.add_tokens(text.tokenizer, spec.token, spec.vectors, label)
    image = sampling.load_image_side(folder)
    if image.schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise TextinvError(f"The model's scheduler predicts {image.schedule.prediction_type!r}; textinv trains "
                           "epsilon and v_prediction models.")
    resolution = spec.resolution or image.native_resolution
    scale = image.vae_config.downscale
    if not isinstance(resolution, int) or resolution < scale or resolution % scale:
        raise TextinvError(f"--resolution must be a positive multiple of {scale}, not {resolution!r}.",
                           "Use the model's size (512 for SD 1.5, 768 for SD 2.1) or leave it out.")
    tables, choices, truncated = textmod.tokenize_captions(text.tokenizer, captions, spec.token, spec.vectors,
                                                           first, text.vocab_rows)
    mean, std, flips = sampling.latent_cache(images, image, resolution, spec.center_crop, spec.flip_p)
    return Setup(spec=spec, family=family, text=text, image=image, slot=slot, first=first, init=init,
                 tables=tables, choices=choices, truncated=truncated, mean=mean, std=std, flips=flips,
                 images=images, ignored=ignored, resolution=resolution, dtype=dtype, mesh=mesh)


# -- host side of a step -------------------------------------------------------------------------

def batch_plan(s: Setup) -> BatchPlan:
    return BatchPlan(seed=s.spec.seed, n_images=s.n_images, batch_size=s.spec.batch_size,
                     grad_accum=s.spec.grad_accum, latent_shape=tuple(s.mean.shape[1:]),
                     num_timesteps=s.image.schedule.num_train_timesteps, rank=jax.process_index(),
                     world=jax.process_count())


def micro_batch(s: Setup, plan: BatchPlan, step: int, micro: int) -> dict:
    """This process's block of a micro-step, as the torch Sampler picks it (host numpy)."""
    d = plan.draw(step, micro)
    counts = np.array([len(c) for c in s.choices])
    offsets = np.cumsum([0] + [len(c) for c in s.choices[:-1]])
    flat = np.array([i for c in s.choices for i in c])
    pick = np.minimum((d.caption_u * counts[d.images]).astype(np.int64), counts[d.images] - 1)
    entry = d.images if len(s.flips) == 1 else d.images * 2 + (d.flip_u < s.spec.flip_p)
    return {"entry": entry.astype(np.int32), "caption": flat[offsets[d.images] + pick].astype(np.int32),
            "eps": d.eps, "noise": d.noise, "t": d.timesteps.astype(np.int32)}


def step_batch(s: Setup, plan: BatchPlan, step: int) -> dict:
    micro = [micro_batch(s, plan, step, m) for m in range(s.spec.grad_accum)]
    if s.spec.fuse_accum:  # one micro-step of grad_accum x B samples: the same mean loss, one pass
        return {k: np.concatenate([m[k] for m in micro])[None] for k in micro[0]}
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def put(tree, sharding: NamedSharding):
    """Host arrays -> global arrays: each process gives its block of the sharded axis (or
    the whole array when replicated); single-process this is a plain device_put."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def host(tree):
    """A replicated global array's value on this host (no cross-host gather needed)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


# -- the loop -----------------------------------------------------------------------------------

def validate(s: Setup, frozen, vae, rows, run: Path, step: int, repl, main: bool) -> list:
    """The --validate images of this step (sampling.validation_images), rows as they are now."""
    spec = s.spec
    nets = {"clip": frozen["clip"], "unet": frozen["unet"], "vae": vae}
    configs = {"clip": s.text.config, "unet": s.image.unet_config, "vae": s.image.vae_config}
    return sampling.validation_images(
        nets, configs, s.text.tokenizer, rows[s.slot], first=s.first, vocab_rows=s.text.vocab_rows,
        scheduler_config=s.image.scheduler_config, prompts=spec.validate, token=spec.token, vectors=spec.vectors,
        steps=spec.validate_steps, seed=spec.seed, resolution=s.resolution, dtype=s.dtype,
        out=run / "samples", step=step, place=lambda x: put(x, repl), write=main)


def train(spec: TrainSpec, resume: Path | None = None) -> Iterator[Event]:
    check_spec(spec)
    run = Path(resume if resume is not None else spec.run_dir)
    if resume is not None:
        if not (run / "spec.json").is_file():
            raise TextinvError(f"{run} is not a training run (no spec.json).", "Pass the run folder printed at start.")
    else:
        if jax.process_count() > 1:
            # every host planned its own timestamped name; process 0's wins
            raw = np.frombuffer(str(run).encode().ljust(4096, b"\0")[:4096], np.uint8)
            run = Path(bytes(multihost_utils.broadcast_one_to_all(raw)).rstrip(b"\0").decode())
            spec.run_dir = str(run)
        state.check_new_run_dir(run)
    yield from _loop(prepare(spec), run, resume)


def _loop(s: Setup, run: Path, resume: Path | None) -> Iterator[Event]:
    spec, accum, total = s.spec, s.spec.grad_accum, s.spec.steps
    procs, main = jax.process_count(), jax.process_index() == 0
    base_lr = spec.lr * (spec.batch_size * accum * procs if spec.scale_lr else 1)
    repl, sharded = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P(None, "data"))

    start, resumed_from, warnings = 0, None, []
    rows, mu, nu, count = {s.slot: s.init}, None, None, 0
    if resume is not None:
        found = runs.latest_checkpoint(run)
        if found is None:
            warnings.append(f"{run} has no complete checkpoint; starting again from step 0.")
        else:
            info, tensors = state.load_checkpoint(found[1])
            start, rows, mu, nu, count = state.restore(info, tensors, {s.slot: s.init.shape}, spec.token, found[1])
            start, resumed_from = min(total, start), str(found[1])
    st = put((rows, opt_state(spec, rows, mu, nu, count)), repl)
    frozen = put({"clip": s.text.params, "unet": s.image.unet_params, "tables": s.tables, "mean": s.mean,
                  "std": s.std, "ac": s.image.schedule.alphas_cumprod}, repl)
    vae = put(s.image.vae_params, repl) if spec.validate else None
    cfg, plan = s.config(), batch_plan(s)
    max_norm = np.float32(spec.max_grad_norm or np.inf)

    if procs > 1:  # every host has checked and loaded everything before process 0 creates the run
        multihost_utils.sync_global_devices("textinv: run checked")
    if main:
        run.mkdir(parents=True, exist_ok=True)  # the first write of the run, after every check
        spec.save(run)
        if resume is not None:  # what a killed process left half-written: never picked, now gone
            runs.tidy_for_resume(run, spec.keep_checkpoints)

    def emit(kind, **data):
        return state.record_event(run, Event(kind, data)) if main else Event(kind, data)

    devices = list(s.mesh.devices.flat)
    where = {"devices": len(devices)} if len(devices) > 1 else {}
    where.update({"processes": procs} if procs > 1 else {})
    yield emit("started", run_dir=str(run), device=describe(devices), family=s.family, model=spec.model,
               images=s.n_images, ignored=[p.name for p in s.ignored], total_steps=total, start_step=start,
               resumed_from=resumed_from, **where)
    if s.ignored:
        warnings.append(f"Skipped {len(s.ignored)} file(s) that are not images: "
                        + ", ".join(p.name for p in s.ignored[:10]) + (" ..." if len(s.ignored) > 10 else ""))
    gpu = devices[0].platform == "gpu"
    if spec.deterministic and gpu and "deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
        warnings.append("--deterministic on a GPU needs XLA_FLAGS=--xla_gpu_deterministic_ops=true set before textinv "
                        "starts (XLA reads it once); this run's reductions may differ run to run.")
    if s.truncated:
        warnings.append(f"{s.truncated} caption(s) are so long that {spec.token} is cut off at "
                        f"{s.text.tokenizer.model_max_length} tokens; those steps teach it nothing.")
    for w in warnings:
        yield emit("warning", message=w)

    def checkpoint(done):
        rows_h, opt = host(st[0]), st[1]
        adam = host(opt.inner_state[0])
        info = {"token": spec.token, "seed": spec.seed, "data_position": position(spec, done, s.n_images, procs),
                "backend": "jax"}
        return state.save_checkpoint(run, done, rows_h, adam.mu, adam.nu, int(adam.count), info,
                                     spec.keep_checkpoints)

    step, last_checkpoint, pending = start, (start if resumed_from else -1), None
    with sigint_flag() as stop:
        for step in range(start, total):
            lr = lr_at(step, base_lr=base_lr, schedule=spec.lr_schedule, total_steps=total,
                       warmup_steps=spec.warmup_steps)
            st, metrics = train_step(st, frozen, put(step_batch(s, plan, step), sharded), np.float32(lr),
                                     max_norm, cfg=cfg)
            if pending is not None:
                pending.block_until_ready()  # keep at most one step queued behind the running one
            pending = metrics["loss"]
            done = step + 1
            progress = {"step": done, "total": total, "lr": lr}
            if is_log_step(done, total):
                progress["loss"] = float(host(metrics["loss"]))  # the loop's only host sync
            yield emit("progress", **progress)
            if main and spec.save_every and done % spec.save_every == 0:
                path = state.write_vectors(run / "snapshots" / f"step-{done:06d}.safetensors", host(st[0]), spec,
                                           s.family, done)
                yield emit("snapshot", step=done, path=str(path))
            if spec.checkpoint_every and done % spec.checkpoint_every == 0:
                last_checkpoint = done
                if main:
                    stop.checkpointing = True
                    path = checkpoint(done)
                    stop.checkpointing = False
                    yield emit("checkpoint", step=done, path=str(path))
            if spec.validate and spec.validate_every and done % spec.validate_every == 0:
                paths = validate(s, frozen, vae, st[0], run, done, repl, main)
                yield emit("validation", step=done, paths=[str(p) for p in paths])
            requested = stop.requested
            if procs > 1:  # every host stops after the same step, or none does
                requested = bool(multihost_utils.process_allgather(np.int32(requested)).max())
            if requested and done < total:
                path = runs.checkpoint_dir(run, done)
                if main and last_checkpoint != done:
                    stop.checkpointing = True
                    path = checkpoint(done)
                    stop.checkpointing = False
                yield emit("interrupted", step=done, checkpoint=str(path))
                return

    done = total
    if spec.validate and (not spec.validate_every or done % spec.validate_every):
        paths = validate(s, frozen, vae, st[0], run, done, repl, main)  # once at the end
        yield emit("validation", step=done, paths=[str(p) for p in paths])
    vectors = {slot: np.array(v, np.float32) for slot, v in host(st[0]).items()}
    meta = state.embedding_meta(spec, s.family, done)
    path = run / runs.FINAL
    if main:
        state.write_vectors(path, vectors, spec, s.family, done)
    yield emit("finished", step=done, embedding_path=str(path), token=spec.token, vectors=vectors, meta=meta)
