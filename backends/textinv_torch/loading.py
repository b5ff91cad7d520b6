"""Loading a base model's parts: tokenizer(s), text encoder(s), VAE, UNet, noise scheduler.

From a local diffusers folder or a Hub id (through the Hugging Face cache). Loading is
split in two so that everything a user can get wrong about the concept (token, init
words) is checked against the tokenizer and text encoder before the big UNet is read:

    comp = load_text_side(model)    # index, family, tokenizers, text encoders
    load_image_side(comp, ...)      # VAE, UNet, DDPM scheduler (from the model's config)

Families: sd1 (CLIP ViT-L, epsilon), sd2 (OpenCLIP, usually v-prediction),
sdxl (two text encoders, size/crop conditioning). The prediction type is read from the
model's scheduler config, not assumed from the family (SD 2.x base is epsilon).

Also here: the device, the precision's dtype, xformers and gradient checkpointing, which
the trainer applies to the loaded parts.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textinv_cli.families import FAMILY_SLOTS, TRAINABLE_FAMILIES
from textinv_cli.errors import NotFoundError, TextinvError

# What a model must be made of for us to train an embedding for it.
_NEEDS = {
    "sd": ("tokenizer", "text_encoder", "vae", "unet", "scheduler"),
    "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "unet", "scheduler"),
}
_NOT_HERE = ("Pass --model with a local diffusers folder or a Hub id you have downloaded before, "
             "or --model tiny for the built-in demo model (no download).")


def slots_for(family: str) -> tuple[str, ...]:
    """The embedding slots a family's text encoders feed, in encoder order."""
    if family not in TRAINABLE_FAMILIES:  # SD3/Flux embeddings are read and written, not trained
        raise TextinvError(f"Unknown model family {family!r}.",
                           "textinv trains embeddings for sd1 (SD 1.x), sd2 (SD 2.x) and sdxl (SDXL).")
    return FAMILY_SLOTS[family]


@dataclass
class Components:
    """A loaded base model. Lists are in encoder order (SDXL: [CLIP-L, OpenCLIP-G])."""

    model: str                      # as given (folder path or Hub id)
    family: str
    index: dict
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae: Any = None
    unet: Any = None
    scheduler: Any = None           # DDPMScheduler: add_noise / get_velocity for training
    scheduler_config: dict = field(default_factory=dict)  # the model's own (for validation's DDIM)
    prepared: list = field(default_factory=list)          # tokens.prepare_rows: (first id, init) per encoder
    scaling_factor: float = 0.18215  # the VAE's latent scale, kept when the VAE is dropped after caching
    clip_skip: int = 1               # A1111's "Clip skip" the conditioning is computed with (step.encode_text)

    @property
    def slots(self) -> tuple[str, ...]:
        return slots_for(self.family)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        # What the model was trained at: 512 (SD 1.5), 768 (SD 2.1), 1024 (SDXL), 64 (tiny).
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


def _local(model: str) -> bool:
    return Path(model).exists()


def _kw(model: str) -> dict:
    from textinv_cli.models.resolve import offline

    # A local folder never needs the network; a Hub id goes through the cache, offline if asked.
    return {"local_files_only": _local(model) or offline()}


def _not_loadable(model: str, what: str, err: Exception) -> TextinvError:
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if _local(model):
        return NotFoundError(f"Cannot load the {what} of {model}: {reason}",
                             "Check that the folder is a complete diffusers model (save_pretrained output). "
                             + _NOT_HERE)
    return NotFoundError(f"Cannot load {model!r} ({what}): it is not in the Hugging Face cache and the Hub "
                         f"cannot be reached, or it is not a diffusers model ({reason}).", _NOT_HERE)


