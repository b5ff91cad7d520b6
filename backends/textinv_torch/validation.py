"""Validation images of a training run: each --validate prompt rendered with the rows as they
are now, into run/samples/step-N-i.png with A1111's `parameters` block as samples carry it
(the JAX backend's validation.py does the same in JAX).
"""

from __future__ import annotations

from pathlib import Path

import torch

from textinv_cli.engine.captions import expand_placeholder
from textinv_cli.engine.infotext import VALIDATION_GUIDANCE, encode_png, validation_text
from textinv_cli.writes import atomic_write_bytes
from textinv_cli.engine.quiet_libraries import quiet

from .loading import Components
from .step import encode_text
from .tokens import token_embedding


def validation_images(comp: Components, spec, run: Path, step: int, resolution: int, device) -> list[Path]:
    """Render each --validate prompt with the rows as they are now; PNGs in run/samples/.

    The pipeline is built from the live components (no copy, nothing reloaded) with a DDIM
    scheduler. The prompt embeddings are computed here with the training text path and
    handed to the pipeline, so what is rendered is exactly what is being trained (and the
    tokenizer's lower-casing cannot split a multi-vector token).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DDIMScheduler.from_config({**comp.scheduler_config, "clip_sample": False,
                                       "set_alpha_to_one": False})
    common = dict(vae=comp.vae, text_encoder=comp.text_encoders[0], tokenizer=comp.tokenizers[0], unet=comp.unet,
                  scheduler=sched)
    with quiet():
        if comp.family == "sdxl":
            pipe = StableDiffusionXLPipeline(text_encoder_2=comp.text_encoders[1], tokenizer_2=comp.tokenizers[1],
                                             force_zeros_for_empty_prompt=True, add_watermarker=False, **common)
        else:
            pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(run) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = [m.training for m in (comp.unet, *comp.text_encoders)]
    for m in (comp.unet, *comp.text_encoders):
        m.eval()
    paths = []
    try:
        # diffusers' own deprecation notices are not ours to print (events are our output)
        with torch.no_grad(), quiet(future_warnings=False):
            for i, prompt in enumerate(spec.validate):
                text = expand_placeholder(prompt, spec.token, spec.vectors)
                ids = [tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device) for tok in comp.tokenizers]
                cond, added = encode_text(comp, ids)
                extra = {"pooled_prompt_embeds": added["text_embeds"]} if added else {}
                gen = torch.Generator().manual_seed(spec.seed + i)  # CPU: the same picture on any device
                # guidance said, not left to the pipeline: SDXL's default is 5.0, the PNG records 7.5
                image = pipe(prompt_embeds=cond, num_inference_steps=spec.validate_steps, height=resolution,
                             width=resolution, generator=gen, guidance_scale=VALIDATION_GUIDANCE, **extra).images[0]
                path = out_dir / f"step-{step:06d}-{i}.png"
                vectors = {slot: token_embedding(te).rows.detach().to("cpu", torch.float32).numpy()
                           for slot, te in zip(comp.slots, comp.text_encoders)}
                text = validation_text(spec, prompt=prompt, index=i, resolution=resolution, vectors=vectors)
                atomic_write_bytes(path, encode_png(image, text), force=True)  # a resumed run redraws a step
                paths.append(path)
    finally:
        for m, was in zip((comp.unet, *comp.text_encoders), modes):
            m.train(was)
    return paths
