"""`JaxBackend.sample` and the denoising loop it shares with validation.py: text -> DDIM,
DPM-Solver++ 2M (Karras), Euler or Euler a with classifier-free guidance -> VAE decode -> PNG,
all in JAX.

What the torch backend's diffusers pipeline computes, step for step: the prompt and the
negative prompt (or "") are encoded once, each denoising step runs the UNet on
[uncond, cond] and mixes uncond + guidance * (cond - uncond) (guidance <= 1: the prompt
alone, as diffusers does), and the image is `decode(latents / scaling_factor)` mapped to
[0, 1] and rounded to 8 bits. Embeddings enter as extra rows of the text encoder (tokens.py),
so sampling never touches the 49k-row token table.

Image i starts from `jax.random.normal(key(seed + i))` times the sampler's init_noise_sigma
(threefry: the same picture on any device); Euler a's fresh noise at step k is
`normal(fold_in(step_key(seed + i), k))`, per image. The pixels differ from the torch
backend's, whose noise comes from torch's RNG.
Images go through the UNet `batch_size` at a time (their noises stacked, so image i is the
same picture alone or in a batch, up to float rounding); a short last batch is padded to
the batch's shape, so the UNet compiles once. One jitted function per denoising step,
called from a host loop, so `progress` events follow the work. PNGs are named and annotated the way
A1111 writes them (textinv_cli.engine.infotext), exactly as the torch sampler does.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from textinv_cli.engine.checks import check_sample_request
from textinv_cli.engine.samplers import find, key_of
from textinv_cli.errors import TextinvError
from textinv_cli.engine.infotext import check_out_dir as _check_out_dir
from textinv_cli.engine.batch_sizes import batches, pick_batch_size
from textinv_cli.families import FAMILY_SLOTS
from textinv_cli.engine.spec import Event, SampleFinished, SampleProgress, SampleRequest, SampleStarted, Sampled

from . import sampler_tables, samplers
from .clip import rows_state, split_frozen
from .conditioning import sdxl_time_ids, text_conditioning
from .layers import split
from .loading import compute_dtype, frozen_in, load_image_side, load_text_sides, model_family, model_folder
from .tokens import add_embeddings, encode, expand_all, to_model_ids

# Our scheduler names -> A1111's sampler name for the infotext (the torch backend's names).
SCHEDULERS = {"euler": "Euler", "euler-a": "Euler a", "dpm++": "DPM++ 2M", "dpm++-karras": "DPM++ 2M Karras",
              "ddim": "DDIM"}  # in engine/samplers.py's (A1111's menu) order
RUNS = SimpleNamespace(name="jax", schedulers=tuple(SCHEDULERS))  # as JaxBackend declares, for direct callers


def make_plan(name: str, scheduler_config: dict, steps: int, **override):
    """The sampler plan, read from the model's scheduler config as diffusers' from_config does."""
    sampler = find(name)
    key = sampler.key if sampler else name
    if key not in SCHEDULERS:
        raise TextinvError(f"The jax backend samples with {', '.join(SCHEDULERS.values())}, not {name!r}.",
                           "Pass --scheduler DDIM, or --backend torch for the others.")
    # the sampler's settings over the model's config, as the torch backend's make_scheduler
    config = {**scheduler_config, **sampler.config, **override}
    if key == "ddim":
        return samplers.ddim_plan(sampler_tables.ddim_config(config), steps)
    if key in ("dpm++", "dpm++-karras"):
        return samplers.dpmpp_2m_plan(sampler_tables.dpmpp_2m_config(config), steps)
    return samplers.euler_plan(sampler_tables.euler_config(config, ancestral=key == "euler-a"), steps)


# -- the jitted pieces --------------------------------------------------------------------------

@partial(jax.jit, static_argnums=0, static_argnames=("clip_skip", "dtype"))
def text_states(graphs, frozens, rows, ids, *, clip_skip: int = 1, dtype):
    """The UNet's conditioning (conditioning.text_conditioning): (context [B, T, D], SDXL's
    pooled text_embeds [B, P] or None) for ids (one [B, T] per text model) from the text
    models split by clip.split_frozen (`graphs` a tuple of their Graphs, `frozens` their
    weights), with `rows` [n, width] per model as its new tokens (n may be 0)."""
    models = [graph.merge(rows_state(r), frozen) for graph, frozen, r in zip(graphs, frozens, rows)]
    return text_conditioning(models, ids, xl=len(models) == 2, clip_skip=clip_skip, dtype=dtype)


@partial(jax.jit, static_argnums=0, static_argnames=("dtype", "guided"))
def denoise_step(graph, weights, plan, i, x, prev_x0, context, guidance, keys=None, added=None, *, dtype, guided):
    """One sampler step from x [B, h, w, C] with the UNet split into (graph, weights)
    (layers.split); context [2B, T, D] (B uncond, then B cond) or [B, T, D]; keys: one PRNG
    key per image (step_key), for Euler a's fresh noise; added: SDXL's {"text_embeds",
    "time_ids"} with context's batch."""
    unet = graph.merge(weights)
    t = plan.timesteps[i]
    x_in = samplers.model_input(plan, i, x)
    if guided:
        out = unet(jnp.concatenate([x_in, x_in]), t, context, added_cond=added, dtype=dtype)
        uncond, cond = jnp.split(out, 2)
        out = uncond + guidance * (cond - uncond)
    else:
        out = unet(x_in, t, context, added_cond=added, dtype=dtype)
    if isinstance(plan, samplers.DDIMPlan):
        return samplers.ddim_step(plan, i, out, x)
    if isinstance(plan, samplers.EulerPlan):
        noise = None
        if plan.ancestral:  # each image's own stream: the same alone or in a batch
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(keys)
        return samplers.euler_step(plan, i, out, x, noise)
    return samplers.dpmpp_2m_step(plan, i, out, x, prev_x0)


