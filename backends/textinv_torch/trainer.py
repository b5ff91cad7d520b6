"""The training loop (a generator of Events), in the spirit of nanoGPT's train.py: flat,
top to bottom, host syncs (`.item()`) only at log steps.

Exact resume is designed in rather than bolted on. Every random draw of a micro-step
(images, caption, flip, latent sample, noise, timestep) comes from the core's BatchPlan,
a pure function of (seed, step, micro-step) shared with the JAX backend; the learning
rate is a function of the step. Nothing
random carries over from one step to the next except the rows and AdamW's moments, so a
checkpoint holds just those (state.py) and continuing from step k replays steps k+1...
with bit-identical inputs.

Data-parallel (distributed.py): launched with WORLD_SIZE > 1, every process runs this same
loop on its block of each global batch; the rows' gradients are averaged across processes
once per step, and only rank 0 writes anything (run folder, events, checkpoints, files).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from textinv_cli import runs
from textinv_cli.batch_plan import BatchPlan
from textinv_cli.captions import captions_for, find_images
from textinv_cli.errors import TextinvError
from textinv_cli.models import resolve_model
from textinv_cli.schedules import lr_at
from textinv_cli.run_files import StopFlag, check_spec, is_log_step, sigint_flag  # noqa: F401 - StopFlag for tests
from textinv_cli.spec import Event, TrainSpec

from . import data as datamod
from . import distributed
from . import models as modelsmod
from . import rows as rowsmod
from . import state
from .models import load_image_side, load_text_side, quiet



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

    def __init__(self, spec: TrainSpec, cache: datamod.LatentCache, caption_ids: list[torch.Tensor],
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
        d = self.plan.draw(step, micro)  # host numpy: the same numbers on every device and backend
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
    """
    if comp.family != "sdxl":
        return comp.text_encoders[0](ids[0])[0], None
    h1 = comp.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
    out2 = comp.text_encoders[1](ids[1], output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), {"text_embeds": out2[0]}


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


@contextlib.contextmanager
def determinism(on: bool, threads: int | None = None):
    """Deterministic kernels if asked; spec.extra["threads"] sets torch's CPU threads for the
    run (tiny models on a busy 2-core machine run several times faster on one thread)."""
    before, before_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(before_threads)


def train(spec: TrainSpec, resume: Path | None = None) -> Iterator[Event]:
    # -- everything a user can get wrong, before anything is written --------------------
    check_spec(spec)
    dist = distributed.setup(spec)  # one process: rank 0 of 1 on pick_device(spec)
    device = dist.device
    dtype = modelsmod.compute_dtype(spec.precision, device)
    batch = distributed.local_batch(spec, dist.world)
    if resume is None and dist.world > 1:
        spec.run_dir = dist.broadcast(spec.run_dir)  # each rank may have planned its own name
    run = Path(resume if resume is not None else spec.run_dir)
    if resume is not None:
        if not (run / "spec.json").is_file():
            raise TextinvError(f"{run} is not a training run (no spec.json).", "Pass the run folder printed at start.")
    else:
        state.check_new_run_dir(run)
    images, ignored = find_images(Path(spec.data_dir))
    captions = captions_for(images, spec.token, spec.property, spec.captions)
    model = resolve_model(spec.model)
    with determinism(spec.deterministic, (spec.extra or {}).get("threads")), quiet():
        comp = load_text_side(model)
        words = [spec.init] if isinstance(spec.init, str) else list(spec.init)
        comp.prepared = rowsmod.prepare_rows(comp, spec.token, words, spec.vectors)
        load_image_side(comp)
        resolution = spec.resolution or comp.native_resolution
        datamod.check_resolution(resolution, comp.vae_scale)
        if spec.attention == "xformers":
            modelsmod.enable_xformers(comp.unet, device)
        for te in comp.text_encoders:
            te.to(device, dtype)
        comp.unet.to(device, dtype)
        comp.vae.to(device)  # fp32 for the one-off encoding: no fp16 overflow, cheap
        if spec.gradient_checkpointing:
            comp.unet.enable_gradient_checkpointing()
            for te in comp.text_encoders:  # transformers checkpoints only in train mode (CLIP has no dropout)
                modelsmod.checkpointing_on(te)
        rows = rowsmod.install_rows(comp, comp.prepared, device)
        tables, choices, truncated = datamod.tokenize_captions(comp, captions, spec.token, spec.vectors)
        cache = datamod.build_cache(images, comp.vae, resolution, spec.center_crop, spec.flip_p, device)
        if spec.validate:
            comp.vae.to(dtype)  # decoding validation images runs at the UNet's precision
        else:
            comp.vae = None  # not needed again: free it
        yield from _loop(spec, comp, rows, cache, tables, choices, truncated, run, resume, device, dtype,
                         resolution, images, ignored, dist, batch)


