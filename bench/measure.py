"""Each measurement the benchmark makes in this process, as a function returning plain numbers.

Timings are taken at points where the host has synced with the device (the trainer's log
steps call .item(); sampling ends with a host copy), after warm-up steps are excluded.
The same functions run on the GPU (SD 1.5 shapes) and on the CPU (the tiny model, smoke).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def steady_rate(marks: list[tuple[int, float]], warmup: int, samples_per_step: int) -> dict:
    """samples/s and ms/step between the first and last (step, time) log mark at or after
    `warmup` steps: the steps before hold compiles, autotuning and the allocator growing."""
    after = [(s, t) for s, t in marks if s >= warmup]
    (s0, t0), (s1, t1) = after[0], after[-1]
    return {"samples_per_s": (s1 - s0) * samples_per_step / (t1 - t0), "step_ms": (t1 - t0) / max(1, s1 - s0) * 1000}


def matmul_peak(device: str = "cuda", n: int = 8192, iters: int = 10) -> float:
    """bf16 TFLOP/s of one large matrix product on random data: the roofline we compare to."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train_throughput(model: str, images: Path, *, batch: int, precision: str, steps: int, warmup: int,
                     device: str = "cuda", grad_accum: int = 1, extra: dict | None = None,
                     around=contextlib.nullcontext) -> dict:
    """samples/s of textinv's torch backend between two synced log steps after `warmup`.

    peak_mem_gib is the whole run's peak; peak_setup_gib that of model load, latent caching and
    the first step; peak_step_gib that of the steps after it (the steady state).
    `around()` is entered for the whole run: a lever (bench.levers) or nothing.
    """
    import torch
    from textinv_torch.backend import TorchBackend

    from textinv_cli.engine.spec import TrainSpec

    cuda = device.startswith("cuda")
    run = Path(tempfile.mkdtemp(prefix="bench-run-")) / "run"
    spec = TrainSpec(data_dir=str(images), token="<bench-tok>", init=["toy"], model=model, run_dir=str(run),
                     steps=steps, batch_size=batch, grad_accum=grad_accum, precision=precision,
                     checkpoint_every=0, extra={"device": device, **(extra or {})})
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup_peak = float("nan")
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []
    losses = []
    with around():
        for ev in TorchBackend().train(spec):
            if ev.kind == "progress" and ev.data["step"] == 1 and cuda:
                torch.cuda.synchronize()
                setup_peak = torch.cuda.max_memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()
            if ev.kind == "progress" and "loss" in ev.data:
                marks.append((ev.data["step"], time.perf_counter()))
                losses.append(ev.data["loss"])
    wall = time.perf_counter() - t0
    step_peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
    return {"batch": batch, "precision": precision, "grad_accum": grad_accum, "steps": steps,
            **steady_rate(marks, warmup, batch * grad_accum),
            "peak_mem_gib": max(setup_peak, step_peak) if cuda else float("nan"),
            "peak_setup_gib": setup_peak, "peak_step_gib": step_peak,
            "wall_s": wall, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses}


