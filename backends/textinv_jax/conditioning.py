"""The UNet's text conditioning, as the torch backend's step.encode_text and diffusers'
pipelines compute it, for training, validation and sampling alike (so trained == used).

    context, pooled = text_conditioning(models, ids, xl=..., clip_skip=N, dtype=...)

SD 1.x/2.x: the text model's last hidden state (after the final LayerNorm). SDXL: both
encoders' penultimate hidden states (before any final LayerNorm) concatenated on the
feature axis, and the second encoder's pooled, projected output (`text_embeds`, from its
last layer and final LayerNorm whatever the clip skip), which the UNet's text_time
embedding takes with the size/crop ids (`time_ids`).

A1111's "Clip skip" N takes the hidden state N-1 layers before those: for SD 1.x/2.x
hidden_states[-N] through the final LayerNorm (diffusers' clip_skip N-1, A1111's rule), for
SDXL hidden_states[-1-N] of both encoders (diffusers' hidden_states[-(clip_skip + 2)]).
Under jit the layers after the one taken are dead code and XLA drops them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["sdxl_time_ids", "text_conditioning"]


def text_conditioning(models, ids, *, xl: bool, clip_skip: int = 1, dtype=jnp.float32):
    """(context [B, T, D] float32, pooled text_embeds [B, P] float32 or None) for token ids
    (one [B, T] array per text model, in encoder order)."""
    skip = max(1, int(clip_skip))
    if not xl:
        (model,), (tokens,) = models, ids
        out = model(tokens, dtype=dtype)
        if skip == 1:
            return out["last_hidden_state"], None
        norm = model.text_model.final_layer_norm
        return norm(out["hidden_states"][-skip], dtype).astype(jnp.float32), None
    outs = [model(tokens, dtype=dtype) for model, tokens in zip(models, ids)]
    context = jnp.concatenate([out["hidden_states"][-1 - skip] for out in outs], axis=-1)
    return context, outs[-1]["text_embeds"]


def sdxl_time_ids(height: int, width: int) -> np.ndarray:
    """[6] float32: original size, crop top-left, target size, as SDXL's pipeline sends them
    for a generated image (original = target = the image's size, no crop)."""
    return np.array([height, width, 0, 0, height, width], np.float32)
