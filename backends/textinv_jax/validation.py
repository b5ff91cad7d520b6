"""Validation images of a training run, in JAX: each --validate prompt rendered with the
trained rows as the torch backend's validation.py renders it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from textinv_cli.engine.captions import expand_placeholder

from .sampling import denoise, initial_noise, make_plan, text_states, to_pil
from .tokens import encode, to_model_ids


def validation_images(nets: dict, configs: dict, tokenizer, rows, *, first: int, vocab_rows: int,
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
        context = text_states(nets["clip"], place(ids), rows, config=configs["clip"], dtype=dtype)
        noise = place(np.asarray(initial_noise(seed + i, resolution, resolution, configs["vae"])))
        run = denoise(nets, configs, context, plan=plan, guidance=7.5, noise=noise, dtype=dtype)
        while True:
            try:
                next(run)
            except StopIteration as done:
                pixels = done.value
                break
        path = Path(out) / f"step-{step:06d}-{i}.png"
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            to_pil(pixels).save(path)
        paths.append(path)
    return paths
