"""`TorchBackend.sample`: generate images with registered embeddings through diffusers.

The embeddings go in with diffusers' own `load_textual_inversion` (tokens.add_embeddings;
twice for SDXL: clip_l into text_encoder/tokenizer, clip_g into text_encoder_2/tokenizer_2,
as diffusers documents it), and the images come from the stock pipelines, so what we render is exactly what a
diffusers user gets from the same files and seed.

Image i uses its own `torch.Generator(device).manual_seed(seed + i)`. Images are rendered
`batch_size` at a time (one pipeline call, one UNet call per step for the whole batch: 8x
the throughput of one by one on a GPU), and diffusers draws each image's noise from its own
generator of the list, so image i is the same picture whether rendered alone or in any batch
(up to float noise of batched kernels), and A1111's `Seed: N` reproduces it alone.
PNGs are named and annotated the way A1111 writes them (`00000-<seed>.png`, a `parameters`
text chunk in its infotext format), so image browsers and "PNG info" readers show them.

The backend never prints: it yields Events (started, progress, sample, finished).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

from textinv_cli.engine.checks import check_sample_request
from textinv_cli.errors import TextinvError
from textinv_cli.engine.infotext import check_out_dir as _check_out_dir, infotext, save_pngs
from textinv_cli.engine.quiet_libraries import quiet
from textinv_cli.engine.batch_sizes import batches, pick_batch_size
from textinv_cli.engine.spec import Event, SampleFinished, SampleProgress, SampleRequest, SampleStarted, Sampled
from textinv_cli.engine import samplers

from .tokens import add_embeddings

_POLL_S = 0.1  # how often the event loop wakes while a step runs (keeps Ctrl-C responsive)


# -- the entry point ----------------------------------------------------------------------

def sample(request: SampleRequest) -> Iterator[Event]:
    """Render request.n images; yield started, progress (per denoising step), sample, finished."""
    check_sample_request(request)  # the CLI checked already; this guards other callers
    out_dir = Path(request.out_dir)
    _check_out_dir(out_dir)  # before the (slow) model load; created only once there is an image
    import torch

    t0 = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(request.precision, device)
    pipe, info = load_pipeline(request.model, dtype)
    add_embeddings(pipe, request.embeddings, info)
    sampler = samplers.get(request.scheduler)  # any spelling check_sample_request accepted
    pipe.scheduler = make_scheduler(sampler.key, pipe.scheduler.config)
    order = max(1, int(getattr(pipe.scheduler, "order", 1)))  # Heun, DPM++ SDE: 2 timesteps per step
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    n, steps = request.n, request.steps
    batch = pick_batch_size(n, request.batch_size, *_size(pipe, request))
    yield Event.of(SampleStarted(
        model=info["name"], family=info["family"], device=device, precision=request.precision,
        scheduler=sampler.key, sampler=sampler.name,
        images=n, batch_size=batch, steps=steps, total=n * steps, out_dir=str(out_dir),
        embeddings=[{"name": r.name, "token": r.token, "vectors": _n_vectors(r)} for r in request.embeddings]))
    paths = []
    for start, count in batches(n, batch):
        seeds = [request.seed + start + j for j in range(count)]
        negative = _negative_with_clip_skip(pipe, request, device)
        kwargs = dict(
            prompt=request.prompt, negative_prompt=None if negative else request.negative or None, **negative,
            num_inference_steps=steps,
            guidance_scale=request.guidance, width=request.width, height=request.height,
            num_images_per_prompt=count, generator=[torch.Generator(device).manual_seed(s) for s in seeds],
            output_type="pil",
            # A1111's Clip skip N is diffusers' clip_skip N-1 (the layer before the last: 1)
            **({"clip_skip": request.clip_skip - 1} if _clip_skip_ready(pipe, request) > 1 else {}),
        )
        runner = _StepStream(pipe, kwargs)
        last = 0
        try:
            for step in runner:
                # second-order schedulers call back on each of their 2 * steps - 1 timesteps
                done = min((step + order) // order, steps)
                if done == last:
                    continue
                last = done
                # one denoising step of the batch advances each of its `count` images by one step
                yield Event.of(SampleProgress(image=start, batch=count, images=n, step=done, steps=steps,
                                              done=start * steps + done * count, total=n * steps))
        except torch.cuda.OutOfMemoryError:
            raise TextinvError(f"Out of GPU memory rendering {count} image(s) at once.",
                               f"Pass a smaller --batch-size (e.g. {max(1, count // 2)}).") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        images = runner.images
        texts = [infotext(request, seed=seed, width=image.width, height=image.height, model_name=info["name"],
                          sampler=sampler.name) for seed, image in zip(seeds, images)]
        for j, (seed, image, path) in enumerate(zip(seeds, images, save_pngs(images, out_dir, seeds, texts))):
            paths.append(str(path))
            yield Event.of(Sampled(path=str(path), seed=seed, index=start + j, width=image.width,
                                   height=image.height))
    yield Event.of(SampleFinished(paths=paths, out_dir=str(out_dir), seconds=round(time.monotonic() - t0, 3)))


def _size(pipe, request: SampleRequest) -> tuple[int, int]:
    """(width, height) the pipeline will render: the request's, else the UNet's native size."""
    native = pipe.unet.config.sample_size
    native_h, native_w = (native, native) if isinstance(native, int) else native
    return (request.width or native_w * pipe.vae_scale_factor, request.height or native_h * pipe.vae_scale_factor)


def _dtype(precision: str, device: str):
    from .loading import torch_dtype

    if precision == "fp16" and device == "cpu":
        # Many CPU kernels have no fp16 implementation; it would fail mid-run or crawl.
        raise TextinvError("fp16 sampling needs a CUDA GPU, and none is available.",
                           "Use --precision fp32 (or bf16) on the CPU.")
    return torch_dtype(precision)


def _n_vectors(ref) -> int:
    return int(next(iter(ref.vectors.values())).shape[0]) if ref.vectors else 0


# -- the model ----------------------------------------------------------------------------

def model_display_name(model: str) -> str:
    """What messages and the infotext call the model (infotext.model_label's rule)."""
    from textinv_cli.engine.infotext import model_label

    return model_label(model)


def _model_index(model: str, local: bool) -> dict:
    """model_index.json, from the folder or through the Hub cache (offline -> cache only)."""
    from textinv_cli.models.resolve import offline

    if local:
        return json.loads((Path(model) / "model_index.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "model_index.json", local_files_only=offline())).read_text())
    except Exception as e:  # noqa: BLE001 - any Hub/cache failure means the same thing to the user
        raise _unavailable(model, e) from None


def _unavailable(model: str, e: Exception) -> TextinvError:
    from textinv_cli.models.resolve import offline

    msg = (f"The model {model} is not in the Hugging Face cache, and the Hub is offline (HF_HUB_OFFLINE)."
           if offline() else f"Cannot get the model {model} from the Hugging Face Hub: {type(e).__name__}: {e}")
    return TextinvError(msg, "Pass --model with a local diffusers folder (or a cached Hub id), "
                             "or --model tiny for the built-in demo model.")


def _negative_with_clip_skip(pipe, request, device) -> dict:
    """The negative prompt's embeddings at A1111's Clip skip, for the pipeline: A1111 encodes
    every text at that layer, the negative prompt too, while diffusers' encode_prompt gives
    clip_skip to the prompt alone. {} where nothing differs (Clip skip 1, no guidance, SDXL's
    empty negative, which its pipeline makes zeros)."""
    import torch

    skip = _clip_skip_ready(pipe, request)
    if skip <= 1 or request.guidance <= 1:
        return {}
    xl = getattr(pipe, "text_encoder_2", None) is not None
    if xl and not request.negative and pipe.config.get("force_zeros_for_empty_prompt", True):
        return {}
    with torch.no_grad():
        out = pipe.encode_prompt(request.negative or "", device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False, clip_skip=skip - 1)
    if xl:
        return {"negative_prompt_embeds": out[0], "negative_pooled_prompt_embeds": out[2]}
    return {"negative_prompt_embeds": out[0]}


def _clip_skip_ready(pipe, request) -> int:
    """request.clip_skip, after making the pipeline able to use it: diffusers' SD 1.x/2.x
    clip_skip path calls text_encoder.text_model.final_layer_norm, which transformers 5's
    CLIPTextModel no longer has (the norm sits on the model itself). A plain attribute (not a
    submodule: nothing is registered twice) points diffusers at it."""
    from types import SimpleNamespace

    skip = int(getattr(request, "clip_skip", 1) or 1)
    te = getattr(pipe, "text_encoder", None)
    if skip > 1 and te is not None and not hasattr(te, "text_model") and hasattr(te, "final_layer_norm"):
        te.text_model = SimpleNamespace(final_layer_norm=te.final_layer_norm)
    return skip


def load_pipeline(model: str, dtype=None):
    """(pipeline on the CPU, info {name, family, path}) for a tiny name, a folder or a Hub id."""
    import torch
    from textinv_cli.models.resolve import model_family, offline, resolve_model

    model = resolve_model(model)  # idempotent for folders/Hub ids; builds a tiny model if named
    local = Path(model).is_dir()
    name = model_display_name(model)
    cls_name = _model_index(model, local).get("_class_name", "")
    # `torch_dtype` is deprecated in newer diffusers, but older ones (>= 0.30, which we support)
    # only know it: keep it, without the FutureWarning.
    with quiet(future_warnings=False):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if cls_name == "StableDiffusionXLPipeline":
            cls, extra = StableDiffusionXLPipeline, {}
        elif cls_name == "StableDiffusionPipeline":
            # No safety checker: we render for the person training the embedding, as A1111 does.
            cls, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
        else:
            raise TextinvError(f"{name} is a {cls_name or 'non-diffusers'} model; textinv samples "
                               "Stable Diffusion 1.x, 2.x and XL pipelines.",
                               "Pass --model with a Stable Diffusion model, or --model tiny.")
        try:
            pipe = cls.from_pretrained(model, torch_dtype=dtype or torch.float32,
                                       local_files_only=local or offline(), **extra)
        except TextinvError:
            raise
        except Exception as e:  # noqa: BLE001 - third-party loading code; say which model and why
            if not local:
                raise _unavailable(model, e) from None
            raise TextinvError(f"Cannot load the model at {model}: {type(e).__name__}: {e}",
                               "Check it is a complete diffusers folder (written by save_pretrained).") from None
    family = (model_family(model) if local else None) or _pipeline_family(pipe)
    return pipe, {"name": name, "family": family, "path": model}


def _pipeline_family(pipe) -> str:
    if hasattr(pipe, "text_encoder_2"):
        return "sdxl"
    # OpenCLIP (SD 2.x) uses plain gelu, OpenAI CLIP (SD 1.x) quick_gelu: as models.model_family.
    return "sd2" if getattr(pipe.text_encoder.config, "hidden_act", "") == "gelu" else "sd1"


def make_scheduler(name: str, config):
    """The asked-for scheduler (A1111's name or our key: engine/samplers.py's table), built from
    the model's own scheduler config (betas, prediction type) plus the sampler's settings."""
    import diffusers

    sampler = samplers.get(name)
    if sampler.needs:
        import importlib.util

        if importlib.util.find_spec(sampler.needs) is None:
            raise TextinvError(f"The {sampler.name} sampler needs the {sampler.needs} package, which is not installed.",
                               f"Install it (pip install {sampler.needs}), or pass --scheduler \"DPM++ 2M Karras\".")
    return getattr(diffusers, sampler.diffusers).from_config(config, **sampler.config)


# -- running the pipeline with live progress ------------------------------------------------

class _Cancelled(Exception):
    """Raised inside the pipeline's step callback when the consumer went away (Ctrl-C, close)."""


class _StepStream:
    """Run one pipeline call (a batch of images) in a worker thread; iterate to get each
    finished step index; `.images` holds the batch's PIL images afterwards.

    A generator cannot yield from inside diffusers' `callback_on_step_end`, so the callback
    hands step numbers over a queue. If the consumer stops (Ctrl-C, generator closed), the
    next callback raises and the worker ends after the step it is in.
    """

    def __init__(self, pipe, kwargs):
        self.pipe, self.kwargs = pipe, kwargs
        self.images: list = []

    def __iter__(self):
        steps: queue.Queue = queue.Queue()
        stop = threading.Event()
        outcome: dict = {}

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if stop.is_set():
                raise _Cancelled()
            steps.put(step)
            return callback_kwargs

        def work():
            try:
                outcome["images"] = self.pipe(**self.kwargs, callback_on_step_end=on_step_end).images
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
                outcome["error"] = e
            finally:
                steps.put(None)

        worker = threading.Thread(target=work, name="textinv-sample", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    step = steps.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if step is None:
                    break
                yield step
        finally:
            stop.set()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        self.images = outcome["images"]


# -- writing PNGs the way A1111 does -----------------------------------------------------------

