"""The torch training session the core's run engine drives (textinv_cli/engine/loop.py):
load the model and data, restore a checkpoint, one optimizer step (step.py holds the math),
the rows and AdamW state as checkpoint files, validation images.

Data-parallel (distributed.py): launched with WORLD_SIZE > 1, every process runs the same
session on its block of each global batch; the rows' gradients are averaged across
processes once per step, in one all_reduce that also carries the Ctrl-C flag, and only
rank 0 writes anything (the engine asks `is_main`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from textinv_cli.engine.contract import Session
from textinv_cli.engine.eval_batch import eval_draw
from textinv_cli.engine.stop import StopFlag
from textinv_cli.models.resolve import resolve_model
from textinv_cli.engine.quiet_libraries import quiet
from textinv_cli.engine.spec import TrainSpec

from . import distributed, state
from .data import check_resolution, latent_cache
from .loading import checkpointing_on, compute_dtype, enable_xformers, load_image_side, load_text_side
from .step import Sampler, accumulate, eval_loss, update
from .tokens import install_rows, prepare_rows, tokenize_captions
from .validation import validation_images


@contextlib.contextmanager
def determinism(on: bool, threads: int | None = None):
    """Deterministic kernels if asked; `threads` sets torch's CPU threads for the run (tiny
    models on a busy 2-core machine run several times faster on one thread)."""
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


class TorchSession(Session):
    name = "torch"

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        self.dist = distributed.setup(spec)  # one process: rank 0 of 1 on pick_device(spec)
        self.torch_device = self.dist.device
        self.dtype = compute_dtype(spec.precision, self.torch_device)
        self.batch = distributed.local_batch(spec, self.dist.world)
        self.device, self.n_processes, self.is_main = str(self.torch_device), self.dist.world, self.dist.is_main
        self.global_batch = spec.batch_size * spec.num_processes
        self.stop_debounce = 1.0 if self.dist.world > 1 else 0.0
        self.warnings: list[str] = []
        self._stop_agreed = False
        self._eval = None  # the fixed evaluation batch on the device, made at the first eval

    def agree_run_dir(self, planned: str) -> str:
        return self.dist.broadcast(planned) if self.dist.world > 1 else planned

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with determinism(self.spec.deterministic, self.spec.threads), quiet():
            yield

    def load(self, images: list[Path], captions: list[list[str]]) -> None:
        spec, device, dtype = self.spec, self.torch_device, self.dtype
        comp = load_text_side(resolve_model(spec.model))
        comp.clip_skip = getattr(spec, "clip_skip", 1)
        words = [spec.init] if isinstance(spec.init, str) else list(spec.init)
        comp.prepared = prepare_rows(comp, spec.token, words, spec.vectors)
        load_image_side(comp)
        self.resolution = spec.resolution or comp.native_resolution
        check_resolution(self.resolution, comp.vae_scale)
        if spec.attention == "xformers":
            enable_xformers(comp.unet, device)
        for te in comp.text_encoders:
            te.to(device, dtype)
        comp.unet.to(device, dtype)
        comp.vae.to(device)  # fp32 for the one-off encoding: no fp16 overflow, cheap
        if spec.gradient_checkpointing:
            comp.unet.enable_gradient_checkpointing()
            for te in comp.text_encoders:  # transformers checkpoints only in train mode (CLIP has no dropout)
                checkpointing_on(te)
        self.rows = install_rows(comp, comp.prepared, device)
        tables, choices, truncated = tokenize_captions(comp, captions, spec.token, spec.vectors)
        cache = latent_cache(images, comp.vae, self.resolution, spec.center_crop, spec.flip_p, device)
        if spec.validate:
            comp.vae.to(dtype)  # decoding validation images runs at the UNet's precision
        else:
            comp.vae = None  # not needed again: free it
        self.comp, self.family = comp, comp.family
        if truncated:
            self.warnings.append(f"{truncated} caption(s) are so long that {spec.token} is cut off at "
                                 f"{comp.tokenizers[0].model_max_length} tokens; those steps teach it nothing.")

        self.params = list(self.rows.values())
        self.opt = torch.optim.AdamW(self.params, lr=spec.lr, betas=(spec.adam_beta1, spec.adam_beta2),
                                     eps=spec.adam_eps, weight_decay=spec.weight_decay)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.sampler = Sampler(spec, cache, tables, choices, comp.scaling_factor,
                               comp.scheduler.config.num_train_timesteps, device, rank=self.dist.rank,
                               world=self.dist.world, batch_size=self.batch)
        self.passes = 1 if spec.fuse_accum else spec.grad_accum  # forward/backward passes per optimizer step

    def restore(self, folder: Path) -> int:
        info, tensors = state.load_checkpoint(folder)
        step = state.restore(info, tensors, self.rows, self.opt, self.spec.token, folder)
        if self.scaler is not None and info.get("scaler"):
            self.scaler.load_state_dict(info["scaler"])
        return step

    def barrier(self) -> None:
        self.dist.barrier()

    def step(self, step: int, lr: float, stop: StopFlag, log: bool) -> float | None:
        loss_sum = accumulate(self.comp, self.sampler, step, passes=self.passes, dtype=self.dtype, scaler=self.scaler)
        if self.dist.world > 1:  # average the gradients (still scaled: all ranks agree on inf/nan)
            loss_sum, self._stop_agreed = self.dist.reduce_step(self.params, loss_sum, stop.requested)
        update(self.opt, self.params, lr, self.spec.max_grad_norm, self.scaler)
        return loss_sum.item() if log else None  # one process: the only host sync of the loop

    def agree_to_stop(self, stop: StopFlag) -> bool:
        # one process: the flag as it is now; several: as all ranks agreed in reduce_step
        return self._stop_agreed if self.dist.world > 1 else stop.requested

    def checkpoint_files(self, step: int, info: dict) -> dict[str, bytes]:
        info = {**info, "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        return state.checkpoint_files(step, self.rows, self.opt, info)

    def vectors(self) -> dict[str, np.ndarray]:
        return {slot: r.detach().to("cpu", torch.float32).numpy().copy() for slot, r in self.rows.items()}

    def eval_loss(self) -> float:
        s = self.sampler
        if self._eval is None:
            self._eval = s.from_draw(eval_draw(self.spec.seed, s.cache.n_images, tuple(s.cache.mean.shape[1:]),
                                               s.plan.num_timesteps))
        # pieces of the training batch's size: an eval never needs more memory than a step
        chunk = self.batch * (self.spec.grad_accum if self.spec.fuse_accum else 1)
        return eval_loss(self.comp, self._eval, self.dtype, chunk=chunk)

    def validate(self, run: Path, step: int) -> list[Path] | None:
        if not self.is_main:
            return None  # only rank 0 renders; the others wait at the next step's all_reduce
        return validation_images(self.comp, self.spec, run, step, self.resolution, self.torch_device)
