"""Each measurement the benchmark makes, as a function returning plain numbers.

Timings are taken at points where the host has synced with the device (the trainer's log
steps call .item(); sampling ends with a host copy), after warm-up steps are excluded.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def matmul_peak(device: str = "cuda", n: int = 8192, iters: int = 10) -> float:
    """bf16 TFLOP/s of one large matrix product on random data: the roofline we compare to."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def train_throughput(model: str, images: Path, *, batch: int, precision: str, steps: int, warmup: int,
                     device: str = "cuda", grad_accum: int = 1, extra: dict | None = None) -> dict:
    """samples/s of textinv's torch backend between two synced log steps after `warmup`."""
    import torch
    from textinv_torch.backend import TorchBackend

    from textinv_cli.spec import TrainSpec

    run = Path(tempfile.mkdtemp(prefix="bench-run-")) / "run"
    spec = TrainSpec(data_dir=str(images), token="<bench-tok>", init=["toy"], model=model, run_dir=str(run),
                     steps=steps, batch_size=batch, grad_accum=grad_accum, precision=precision,
                     checkpoint_every=0, extra={"device": device, **(extra or {})})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []
    losses = []
    for ev in TorchBackend().train(spec):
        if ev.kind == "progress" and "loss" in ev.data:
            marks.append((ev.data["step"], time.perf_counter()))
            losses.append(ev.data["loss"])
    wall = time.perf_counter() - t0
    after = [(s, t) for s, t in marks if s >= warmup]
    (s0, t0m), (s1, t1m) = after[0], after[-1]
    samples = (s1 - s0) * batch * grad_accum
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {"batch": batch, "precision": precision, "grad_accum": grad_accum, "steps": steps,
            "samples_per_s": samples / (t1m - t0m), "step_ms": (t1m - t0m) / max(1, s1 - s0) * 1000,
            "peak_mem_gib": peak, "wall_s": wall, "loss_first": losses[0], "loss_last": losses[-1]}


def flops_per_sample(model: str, device: str = "cuda", batch: int = 1, resolution: int = 512) -> float:
    """FLOPs of one textual-inversion training step per sample, counted by torch's FlopCounterMode.

    The same math as the trainer: text encoder and UNet forward, backward to the input
    embeddings only (frozen weights: no weight gradients), VAE not included (latents cached).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    dt = torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dt).to(device).requires_grad_(False)
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dt).to(device).requires_grad_(False)
    ids = torch.randint(0, text.config.vocab_size, (batch, 77), device=device)
    # the trained rows enter at the token embeddings: gradients flow from there, as in training
    text.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_(True))
    lat = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device, dtype=dt)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        hidden = text(ids).last_hidden_state
        pred = unet(lat, t, hidden).sample
        pred.float().pow(2).mean().backward()
    return counter.get_total_flops() / batch


def sampling_ours(model: str, *, n: int, steps: int, size: int, precision: str, out: Path) -> dict:
    from textinv_torch.sampling import sample

    from textinv_cli.spec import SampleRequest

    def run(k: int):
        req = SampleRequest(prompt="a photo of a toy", model=model, out_dir=str(out), n=k, steps=steps,
                            scheduler="ddim", width=size, height=size, precision=precision)
        t = time.perf_counter()
        for _ in sample(req):
            pass
        return time.perf_counter() - t

    run(1)  # warm-up: loading, cuDNN autotuning
    secs = run(n)
    return {"images": n, "steps": steps, "size": size, "precision": precision, "seconds": secs, "images_per_s": n / secs}


def sampling_diffusers(model: str, *, n: int, steps: int, size: int, precision: str) -> dict:
    """diffusers' own StableDiffusionPipeline, batch n in one call, on the same weights."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dt, safety_checker=None).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe("a photo of a toy", num_inference_steps=steps, height=size, width=size, num_images_per_prompt=1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    pipe("a photo of a toy", num_inference_steps=steps, height=size, width=size, num_images_per_prompt=n,
         output_type="np")
    secs = time.perf_counter() - t
    return {"images": n, "steps": steps, "size": size, "precision": precision, "seconds": secs, "images_per_s": n / secs}


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
