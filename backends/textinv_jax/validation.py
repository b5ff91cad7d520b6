"""Validation images of a training run, in JAX: each --validate prompt rendered with the
trained rows as the torch backend's validation.py renders it, with the same A1111
`parameters` block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from textinv_cli.engine.captions import expand_placeholder
from textinv_cli.engine.infotext import encode_png, validation_text
from textinv_cli.writes import atomic_write_bytes

from .sampling import denoise, initial_noise, make_plan, text_states, to_pil
from .tokens import encode, to_model_ids


def validation_images(nets: dict, vae_config, tokenizer, rows, *, first: int, vocab_rows: int,
                      scheduler_config: dict, prompts: list, token: str, vectors: int, steps: int, seed: int,
                      resolution: int, dtype, out: Path, step: int, place, write: bool) -> list[Path]:
    """Each prompt rendered with the trained `rows` as the torch backend's validation does:
    DDIM (clip_sample and set_alpha_to_one off), guidance 7.5, an empty negative prompt,
    seed + i; saved as out/step-N-i.png. `place` puts host arrays where the params live (the
    trainer's replicated sharding): on several hosts every process renders, since the
    replicated program needs them all, and only the one with `write` saves."""
    plan = make_plan("ddim", scheduler_config, steps, clip_sample=False, set_alpha_to_one=False)
    paths = []
    for i, prompt in enumerate(prompts):
        ids = to_model_ids(encode(tokenizer, ["", expand_placeholder(prompt, token, vectors)]), first, vocab_rows)
        context = text_states(*nets["text_encoder"], rows, place(ids), dtype=dtype)
        noise = place(np.asarray(initial_noise(seed + i, resolution, resolution, vae_config)))
        run = denoise(nets, context, plan=plan, guidance=7.5, noise=noise, dtype=dtype)
        while True:
            try:
                next(run)
            except StopIteration as done:
                pixels = done.value
                break
        path = Path(out) / f"step-{step:06d}-{i}.png"
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = _parameters(Path(out), prompt, i, resolution, rows, token=token, steps=steps, seed=seed)
            atomic_write_bytes(path, encode_png(to_pil(pixels), text), force=True)  # a resumed run redraws a step
        paths.append(path)
    return paths


def _parameters(out: Path, prompt: str, index: int, resolution: int, rows, *, token: str, steps: int,
                seed: int) -> str:
    """The image's A1111 block (infotext.validation_text). The model and registry names come
    from the run's spec.json, written before the first step (out is run/samples)."""
    from dataclasses import replace

    from textinv_cli.embedding import slot_for_width
    from textinv_cli.engine.spec import TrainSpec

    try:
        spec = TrainSpec.load(out.parent)
    except (OSError, ValueError, TypeError):  # not a run folder (a direct caller): what the arguments say
        spec = TrainSpec(data_dir="", token=token, init=[token], model="", run_dir=str(out.parent))
    spec = replace(spec, token=token, seed=seed, validate_steps=steps)
    host = np.asarray(rows.addressable_data(0) if hasattr(rows, "addressable_data") else rows, np.float32)
    vectors = {slot_for_width(host.shape[-1]) or "clip_l": host}  # the one slot of an SD 1.x/2.x model
    return validation_text(spec, prompt=prompt, index=index, resolution=resolution, vectors=vectors)