def read_index(model: str) -> dict:
    """model_index.json of a local folder or a Hub id."""
    path = Path(model)
    if path.is_file():
        # Callers pass textinv_cli.models.resolve.resolve_model's answer, which is a folder for a
        # checkpoint file (converted once, cached); a file here is a caller that skipped it.
        raise TextinvError(f"{model} is a single file; the torch backend loads the diffusers folder textinv "
                           "converts it into.", "Pass it as --model to textinv train or sample.")
    if path.is_dir():
        try:
            return json.loads((path / "model_index.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise _not_loadable(model, "model_index.json", e) from e
    try:
        from diffusers import DiffusionPipeline

        with warnings.catch_warnings():  # hub client deprecation chatter, not the user's business
            warnings.simplefilter("ignore")
            return dict(DiffusionPipeline.load_config(model, **_kw(model)))
    except Exception as e:  # noqa: BLE001 - hub/cache errors come in many types; all mean "not here"
        raise _not_loadable(model, "model_index.json", e) from e


def family_of_index(index: dict, text_encoder_config: Any = None) -> str:
    """sd1 / sd2 / sdxl from the pipeline index (and the first text encoder's config)."""
    cls = str(index.get("_class_name", ""))
    parts = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
    unet = index.get("unet") or [None, None]
    if not cls.startswith("StableDiffusion") or unet[-1] != "UNet2DConditionModel":
        raise TextinvError(f"Unsupported model family: {cls or 'unknown pipeline'} (unet: {unet[-1]}).",
                           "textinv trains embeddings for Stable Diffusion 1.x, 2.x and XL models.")
    family = "sdxl" if "XL" in cls else "sd"
    missing = [p for p in _NEEDS[family] if p not in parts]
    if missing:
        raise TextinvError(f"The model lacks {', '.join(missing)} ({cls}).",
                           "Textual inversion needs the tokenizer and text encoder(s) of the base model.")
    if family == "sdxl":
        return "sdxl"
    # Same rule as textinv_cli.models.resolve.model_family: OpenCLIP (SD 2.x) uses plain gelu.
    act = getattr(text_encoder_config, "hidden_act", None)
    return "sd2" if act == "gelu" else "sd1"


def load_text_side(model: str) -> Components:
    """Index, family, tokenizer(s) and text encoder(s), frozen, fp32, on the CPU."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = read_index(model)
    family_of_index(index)  # refuse unsupported pipelines before loading anything big
    kw = _kw(model)
    xl = "XL" in str(index.get("_class_name", ""))
    subs = [("tokenizer", "text_encoder", CLIPTextModel)]
    if xl:
        subs.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    tokenizers, encoders = [], []
    for tok_sub, te_sub, te_cls in subs:
        try:
            tok = CLIPTokenizer.from_pretrained(model, subfolder=tok_sub, **kw)
        except Exception as e:  # noqa: BLE001
            raise _not_loadable(model, tok_sub, e) from e
        try:
            te = te_cls.from_pretrained(model, subfolder=te_sub, **kw)
        except Exception as e:  # noqa: BLE001
            raise _not_loadable(model, te_sub, e) from e
        te.requires_grad_(False)
        tokenizers.append(tok)
        encoders.append(te)
    family = family_of_index(index, encoders[0].config)
    return Components(model=model, family=family, index=index, tokenizers=tokenizers, text_encoders=encoders)


def load_image_side(comp: Components) -> Components:
    """VAE, UNet and the training noise scheduler, frozen, fp32, on the CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    kw = _kw(comp.model)
    for name, load in (("vae", AutoencoderKL.from_pretrained), ("unet", UNet2DConditionModel.from_pretrained)):
        try:
            module = load(comp.model, subfolder=name, **kw)
        except Exception as e:  # noqa: BLE001
            raise _not_loadable(comp.model, name, e) from e
        module.requires_grad_(False)
        setattr(comp, name, module)
    try:
        # DDPM from the model's own scheduler config: its betas and prediction type, whatever
        # sampler the model ships with (PNDM, DDIM, Euler...), as diffusers' scripts do.
        config = DDPMScheduler.load_config(comp.model, subfolder="scheduler", **kw)
    except Exception as e:  # noqa: BLE001
        raise _not_loadable(comp.model, "scheduler", e) from e
    if comp.unet.config.in_channels != comp.vae.config.latent_channels:
        raise TextinvError(f"The UNet of {comp.model} takes {comp.unet.config.in_channels} input channels "
                           f"(an inpainting or image-conditioned model); textinv trains on text-to-image models.",
                           "Use the base text-to-image model of the same family.")
    comp.scheduler = DDPMScheduler.from_config(config)
    comp.scheduler_config = dict(config)
    comp.scaling_factor = float(comp.vae.config.scaling_factor)
    if comp.prediction_type not in ("epsilon", "v_prediction"):
        raise TextinvError(f"The model's scheduler predicts {comp.prediction_type!r}; textinv trains "
                           "epsilon and v_prediction models.")
    return comp


# -- devices, precision, attention ------------------------------------------------------

def pick_device(spec=None):
    """CUDA when present (spec.device overrides: "cpu", "cuda:1"), else the CPU."""
    import torch

    wanted = getattr(spec, "device", None)
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(precision: str, device):
    """The dtype of the frozen weights; the trained rows and the loss stay fp32."""
    import torch

    if precision == "fp16" and device.type == "cpu":
        raise TextinvError("--precision fp16 does not run on the CPU (half-precision kernels are GPU-only).",
                           "Use --precision bf16 or --precision fp32 on the CPU.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TextinvError("This GPU does not support bf16.", "Use --precision fp16 or fp32.")
    return torch_dtype(precision)


def torch_dtype(precision: str):
    """The torch dtype of a --precision name (engine.checks.PRECISIONS)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def enable_xformers(unet, device) -> None:
    """Attention through xformers, asked for explicitly; SDPA (diffusers' default) otherwise."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        raise TextinvError("--attention xformers, but xformers is not installed.",
                           "pip install xformers  (or leave --attention at sdpa, PyTorch's own fast attention).")
    if device.type != "cuda":
        raise TextinvError("xformers attention runs on CUDA GPUs only.", "Use --attention sdpa on this machine.")
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as e:  # noqa: BLE001 - xformers builds fail in many ways; all mean "cannot use it"
        raise TextinvError(f"xformers is installed but cannot be used: {e}",
                           "Reinstall xformers for this torch version, or use --attention sdpa.") from None


def checkpointing_on(text_encoder) -> None:
    """Gradient checkpointing for a transformers text encoder (it only applies in train mode;
    CLIP text encoders have no dropout, so train mode changes nothing else)."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    text_encoder.train()