@partial(jax.jit, static_argnums=0, static_argnames="dtype")
def decode(graph, weights, latents, *, dtype):
    """Latents -> float32 RGB [B, H, W, 3] in [0, 1] by the VAE split into (graph, weights)
    (layers.split), as the pipeline's image processor."""
    vae = graph.merge(weights)
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return jnp.clip(vae.decode(z, dtype=dtype) / 2 + 0.5, 0.0, 1.0)


def denoise(nets: dict, context, *, plan, guidance: float, noise, dtype, keys=None, pooled=None,
            time_ids=None) -> Iterator[int]:
    """Run every step of `plan` from `noise` [1, h, w, C] (a standard normal: scaled by the
    plan's init_noise_sigma here); yields each finished step index and returns the image as
    float32 [H, W, 3] in [0, 1] (use `image = yield from denoise(...)`).

    nets: {"unet", "vae"}: each model as layers.split gives it, (graph, weights), the weights
    already on the device; keys: per image PRNG keys (step_keys), needed by Euler a; SDXL:
    pooled, the text_embeds with context's rows, and time_ids [6] (conditioning.sdxl_time_ids)."""
    images = yield from denoise_batch(nets, context, plan=plan, guidance=guidance, noise=noise, dtype=dtype,
                                      keys=keys, pooled=pooled, time_ids=time_ids)
    return images[0]


def denoise_batch(nets: dict, context, *, plan, guidance: float, noise, dtype, keys=None, pooled=None,
                  time_ids=None) -> Iterator[int]:
    """`denoise` for a batch: noise [B, h, w, C], one prompt's context [2, T, D] (negative,
    prompt) or [1, T, D], keys [B] (Euler a), SDXL's pooled [2 or 1, P] and time_ids [6];
    returns float32 images [B, H, W, 3] in [0, 1]."""
    if getattr(plan, "ancestral", False) and keys is None:
        raise ValueError("Euler a needs one PRNG key per image (step_keys)")
    noise = noise * plan.init_noise_sigma
    guided = context.shape[0] == 2
    context = jnp.repeat(context, noise.shape[0], axis=0)  # [u, c] -> [u]*B + [c]*B, as denoise_step takes
    added = None
    if pooled is not None:  # SDXL: the same size/crop ids for negative and prompt, as the pipeline's
        added = {"text_embeds": jnp.repeat(pooled, noise.shape[0], axis=0),
                 "time_ids": jnp.tile(jnp.asarray(time_ids, jnp.float32)[None], (context.shape[0], 1))}
    # Everything committed to the params' devices up front: outputs come back committed, and
    # an uncommitted first input would compile the step a second time for step 2.
    where = jax.tree.leaves(nets["unet"][1])[0].sharding
    x, x0, plan, g, context, keys, added = jax.device_put(
        (noise, jnp.zeros_like(noise), plan, jnp.float32(guidance), context, keys, added), where)
    for i in range(plan.steps):
        x, x0 = denoise_step(*nets["unet"], plan, i, x, x0, context, g, keys, added, dtype=dtype, guided=guided)
        x.block_until_ready()  # progress events follow the work, not the dispatch
        yield i
    return np.asarray(decode(*nets["vae"], x, dtype=dtype))


