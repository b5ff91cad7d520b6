"""Validation images of a training run, in JAX: each --validate prompt rendered with the
trained rows as the torch backend's validation.py renders it, with the same A1111
`parameters` block.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from textinv_cli.engine.captions import expand_placeholder
from textinv_cli.engine.infotext import VALIDATION_GUIDANCE, encode_png, validation_text
from textinv_cli.writes import atomic_write_bytes

from .conditioning import sdxl_time_ids
from .sampling import denoise, initial_noise, make_plan, text_states, to_pil
from .tokens import encode, to_model_ids


def validation_images(nets: dict, vae_config, tokenizers: list, rows: dict, *, firsts: list[int],
                      vocab_rows: list[int], clip_skip: int, scheduler_config: dict, prompts: list, token: str,
                      vectors: int, steps: int, seed: int, resolution: int, dtype, out: Path, step: int, place,
                      write: bool) -> list[Path]:
    """Each prompt rendered with the trained `rows` ({slot: [n, width]}, one per text model in
    nets["text_encoders"], a list of (graph, weights)) as the torch backend's validation does:
    DDIM (clip_sample and set_alpha_to_one off), guidance 7.5 (what infotext.validation_text
    records), no negative prompt (SD 1.x/2.x: "" at the last layer; SDXL: zeros), seed + i;
    saved as out/step-N-i.png. `place` puts host arrays where the params live (the
    trainer's replicated sharding): on several hosts every process renders, since the
    replicated program needs them all, and only the one with `write` saves."""
    plan = make_plan("ddim", scheduler_config, steps, clip_sample=False, set_alpha_to_one=False)
    graphs, frozens = zip(*nets["text_encoders"])
    xl = len(graphs) == 2

    def states(text: str, skip: int):
        ids = [place(to_model_ids(encode(tok, [text]), first, v)) for tok, first, v in zip(tokenizers, firsts,
                                                                                          vocab_rows)]
        return text_states(tuple(graphs), list(frozens), list(rows.values()), ids, clip_skip=skip, dtype=dtype)

    paths = []
    for i, prompt in enumerate(prompts):
        cond, pooled = states(expand_placeholder(prompt, token, vectors), clip_skip)
        if xl:  # force_zeros_for_empty_prompt, as the torch backend builds its SDXL pipeline
            context, pooled = jnp.concatenate([jnp.zeros_like(cond), cond]), jnp.concatenate(
                [jnp.zeros_like(pooled), pooled])
        else:
            context = jnp.concatenate([states("", 1)[0], cond])
        noise = place(np.asarray(initial_noise(seed + i, resolution, resolution, vae_config)))
        run = denoise(nets, context, plan=plan, guidance=VALIDATION_GUIDANCE, noise=noise, dtype=dtype,
                      pooled=pooled, time_ids=sdxl_time_ids(resolution, resolution))
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

    from textinv_cli.engine.spec import TrainSpec

    try:
        spec = TrainSpec.load(out.parent)
    except (OSError, ValueError, TypeError):  # not a run folder (a direct caller): what the arguments say
        spec = TrainSpec(data_dir="", token=token, init=[token], model="", run_dir=str(out.parent))
    spec = replace(spec, token=token, seed=seed, validate_steps=steps)
    vectors = {slot: np.asarray(r.addressable_data(0) if hasattr(r, "addressable_data") else r, np.float32)
               for slot, r in rows.items()}
    return validation_text(spec, prompt=prompt, index=index, resolution=resolution, vectors=vectors)
