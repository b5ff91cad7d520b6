"""The torch backend's tiny models: the core's recipe (textinv_cli.models.tiny) built from
the real classes (CLIPTextModel, UNet2DConditionModel, AutoencoderKL, the real schedulers)
and saved with `save_pretrained`, so it exercises the same loading, tokenizing and
conditioning code as Stable Diffusion itself. Same seed, same files (byte for byte).
"""

from __future__ import annotations

from pathlib import Path

from textinv_cli.engine.quiet_libraries import quiet
from textinv_cli.models.tiny import publish_tiny_model, recipe
from textinv_cli.models.tiny_tokenizer import check_single_tokens, write_tokenizer

__all__ = ["write_tiny_model"]


def write_tiny_model(out: Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a complete tiny diffusers model of `family` into `out` and return `out`
    (idempotent and atomic: textinv_cli.models.tiny.publish_tiny_model)."""
    return publish_tiny_model(out, family, seed, _build, backend="torch")


def _build(folder: Path, family: str, seed: int) -> None:
    import torch

    # fork_rng: seeding must not disturb the caller's global RNG (e.g. a training run).
    # quiet: building from configs makes transformers/diffusers chatty about unused defaults.
    with quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _pipeline(folder, family).save_pretrained(folder, safe_serialization=True)
    for sub in ("text_encoder", "text_encoder_2"):
        if (folder / sub).is_dir():
            _legacy_text_keys(folder / sub / "model.safetensors")


def _pipeline(folder: Path, family: str):
    """The recipe's pipeline; components are built in the recipe's order (their random
    weights are drawn in it), the scheduler and tokenizers draw none."""
    import diffusers
    import transformers

    r = recipe(family)
    parts: dict = {}
    for name, (library, cls, kwargs) in r["components"].items():
        if library == "transformers":
            config = transformers.CLIPTextConfig(**kwargs)
            parts[name] = getattr(transformers, cls)(config)
        else:
            parts[name] = getattr(diffusers, cls)(**kwargs)
    for sub, pad in r["tokenizers"].items():
        write_tokenizer(folder / sub, pad)
        parts[sub] = transformers.CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)
        check_single_tokens(parts[sub])
    pipeline, options = r["pipeline"]
    if pipeline == "StableDiffusionXLPipeline":
        options = {**options, "add_watermarker": False}
    else:
        options = {**options, "safety_checker": None, "feature_extractor": None}
    return getattr(diffusers, pipeline)(**parts, image_encoder=None, **options)


def _legacy_text_keys(path: Path) -> None:
    """Store CLIP text weights under `text_model.*`, as every real SD checkpoint does.

    transformers 5 saves a freshly built CLIPTextModel without that prefix; it still
    loads prefixed files (it strips the prefix on load), while transformers 4 and code
    that reads the safetensors directly (the JAX backend, converters) expect it.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    if all(k.startswith("text_model.") or k == "text_projection.weight" for k in tensors):
        return
    save_file({k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})