def initial_noise(seed: int, height: int, width: int, vae_config) -> jax.Array:
    f = vae_config.downscale
    shape = (1, height // f, width // f, vae_config.latent_channels)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)  # denoise scales it by init_noise_sigma


def step_key(seed: int) -> jax.Array:
    """Image `seed`'s PRNG key for the noise a sampler adds while it denoises (Euler a); apart
    from initial_noise's key(seed)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def step_keys(seeds) -> jax.Array:
    """step_key of each seed, stacked: [B] keys."""
    return jnp.stack([step_key(seed) for seed in seeds])


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray((image * 255).round().astype(np.uint8))  # diffusers' numpy_to_pil


# -- the entry point ------------------------------------------------------------------------------

def prompt_states(folder: Path, texts: list, rows: list, firsts: list[int], request: SampleRequest, dtype, put):
    """(context [2 or 1, T, D], SDXL's pooled [2 or 1, P] or None) of the negative prompt
    (with guidance above 1, as diffusers) and the prompt, computed as the torch backend's
    diffusers pipeline is made to: Clip skip on the prompt and the negative prompt (A1111's
    rule; the torch backend hands diffusers the negative's embeddings for it), and SDXL's empty
    negative as zeros where the model's force_zeros_for_empty_prompt says so (its pipeline's
    default: yes)."""
    graphs, frozens = zip(*(split_frozen(t.model) for t in texts))
    frozens = put([frozen_in(dtype, f) for f in frozens])
    rows = put([np.zeros((0, t.width), np.float32) if r is None else r for t, r in zip(texts, rows)])

    def states(prompt: str, clip_skip: int):
        text = expand_all(prompt, request.embeddings)
        ids = [to_model_ids(encode(t.tokenizer, [text]), first, t.vocab_rows) for t, first in zip(texts, firsts)]
        return text_states(tuple(graphs), frozens, rows, ids, clip_skip=clip_skip, dtype=dtype)

    skip = int(request.clip_skip or 1)
    context, pooled = states(request.prompt, skip)
    if request.guidance <= 1:  # diffusers: classifier-free guidance only above 1
        return context, pooled
    if pooled is not None and not request.negative and _force_zeros(folder):
        neg, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
    else:
        neg, neg_pooled = states(request.negative, skip)
    return (jnp.concatenate([neg, context]),
            None if pooled is None else jnp.concatenate([neg_pooled, pooled]))


def _force_zeros(folder: Path) -> bool:
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True)) if isinstance(index, dict) else True


def sample(request: SampleRequest, backend=None) -> Iterator[Event]:
    """Render request.n images; yield started, progress (per denoising step), sample, finished.
    `backend`: the JaxBackend asking, whose declared schedulers the request is checked against."""
    from textinv_cli.engine.infotext import infotext, save_pngs

    # the CLI checked already; this guards other callers
    check_sample_request(request, backend if backend is not None else RUNS)
    out_dir = Path(request.out_dir)
    _check_out_dir(out_dir)  # before the (slow) model load; created only once there is an image
    t0 = time.monotonic()
    device = jax.local_devices()[0]
    dtype = compute_dtype(request.precision, device.platform)
    folder = model_folder(request.model)
    name = Path(request.model).name if Path(request.model).is_dir() else request.model
    family = model_family(folder)
    slots = FAMILY_SLOTS[family]
    texts = load_text_sides(folder, family)
    rows, firsts = add_embeddings(texts, slots, request.embeddings, name, family)
    image = load_image_side(folder)
    plan = make_plan(key_of(request.scheduler), image.scheduler_config, request.steps)
    height = request.height or image.native_resolution
    width = request.width or image.native_resolution

    # every weight in the compute dtype, as the torch backend's pipeline is loaded in it
    put = partial(jax.device_put, device=device)
    nets = {name: (graph, put(frozen_in(dtype, weights))) for name, (graph, weights) in (
        ("unet", split(image.unet)), ("vae", split(image.vae)))}
    context, pooled = prompt_states(folder, texts, rows, firsts, request, dtype, put)

    n, steps = request.n, request.steps
    batch = pick_batch_size(n, request.batch_size, width, height)
    yield Event.of(SampleStarted(
        model=name, family=family, device=device.platform, precision=request.precision,
        scheduler=request.scheduler, sampler=SCHEDULERS[key_of(request.scheduler)],
        images=n, batch_size=batch, steps=steps, total=n * steps, out_dir=str(out_dir),
        embeddings=[{"name": r.name, "token": r.token, "vectors": int(next(iter(r.vectors.values())).shape[0])}
                    for r in request.embeddings]))
    paths = []
    for start, count in batches(n, batch):
        seeds = [request.seed + start + j for j in range(count)]
        noise = jnp.concatenate([initial_noise(seed, height, width, image.vae_config) for seed in seeds])
        keys = step_keys(seeds + [request.seed] * (batch - count if n > batch else 0))
        if n > batch:  # pad a short last batch: one UNet shape, one compile
            noise = jnp.concatenate([noise, jnp.zeros((batch - count,) + noise.shape[1:], noise.dtype)])
        run = denoise_batch(nets, context, plan=plan, guidance=request.guidance, dtype=dtype, noise=noise,
                            keys=keys, pooled=pooled, time_ids=sdxl_time_ids(height, width))
        while True:
            try:
                step = next(run)
            except StopIteration as done:
                pixels = done.value[:count]
                break
            yield Event.of(SampleProgress(image=start, batch=count, images=n, step=step + 1, steps=steps,
                                          done=start * steps + (step + 1) * count, total=n * steps))
        out_dir.mkdir(parents=True, exist_ok=True)
        texts = [infotext(request, seed=seed, width=width, height=height, model_name=name,
                          sampler=SCHEDULERS[key_of(request.scheduler)]) for seed in seeds]
        saved = save_pngs([to_pil(p) for p in pixels], out_dir, seeds, texts)
        for j, (seed, path) in enumerate(zip(seeds, saved)):
            paths.append(str(path))
            yield Event.of(Sampled(path=str(path), seed=seed, index=start + j, width=width, height=height))
    yield Event.of(SampleFinished(paths=paths, out_dir=str(out_dir), seconds=round(time.monotonic() - t0, 3)))
