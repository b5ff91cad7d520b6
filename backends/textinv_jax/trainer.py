"""The JAX training session the core's run engine drives (textinv_cli/engine/loop.py): the
model and data loaded and placed on a device mesh, the host side of each step (the
BatchPlan's draws, identical to the torch backend's), step.train_step on the devices, the
rows and optax state as checkpoint files, validation images.

The models are flax.nnx modules loaded into host memory, split once into graphdefs (static,
in step.StepConfig) and state (the Frozen weights, placed on the devices with everything
else the step reads). Many devices: a ("data", "model") Mesh (sharding.py: --mesh DATAxMODEL,
default Nx1); batches are split over every device, large frozen weights over "model",
everything else replicated; XLA inserts the gathers and the gradient all-reduce. Several
hosts (jax.distributed, see backend.py) each draw their own block of the global batch, as
torch ranks do, and only process 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from textinv_cli.engine.batch_plan import BatchPlan, Draw
from textinv_cli.engine.eval_batch import eval_draw
from textinv_cli.engine.captions import add_placeholder_tokens, captions_for, find_images
from textinv_cli.engine.checks import check_token
from textinv_cli.engine.contract import Session
from textinv_cli.engine.infotext import model_label
from textinv_cli.engine.stop import StopFlag
from textinv_cli.errors import TextinvError
from textinv_cli.families import FAMILY_SLOTS
from textinv_cli.engine.spec import TrainSpec

from . import state
from .clip import split_frozen
from .layers import Graph, split
from .data import check_resolution, latent_cache
from .sharding import (batch_sharding, check_model_axis, make_mesh, model_size, place, replicated,
                       train_step_on, weight_shardings)
from .loading import (ImageSide, TextSide, compute_dtype, frozen_in, load_image_side, load_text_sides,
                      model_family, model_folder)
from .step import StepConfig, eval_step, opt_state
from .tokens import start_rows, tokenize_captions
from .validation import validation_images


@dataclass
class Setup:
    """A loaded, checked run: everything train() needs before it writes anything."""

    spec: TrainSpec
    family: str
    texts: list[TextSide]       # in encoder order (SDXL: CLIP-L, OpenCLIP-G)
    image: ImageSide
    slots: tuple[str, ...]      # the rows' slot of each text encoder
    firsts: list[int]           # each tokenizer's first placeholder id
    inits: dict[str, np.ndarray]  # start rows {slot: [n, width]} fp32
    tables: dict[str, np.ndarray]  # caption ids per slot [U, L], the text model's ids
    choices: list
    truncated: int
    mean: np.ndarray      # latent mean per (image, flip) entry [E, C, h, w] (NCHW: the BatchPlan's shape)
    std: np.ndarray
    flips: tuple
    time_ids: np.ndarray  # SDXL's size/crop ids per entry [E, 6]
    images: list
    ignored: list
    resolution: int
    dtype: object
    mesh: Mesh

    @property
    def n_images(self) -> int:
        return len(self.images)

    def config(self, texts: tuple[Graph, ...] | None = None, unet: Graph | None = None) -> StepConfig:
        """The step's static half; `texts`/`unet`: the models' graphs where already split."""
        texts = texts or tuple(split_frozen(t.model)[0] for t in self.texts)
        return StepConfig(texts=tuple(texts), unet=unet or split(self.image.unet)[0], slots=self.slots,
                          prediction_type=self.image.schedule.prediction_type,
                          scaling=float(self.image.vae_config.scaling_factor), dtype=jnp.dtype(self.dtype).name,
                          remat=bool(self.spec.gradient_checkpointing), clip_skip=int(self.spec.clip_skip or 1))

    def frozen(self, texts: dict, unet: dict) -> dict:
        """Everything the step reads besides the rows, on the host (the caller places it):
        the text models' and UNet's frozen weights (`texts` {slot: weights}, from their splits)
        in the compute dtype, the caption tables, the latent cache and its size/crop ids, the
        noise schedule (those last three fp32)."""
        return {"text_encoders": {slot: frozen_in(self.dtype, w) for slot, w in texts.items()},
                "unet": frozen_in(self.dtype, unet), "tables": self.tables, "mean": self.mean, "std": self.std,
                "time_ids": self.time_ids, "ac": self.image.schedule.alphas_cumprod}


# -- setup: everything a user can get wrong, before anything is written ---------------------------

def prepare(spec: TrainSpec, mesh: Mesh | None = None, dtype=None, images: list | None = None,
            captions: list | None = None) -> Setup:
    """Everything a step needs, loaded and checked, on the host (what the session's load does;
    the arguments left out are worked out from the spec)."""
    mesh = mesh if mesh is not None else make_mesh(spec)
    dtype = dtype if dtype is not None else compute_dtype(spec.precision, mesh.devices.flat[0].platform)
    if images is None:
        images, ignored = find_images(Path(spec.data_dir))
    else:
        ignored = []
    if captions is None:
        captions = captions_for(images, spec.token, spec.property, spec.captions)
    folder = model_folder(spec.model)
    family = model_family(folder)
    slots = FAMILY_SLOTS[family]
    texts = load_text_sides(folder, family)
    for slot, text in zip(slots, texts):  # every tokenizer checked before any changes
        check_token(spec.token, text.tokenizer, f"{slot} tokenizer")
    words = [spec.init] if isinstance(spec.init, str) else list(spec.init)
    inits = start_rows(texts, slots, words, spec.vectors, model_label(spec.model), family)
    firsts = [add_placeholder_tokens(text.tokenizer, spec.token, spec.vectors, f"{slot} tokenizer")
              for slot, text in zip(slots, texts)]
    image = load_image_side(folder)
    if image.schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise TextinvError(f"The model's scheduler predicts {image.schedule.prediction_type!r}; textinv trains "
                           "epsilon and v_prediction models.")
    resolution = spec.resolution or image.native_resolution
    check_resolution(resolution, image.vae_config.downscale)
    tables, truncated = {}, 0
    for slot, text, first in zip(slots, texts, firsts):
        tables[slot], choices, cut = tokenize_captions(text.tokenizer, captions, spec.token, spec.vectors, first,
                                                       text.vocab_rows)
        truncated = max(truncated, cut)
    mean, std, flips, time_ids = latent_cache(images, image, resolution, spec.center_crop, spec.flip_p)
    return Setup(spec=spec, family=family, texts=texts, image=image, slots=slots, firsts=firsts, inits=inits,
                 tables=tables, choices=choices, truncated=truncated, mean=mean, std=std, flips=flips,
                 time_ids=time_ids, images=images, ignored=ignored, resolution=resolution, dtype=dtype, mesh=mesh)


# -- host side of a step -------------------------------------------------------------------------

def batch_plan(s: Setup) -> BatchPlan:
    return BatchPlan(seed=s.spec.seed, n_images=s.n_images, batch_size=s.spec.batch_size,
                     grad_accum=s.spec.grad_accum, latent_shape=tuple(s.mean.shape[1:]),
                     num_timesteps=s.image.schedule.num_train_timesteps, rank=jax.process_index(),
                     world=jax.process_count())


def micro_batch(s: Setup, plan: BatchPlan, step: int, micro: int) -> dict:
    """This process's block of a micro-step, as the torch Sampler picks it (host numpy)."""
    return draw_batch(s, plan.draw(step, micro))