def _loop(spec, comp, rows, cache, tables, choices, truncated, run, resume, device, dtype, resolution,
          images, ignored, dist: distributed.Dist, batch: int) -> Iterator[Event]:
    accum, total = spec.grad_accum, spec.steps
    passes = 1 if spec.fuse_accum else accum  # forward/backward passes per optimizer step
    base_lr = spec.lr * (spec.batch_size * accum * spec.num_processes if spec.scale_lr else 1)
    params = list(rows.values())
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(spec.adam_beta1, spec.adam_beta2), eps=spec.adam_eps,
                            weight_decay=spec.weight_decay)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    sampler = Sampler(spec, cache, tables, choices, comp.scaling_factor, comp.scheduler.config.num_train_timesteps,
                      device, rank=dist.rank, world=dist.world, batch_size=batch)
    main = dist.is_main  # only rank 0 writes; the others train in step and stay silent

    start, resumed_from, warnings = 0, None, []
    if resume is not None:
        found = runs.latest_checkpoint(run)
        if found is None:
            warnings.append(f"{run} has no complete checkpoint; starting again from step 0.")
        else:
            info, tensors = state.load_checkpoint(found[1])
            start = min(total, state.restore(info, tensors, rows, opt, spec.token, found[1]))
            if scaler is not None and info.get("scaler"):
                scaler.load_state_dict(info["scaler"])
            resumed_from = str(found[1])

    dist.barrier()  # every rank loaded and checked everything before rank 0 creates the run
    if main:
        run.mkdir(parents=True, exist_ok=True)  # the first write of the run, after every check
        spec.save(run)
        if resume is not None:  # what a killed process left half-written: never picked, now gone
            runs.tidy_for_resume(run, spec.keep_checkpoints)

    def emit(kind, **data):
        return state.record_event(run, Event(kind, data)) if main else Event(kind, data)

    where = {"processes": dist.world} if dist.world > 1 else {}
    yield emit("started", run_dir=str(run), device=str(device), family=comp.family, model=spec.model,
               images=len(images), ignored=[p.name for p in ignored], total_steps=total, start_step=start,
               resumed_from=resumed_from, **where)
    if ignored:
        warnings.append(f"Skipped {len(ignored)} file(s) that are not images: "
                        + ", ".join(p.name for p in ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    if truncated:
        warnings.append(f"{truncated} caption(s) are so long that {spec.token} is cut off at "
                        f"{comp.tokenizers[0].model_max_length} tokens; those steps teach it nothing.")
    for w in warnings:
        yield emit("warning", message=w)

    def snapshot_info(step):
        return {"token": spec.token, "seed": spec.seed, "data_position": _position(spec, step, cache.n_images),
                "scaler": scaler.state_dict() if scaler is not None else None}

    step = start
    last_checkpoint = start if resumed_from else -1
    stop_agreed = False
    with sigint_flag(debounce=1.0 if dist.world > 1 else 0.0) as stop:
        for step in range(start, total):
            lr = lr_at(step, base_lr=base_lr, schedule=spec.lr_schedule, total_steps=total,
                       warmup_steps=spec.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(passes):
                data = sampler.fused(step) if passes == 1 < accum else sampler.batch(step, micro)
                loss = forward_loss(comp, data, dtype) / passes
                (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += loss.detach()
            if dist.world > 1:  # average the gradients (still scaled: all ranks agree on inf/nan)
                loss_sum, stop_agreed = dist.reduce_step(params, loss_sum, stop.requested)
            if scaler is not None:
                scaler.unscale_(opt)
            if spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1

            progress = {"step": done, "total": total, "lr": lr}
            if is_log_step(done, total):
                progress["loss"] = loss_sum.item()  # one process: the only host sync of the loop
            yield emit("progress", **progress)
            if main and spec.save_every and done % spec.save_every == 0:
                path = state.write_vectors(run / "snapshots" / f"step-{done:06d}.safetensors", _vectors(rows), spec,
                                             comp.family, done)
                yield emit("snapshot", step=done, path=str(path))
            if spec.checkpoint_every and done % spec.checkpoint_every == 0:
                last_checkpoint = done
                if main:
                    stop.checkpointing = True
                    path = state.save_checkpoint(run, done, rows, opt, snapshot_info(done), spec.keep_checkpoints)
                    stop.checkpointing = False
                    yield emit("checkpoint", step=done, path=str(path))
            if main and spec.validate and spec.validate_every and done % spec.validate_every == 0:
                paths = modelsmod.validate(comp, spec, run, done, resolution, device)
                yield emit("validation", step=done, paths=[str(p) for p in paths])
            # one process: the flag as it is now; several: as all ranks agreed in reduce_step
            if (stop_agreed if dist.world > 1 else stop.requested) and done < total:
                path = runs.checkpoint_dir(run, done)
                if main and last_checkpoint != done:
                    stop.checkpointing = True
                    path = state.save_checkpoint(run, done, rows, opt, snapshot_info(done), spec.keep_checkpoints)
                    stop.checkpointing = False
                yield emit("interrupted", step=done, checkpoint=str(path))
                return

    done = total
    if main and spec.validate and (not spec.validate_every or done % spec.validate_every):
        paths = modelsmod.validate(comp, spec, run, done, resolution, device)  # once at the end
        yield emit("validation", step=done, paths=[str(p) for p in paths])
    vectors = _vectors(rows)
    meta = state.embedding_meta(spec, comp.family, done)
    path = run / runs.FINAL
    if main:
        state.write_vectors(path, vectors, spec, comp.family, done)
    yield emit("finished", step=done, embedding_path=str(path), token=spec.token, vectors=vectors, meta=meta)


def _vectors(rows: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {slot: r.detach().to("cpu", torch.float32).numpy().copy() for slot, r in rows.items()}


def _position(spec: TrainSpec, step: int, n_images: int) -> dict:
    """Where the data order stands after `step` steps (informational: it follows from the step)."""
    g = step * spec.grad_accum * spec.batch_size * spec.num_processes
    return {"epoch": g // n_images, "index": g % n_images, "samples_seen": g}


