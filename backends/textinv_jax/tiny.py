"""The JAX backend's tiny models, written with numpy alone (no torch, no diffusers).

The core's recipe (textinv_cli.models.tiny) gives the configs; the tensor names and shapes
are the ones this backend's loaders demand of a config (clip, unet, vae), which are the
torch modules' own, so the torch backend loads these folders as well. The weights are
drawn as freshly built torch modules draw theirs (UNet and VAE: uniform +-1/sqrt(fan_in)
for convs and linears; CLIP: transformers' normal init with zero biases; norms 1 and 0),
from numpy's generator seeded with `seed`: same seed, same files, though not the torch
backend's bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from textinv_cli.formats.safetensors_io import dump_safetensors
from textinv_cli.models.tiny import publish_tiny_model, recipe, recipe_files

from .clip import expected_shapes as clip_shapes, clip_config
from .unet import expected_shapes as unet_shapes, unet_config
from .vae import expected_shapes as vae_shapes, vae_config

__all__ = ["write_tiny_model"]


def write_tiny_model(out: Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a complete tiny diffusers model of `family` into `out` and return `out`
    (idempotent and atomic: textinv_cli.models.tiny.publish_tiny_model)."""
    return publish_tiny_model(out, family, seed, _build, backend="jax")


def _build(folder: Path, family: str, seed: int) -> None:
    files = recipe_files(family)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    rng = np.random.default_rng(seed)
    for name, (library, cls, _kwargs) in recipe(family)["components"].items():  # the recipe's order
        if name == "scheduler":
            continue
        config = json.loads(files[f"{name}/config.json"])
        if library == "transformers":
            tensors = _clip_weights(clip_config(config), rng)
            file = "model.safetensors"
        else:
            shapes = (unet_shapes(unet_config(config)) if cls == "UNet2DConditionModel"
                      else vae_shapes(vae_config(config)))
            tensors = {k: _torch_default(k, shapes, rng) for k in sorted(shapes)}
            file = "diffusion_pytorch_model.safetensors"
        (folder / name / file).write_bytes(dump_safetensors(tensors, {"format": "pt"}))


def _norm(name: str, shape: tuple) -> np.ndarray:
    return np.ones(shape, np.float32) if name.endswith(".weight") else np.zeros(shape, np.float32)


def _torch_default(name: str, shapes: dict[str, tuple], rng: np.random.Generator) -> np.ndarray:
    """nn.Conv2d / nn.Linear's reset_parameters: weight and bias uniform +-1/sqrt(fan_in)."""
    shape = tuple(shapes[name])
    weight = shapes.get(name[: -len("bias")] + "weight") if name.endswith(".bias") else shape
    if weight is None or len(weight) == 1:  # a norm
        return _norm(name, shape)
    bound = 1.0 / math.sqrt(math.prod(weight[1:]))  # fan_in of [out, in] or [out, in, kh, kw]
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _clip_weights(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CLIPPreTrainedModel._init_weights (factor 1), under the `text_model.` prefix SD
    checkpoints keep CLIP text weights in (the projection has none)."""
    w, depth = cfg.hidden_size, cfg.num_hidden_layers
    inner = w**-0.5 * (2 * depth) ** -0.5
    std = {"embedding": 0.02, "q_proj": inner, "k_proj": inner, "v_proj": inner, "out_proj": w**-0.5,
           "fc1": (2 * w) ** -0.5, "fc2": inner, "text_projection": w**-0.5}
    out = {}
    for name, shape in sorted(clip_shapes(cfg).items()):
        module = name.split(".")[-2]  # q_proj, fc1, layer_norm1, token_embedding, ...
        module = "embedding" if module.endswith("embedding") else module
        if name.endswith(".weight") and len(shape) == 2:
            value = rng.normal(0.0, std[module], shape).astype(np.float32)
        else:  # biases zero, layer norms 1 and 0
            value = _norm(name, tuple(shape)) if "norm" in module else np.zeros(shape, np.float32)
        out[name if name.startswith("text_projection.") else f"text_model.{name}"] = value
    return out