def draw_batch(s: Setup, d: Draw) -> dict:
    """A draw's samples as step inputs (a micro-step's, or the fixed evaluation batch's)."""
    counts = np.array([len(c) for c in s.choices])
    offsets = np.cumsum([0] + [len(c) for c in s.choices[:-1]])
    flat = np.array([i for c in s.choices for i in c])
    pick = np.minimum((d.caption_u * counts[d.images]).astype(np.int64), counts[d.images] - 1)
    entry = d.images if len(s.flips) == 1 else d.images * 2 + (d.flip_u < s.spec.flip_p)
    return {"entry": entry.astype(np.int32), "caption": flat[offsets[d.images] + pick].astype(np.int32),
            "eps": d.eps, "noise": d.noise, "t": d.timesteps.astype(np.int32)}


def eval_batch(s: Setup, num_timesteps: int, most: int) -> dict:
    """The fixed evaluation batch (engine/eval_batch.py) as [pieces, B, ...]: B the largest
    divisor of its size up to `most`, so every piece has the same shape."""
    d = eval_draw(s.spec.seed, s.n_images, tuple(s.mean.shape[1:]), num_timesteps)
    full = draw_batch(s, d)
    n = len(full["t"])
    size = max(b for b in range(1, n + 1) if n % b == 0 and b <= max(1, most))
    return {k: v.reshape((n // size, size) + v.shape[1:]) for k, v in full.items()}


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


def validate(s: Setup, cfg: StepConfig, frozen, vae, rows, run: Path, step: int, repl, main: bool) -> list:
    """The --validate images of this step (validation.validation_images), rows as they are now;
    the models are the step's (cfg's graphs, the frozen weights) and `vae` = (graph, weights)."""
    spec = s.spec
    texts = [(graph, frozen["text_encoders"][slot]) for graph, slot in zip(cfg.texts, cfg.slots)]
    nets = {"text_encoders": texts, "unet": (cfg.unet, frozen["unet"]), "vae": vae}
    return validation_images(
        nets, s.image.vae_config, [t.tokenizer for t in s.texts], {slot: rows[slot] for slot in s.slots},
        firsts=s.firsts, vocab_rows=[t.vocab_rows for t in s.texts], clip_skip=cfg.clip_skip,
        scheduler_config=s.image.scheduler_config, prompts=spec.validate, token=spec.token, vectors=spec.vectors,
        steps=spec.validate_steps, seed=spec.seed, resolution=s.resolution, dtype=s.dtype,
        out=run / "samples", step=step, place=lambda x: put(x, repl), write=main)


def describe(mesh: Mesh) -> str:
    """"cpu", "gpu (NVIDIA H200)", "8 x cpu", "8 x cpu, mesh 4x2": what the progress line says
    it trains on (the mesh where weights are split)."""
    devices = list(mesh.devices.flat)
    d = devices[0]
    name = d.platform if d.platform == "cpu" else f"{d.platform} ({d.device_kind})"
    shown = name if len(devices) == 1 else f"{len(devices)} x {name}"
    return shown if model_size(mesh) == 1 else f"{shown}, mesh {mesh.shape['data']}x{model_size(mesh)}"


class JaxSession(Session):
    name = "jax"

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        self.mesh = make_mesh(spec)
        devices = list(self.mesh.devices.flat)
        self.dtype = compute_dtype(spec.precision, devices[0].platform)
        self.procs = jax.process_count()
        self.is_main = jax.process_index() == 0
        self.device, self.n_devices, self.n_processes = describe(self.mesh), len(devices), self.procs
        self.global_batch = spec.batch_size * self.procs
        self.repl, self.sharded = replicated(self.mesh), batch_sharding(self.mesh)
        self.train_step = train_step_on(self.mesh)
        self.warnings: list[str] = []
        self.pending = None
        self._eval = None  # the fixed evaluation batch on the devices (replicated), made at the first eval

    def agree_run_dir(self, planned: str) -> str:
        if self.procs == 1:
            return planned
        # every host planned its own timestamped name; process 0's wins
        raw = np.frombuffer(str(planned).encode().ljust(4096, b"\0")[:4096], np.uint8)
        return str(Path(bytes(multihost_utils.broadcast_one_to_all(raw)).rstrip(b"\0").decode()))

    def load(self, images: list[Path], captions: list[list[str]]) -> None:
        spec = self.spec
        self.s = s = prepare(spec, self.mesh, self.dtype, images, captions)
        self.family = s.family
        self._place(dict(s.inits))
        text_graphs, text_frozen = zip(*(split_frozen(t.model) for t in s.texts))
        unet_graph, unet_weights = split(s.image.unet)
        warning = check_model_axis(unet_weights, self.mesh)  # a model axis that splits nothing: refused
        self.warnings += [warning] if warning else []
        frozen = s.frozen(dict(zip(s.slots, text_frozen)), unet_weights)
        models = {k: frozen.pop(k) for k in ("text_encoders", "unet")}  # large: split over "model" (sharding.py)
        self.frozen = {**place(models, weight_shardings(models, self.mesh)), **put(frozen, self.repl)}
        self.vae = None  # (graph, weights on the devices) for --validate
        if spec.validate:  # decoded at the UNet's precision, as the torch backend's validation
            graph, weights = split(s.image.vae)
            weights = frozen_in(s.dtype, weights)  # decoded at the UNet's precision, as torch's validation
            self.vae = (graph, place(weights, weight_shardings(weights, self.mesh)))
        self.cfg, self.plan = s.config(text_graphs, unet_graph), batch_plan(s)
        self.max_norm = np.float32(spec.max_grad_norm or np.inf)
        gpu = self.mesh.devices.flat[0].platform == "gpu"
        if spec.deterministic and gpu and "deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
            self.warnings.append("--deterministic on a GPU needs XLA_FLAGS=--xla_gpu_deterministic_ops=true set "
                                 "before textinv starts (XLA reads it once); this run's reductions may differ run "
                                 "to run.")
        if s.truncated:
            self.warnings.append(f"{s.truncated} caption(s) are so long that {spec.token} is cut off at "
                                 f"{s.texts[0].tokenizer.model_max_length} tokens; those steps teach it nothing.")

    def _place(self, rows, mu=None, nu=None, count: int = 0) -> None:
        self.st = put((rows, opt_state(self.spec, rows, mu, nu, count)), self.repl)

    def restore(self, folder: Path) -> int:
        info, tensors = state.load_checkpoint(folder)
        shapes = {slot: self.s.inits[slot].shape for slot in self.s.slots}
        step, rows, mu, nu, count = state.restore(info, tensors, shapes, self.spec.token, folder)
        self._place(rows, mu, nu, count)
        return step

    def barrier(self) -> None:
        if self.procs > 1:  # every host has checked and loaded everything before process 0 creates the run
            multihost_utils.sync_global_devices("textinv: run checked")

    def step(self, step: int, lr: float, stop: StopFlag, log: bool) -> float | None:
        batch = put(step_batch(self.s, self.plan, step), self.sharded)
        self.st, metrics = self.train_step(self.st, self.frozen, batch, np.float32(lr), self.max_norm, cfg=self.cfg)
        if self.pending is not None:
            self.pending.block_until_ready()  # keep at most one step queued behind the running one
        self.pending = metrics["loss"]
        return float(host(metrics["loss"])) if log else None  # the loop's only host sync

    def agree_to_stop(self, stop: StopFlag) -> bool:
        if self.procs == 1:
            return stop.requested
        # every host stops after the same step, or none does
        return bool(multihost_utils.process_allgather(np.int32(stop.requested)).max())

    def checkpoint_files(self, step: int, info: dict) -> dict[str, bytes]:
        rows, adam = host(self.st[0]), host(self.st[1].inner_state[0])
        rows = {slot: rows[slot] for slot in self.s.slots}  # encoder order, as torch's (jax sorts dict keys)
        return state.checkpoint_files(step, rows, adam.mu, adam.nu, int(adam.count), {**info, "backend": "jax"})

    def vectors(self) -> dict[str, np.ndarray]:
        rows = host(self.st[0])
        return {slot: np.array(rows[slot], np.float32) for slot in self.s.slots}

    def eval_loss(self) -> float:
        if self._eval is None:
            # replicated: every device evaluates each piece, so a piece is at most what one
            # device takes of a training micro-step (an eval never needs more memory than a step)
            local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
            pieces = eval_batch(self.s, self.s.image.schedule.num_train_timesteps, self.spec.batch_size // local)
            self._eval = put(pieces, self.repl)
        return float(host(eval_step(self.st[0], self.frozen, self._eval, cfg=self.cfg)))  # the eval's host sync

    def validate(self, run: Path, step: int) -> list[Path]:
        # every process renders (the replicated program needs them all); only process 0 saves
        return validate(self.s, self.cfg, self.frozen, self.vae, self.st[0], run, step, self.repl, self.is_main)
