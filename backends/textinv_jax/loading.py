"""Loading a base model for the JAX backend: the local diffusers folder (a Hub id is fetched
into the Hugging Face cache, safetensors only), its family, the text side (tokenizer and
CLIP text model, one per encoder: SDXL has two) and the image side (UNet, VAE, the model's own noise schedule), as
flax.nnx models whose weights are numpy arrays in host memory; the compute dtype a
precision means on this platform, and the frozen weights cast to it.

Loading is split as in the torch backend's loading.py: the text side first, so everything
a user can get wrong about the concept (token, init words) is checked before the big UNet
is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from textinv_cli.errors import NotFoundError, TextinvError
from textinv_cli.engine.quiet_libraries import quiet

from .noise_schedule import NoiseSchedule, noise_schedule
from .unet import read_unet_config
from .vae import read_vae_config

# What the JAX backend reads of a Hub model: configs, tokenizer, safetensors weights of the
# parts it uses. Never a pickled .bin (it would run code), nor root-level single-file checkpoints.
_WANTED = ["model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/*.json", "text_encoder/*.safetensors*",
           "tokenizer_2/*", "text_encoder_2/*.json", "text_encoder_2/*.safetensors*", "unet/*.json", "unet/*.safetensors*", "vae/*.json", "vae/*.safetensors*"]
_SKIPPED = ["*non_ema*", "*.bin", "*.ckpt", "*.msgpack", "*.onnx*"]


# -- the model folder ---------------------------------------------------------------------

def model_folder(model: str) -> Path:
    """A local diffusers folder for `model` (a folder, a tiny-model name or a cached Hub id)."""
    from textinv_cli.models.resolve import offline, resolve_model

    resolved = resolve_model(model)
    if Path(resolved).is_dir():
        return Path(resolved)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved, allow_patterns=_WANTED, ignore_patterns=_SKIPPED,
                                      local_files_only=offline()))
    except Exception as e:  # noqa: BLE001 - every hub/cache failure means "not here" to the user
        raise NotFoundError(f"Cannot get the model {resolved!r}: it is not in the Hugging Face cache and the Hub "
                            f"cannot be reached ({type(e).__name__}).",
                            "Pass --model with a local diffusers folder, or --model tiny for the built-in demo "
                            "model.") from None


def model_family(folder: Path) -> str:
    """sd1, sd2 or sdxl; other pipelines are refused with what to do instead."""
    from textinv_cli.models.resolve import model_family as family_of_folder

    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise NotFoundError(f"Cannot read {folder / 'model_index.json'}: {e}",
                            "Pass a complete diffusers model folder (save_pretrained output).") from None
    cls = str(index.get("_class_name", ""))
    unet = index.get("unet") or [None, None]
    if not cls.startswith("StableDiffusion") or unet[-1] != "UNet2DConditionModel":
        raise TextinvError(f"Unsupported model family: {cls or 'unknown pipeline'} (unet: {unet[-1]}).",
                           "textinv trains embeddings for Stable Diffusion 1.x, 2.x and XL models.")
    return family_of_folder(str(folder)) or "sd1"


# -- the text side -------------------------------------------------------------------------

@dataclass
class TextSide:
    """The tokenizer and the frozen CLIP text model (weights in host memory)."""

    tokenizer: object
    config: object  # clip.ClipConfig
    model: object   # clip.CLIPTextModel

    @property
    def vocab_rows(self) -> int:
        return int(self.model.token_table.shape[0])

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)


def load_tokenizer(folder: Path, sub: str = "tokenizer"):
    from transformers import CLIPTokenizer

    try:
        with quiet(("transformers",)):  # a backend never prints; diffusers (torch) is not needed here
            return CLIPTokenizer.from_pretrained(str(folder / sub), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure: the folder's tokenizer is unusable
        raise NotFoundError(f"Cannot load the tokenizer of {folder}: {e}",
                            "Check that the folder is a complete diffusers model.") from None


def load_text_side(folder: Path, suffix: str = "") -> TextSide:
    """tokenizer{suffix} and text_encoder{suffix}: suffix "_2" is SDXL's second encoder."""
    from .clip import load_clip, read_clip_config

    tok = load_tokenizer(folder, f"tokenizer{suffix}")
    config = read_clip_config(folder, f"text_encoder{suffix}")
    return TextSide(tokenizer=tok, config=config, model=load_clip(folder, config, f"text_encoder{suffix}"))


def load_text_sides(folder: Path, family: str) -> list[TextSide]:
    """Every text side of the family, in encoder order (SDXL: CLIP-L, then OpenCLIP-G with
    its projection), as families.FAMILY_SLOTS names their slots."""
    return [load_text_side(folder, suffix) for suffix in (("", "_2") if family == "sdxl" else ("",))]


# -- the image side ------------------------------------------------------------------------

@dataclass
class ImageSide:
    """UNet, VAE (flax.nnx models, weights in host memory) and the model's own scheduler config."""

    unet_config: object
    unet: object  # unet.UNet2DConditionModel
    vae_config: object
    vae: object   # vae.AutoencoderKL
    scheduler_config: dict
    schedule: NoiseSchedule

    @property
    def native_resolution(self) -> int:
        # What the model was trained at: 512 (SD 1.5), 768 (SD 2.1), 64 (tiny).
        return int(self.unet_config.sample_size or 64) * self.vae_config.downscale


def load_image_side(folder: Path) -> ImageSide:
    from .unet import load_unet
    from .vae import load_vae
    from .weights import component_dir

    unet_cfg, vae_cfg = read_unet_config(folder), read_vae_config(folder)
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise TextinvError(f"The UNet of {folder} takes {unet_cfg.in_channels} input channels (an inpainting or "
                           "image-conditioned model); textinv works with text-to-image models.",
                           "Use the base text-to-image model of the same family.")
    path = component_dir(folder, "scheduler") / "scheduler_config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise TextinvError(f"Cannot read {path}: {e}", "The model folder is incomplete.") from None
    return ImageSide(unet_config=unet_cfg, unet=load_unet(folder, unet_cfg), vae_config=vae_cfg,
                     vae=load_vae(folder, vae_cfg), scheduler_config=config,
                     schedule=noise_schedule(config))


def frozen_in(dtype, tree):
    """A frozen weight tree (numpy, host memory) in the compute dtype, as the torch backend
    moves its frozen modules to it (`te.to(device, dtype)`): bf16/fp16 halve the weights'
    memory and transfer. Only floating arrays change; the trainable rows never pass here
    (they and the optimizer's moments stay float32, step.py)."""
    import jax
    import numpy as np

    dt = jnp.dtype(dtype)
    if dt == jnp.float32:
        return tree
    return jax.tree.map(lambda a: np.asarray(a).astype(dt) if np.asarray(a).dtype.kind == "f" else a, tree)


def compute_dtype(precision: str, platform: str):
    """fp16 kernels are GPU-only in XLA; bf16 runs everywhere (slowly on CPUs without it)."""
    if precision == "fp16" and platform not in ("gpu", "cuda", "rocm"):
        raise TextinvError(f"--precision fp16 needs a GPU; this jax backend runs on {platform}.",
                           "Use --precision bf16 or --precision fp32 here.")
    return {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}[precision]