def flops_per_sample(model: str, device: str = "cuda", batch: int = 1, resolution: int = 512,
                     dtype_name: str = "bf16") -> float:
    """FLOPs of one textual-inversion training step per sample, counted by torch's FlopCounterMode.

    The same math as the trainer: text encoder and UNet forward, backward to the input
    embeddings only (frozen weights: no weight gradients), VAE not included (latents cached).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dt).to(device).requires_grad_(False)
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dt).to(device).requires_grad_(False)
    ids = torch.randint(0, text.config.vocab_size, (batch, 77), device=device)
    # the trained rows enter at the token embeddings: gradients flow from there, as in training
    text.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_(True))
    latent = resolution // 2 ** (len(unet.config.block_out_channels) - 1)
    lat = torch.randn(batch, unet.config.in_channels, latent, latent, device=device, dtype=dt)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        hidden = text(ids).last_hidden_state
        pred = unet(lat, t, hidden).sample
        pred.float().pow(2).mean().backward()
    return counter.get_total_flops() / batch


def sampling_ours(model: str, *, n: int, steps: int, size: int, precision: str, out: Path,
                  warmup: bool = True) -> dict:
    """textinv's sampler (batched: `batch_size` images per pipeline call), timed from the end
    of the model load ("started") to the last PNG written, after a warm-up run of the same shape."""
    from textinv_torch.sampling import sample

    from textinv_cli.engine.spec import SampleRequest

    def run():
        req = SampleRequest(prompt="a photo of a toy", model=model, out_dir=str(out), n=n, steps=steps,
                            scheduler="ddim", width=size, height=size, precision=precision)
        t = {"paths": []}
        for ev in sample(req):
            t[ev.kind] = time.perf_counter()
            if ev.kind == "started":
                t["batch"] = ev.data["batch_size"]
            if ev.kind == "sample":
                t["paths"].append(ev.data["path"])
        return t

    if warmup:
        run()  # cuDNN autotuning for this batch shape
    t = run()
    secs = t["sample"] - t["started"]
    # The PNG files (encode in threads, fsync, rename), which diffusers' row does not write:
    # timed apart by writing the same images again the way the sampler does.
    png_s = _time_png_files(t["paths"], out / "png-again")
    return {"images": n, "batch_size": t["batch"], "steps": steps, "size": size, "precision": precision,
            "seconds": secs, "images_per_s": n / secs, "png_files_s": png_s,
            "images_per_s_before_png": n / max(1e-9, secs - png_s)}


def _time_png_files(paths: list[str], folder: Path) -> float:
    from PIL import Image

    from textinv_cli.engine.infotext import save_pngs

    images = [Image.open(p).convert("RGB") for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    save_pngs(images, folder, list(range(len(images))), ["parameters"] * len(images))
    return time.perf_counter() - t0


def sampling_diffusers(model: str, *, n: int, steps: int, size: int, precision: str, device: str = "cuda",
                       warmup: bool = True) -> dict:
    """diffusers' own StableDiffusionPipeline, batch n in one call, on the same weights."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dt, safety_checker=None).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run():
        t = time.perf_counter()
        pipe("a photo of a toy", num_inference_steps=steps, height=size, width=size, num_images_per_prompt=n,
             output_type="pil")  # PIL, as ours: both end with 8-bit images on the host
        return time.perf_counter() - t

    if warmup:
        run()  # the same shape, as ours
    secs = run()
    return {"images": n, "batch_size": n, "steps": steps, "size": size, "precision": precision, "seconds": secs,
            "images_per_s": n / secs}


_RATE = re.compile(r"(\d+(?:\.\d+)?)(it/s|s/it)")


def diffusers_script(script: Path, model: str, images: Path, *, batch: int, precision: str, steps: int,
                     workers: int) -> dict:
    """diffusers' examples/textual_inversion/textual_inversion.py as documented, under accelerate.

    Its rate is tqdm's smoothed it/s at the end of the run (the script prints nothing finer).
    """
    out = Path(tempfile.mkdtemp(prefix="bench-diffusers-"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--mixed_precision", precision if precision != "fp32" else "no", str(script),
           "--pretrained_model_name_or_path", model, "--train_data_dir", str(images),
           "--learnable_property", "object", "--placeholder_token", "<bench-tok>", "--initializer_token", "toy",
           "--resolution", "512", "--train_batch_size", str(batch), "--max_train_steps", str(steps),
           "--learning_rate", "5e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--dataloader_num_workers", str(workers), "--save_steps", "1000000", "--checkpointing_steps", "1000000",
           "--mixed_precision", precision if precision != "fp32" else "no", "--output_dir", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    text = proc.stdout + proc.stderr
    rates = [(float(v), u) for v, u in _RATE.findall(text)]
    if proc.returncode != 0 or not rates:
        return {"batch": batch, "precision": precision, "error": text[-1500:], "wall_s": wall}
    v, unit = rates[-1]
    its = v if unit == "it/s" else 1.0 / v
    return {"batch": batch, "precision": precision, "workers": workers, "steps": steps,
            "samples_per_s": its * batch, "wall_s": wall}
