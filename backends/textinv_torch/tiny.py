"""The tiny-model factory: complete diffusers models with random weights, and demo images.

Product code, not a mock (DESIGN §7): no hub is reachable in CI and no real weights exist
on these machines, so the demo, the tests and a user smoke-testing an install all use a
model written here. It is built from the real classes (CLIPTextModel, UNet2DConditionModel,
AutoencoderKL, the real schedulers) and saved with `save_pretrained`, so it exercises the
same loading, tokenizing and conditioning code as Stable Diffusion itself.

The three families differ where the real ones differ:
  sd1   CLIP ViT-L-like text encoder (quick_gelu, pads with <|endoftext|>), epsilon, PNDM.
  sd2   OpenCLIP-like text encoder (gelu, pads with "!"), a different width, linear
        projections and per-block head counts in the UNet, v-prediction, DDIM.
  sdxl  two text encoders (the second with a projection, whose pooled output conditions
        the UNet through "text_time" together with size/crop ids), Euler, VAE scale 0.13025.
Widths mirror the real ordering 768 < 1024 < 1280 (TINY_WIDTHS), so a tiny SD1 embedding
can never be mistaken for a tiny SD2 one. The VAE downsamples by 8 like the real one, so
the default 64 px gives 8x8 latents and a training step costs tens of milliseconds on CPU.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import random
import shutil
import tempfile
from pathlib import Path

from textinv_cli.errors import OutputExistsError, TextinvError

from .tiny_tokenizer import EOS, INIT_WORDS, check_single_tokens, write_tokenizer

__all__ = ["FAMILIES", "INIT_WORDS", "TINY_WIDTHS", "read_tiny_info", "write_demo_images", "write_tiny_model"]

FAMILIES = ("sd1", "sd2", "sdxl")
TINY_WIDTHS = {"clip_l": 32, "clip_h": 48, "clip_g": 64}  # stand-ins for 768 / 1024 / 1280
MARKER = "textinv-tiny.json"  # written last into the temp folder: its presence means complete
RECIPE = 1  # bump when the factory changes what it writes
SIZE = 64  # default image side; the UNet's sample_size is SIZE // 8


# -- reading -----------------------------------------------------------------------------

def read_tiny_info(path: Path) -> dict | None:
    """The factory's record of a folder ({"recipe", "family", "seed", "widths"}), or None
    if it is not a complete tiny model (missing marker, unreadable, or a part deleted)."""
    path = Path(path)
    try:
        info = json.loads((path / MARKER).read_text("utf-8"))
        index = json.loads((path / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("family") not in FAMILIES:
        return None
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    if any(not (path / p).is_dir() or not any((path / p).iterdir()) for p in parts):
        return None
    return info


def _matches(path: Path, family: str, seed: int) -> bool:
    info = read_tiny_info(path)
    return bool(info) and (info.get("recipe"), info.get("family"), info.get("seed")) == (RECIPE, family, seed)


# -- writing the model --------------------------------------------------------------------

def write_tiny_model(out: Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a complete tiny diffusers model of `family` into `out` and return `out`.

    Same seed, same files (byte for byte). Idempotent: if `out` already holds the tiny model
    of this family, seed and recipe it is returned untouched; any other non-empty `out` is
    refused. The model is built in a temp folder beside `out` and renamed into place, so an
    interrupted call leaves nothing half-written under `out`.
    """
    if family not in FAMILIES:
        raise TextinvError(f"Unknown model family {family!r}.", f"Pick one of: {', '.join(FAMILIES)}.")
    seed = _seed(seed)
    out = Path(out).expanduser().absolute()
    if _matches(out, family, seed):
        return out
    _refuse_occupied(out, f"a tiny {family} model (seed {seed})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _build(tmp, family, seed)
        (tmp / MARKER).write_text(json.dumps(
            {"recipe": RECIPE, "family": family, "seed": seed, "widths": _widths(family)}, indent=2) + "\n")
        _publish(tmp, out, lambda: _matches(out, family, seed), f"a tiny {family} model (seed {seed})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; cleanup otherwise
    return out


def _seed(seed) -> int:
    try:
        value = operator.index(seed)  # ints and numpy ints; not floats, strings or bools
    except TypeError:
        value = -1
    if isinstance(seed, bool) or not 0 <= value < 2**63:
        raise TextinvError(f"The seed must be an integer from 0 to 2**63-1, not {seed!r}.")
    return value


def _widths(family: str) -> dict[str, int]:
    slots = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}[family]
    return {s: TINY_WIDTHS[s] for s in slots}


def _refuse_occupied(out: Path, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        info = read_tiny_info(out)
        found = (f"the tiny {info['family']} model with seed {info.get('seed')} (recipe {info.get('recipe')})"
                 if info else "other files")
        raise OutputExistsError(f"{out} already holds {found}; refusing to write {what} there.",
                                "Pick an empty or new folder, or remove this one.")


def _publish(tmp: Path, out: Path, already_there, what: str) -> None:
    """Rename tmp to out. rename() replaces only an empty folder, so two processes racing
    to write the same model both end up returning the one that landed first."""
    for f in sorted(tmp.rglob("*")):  # contents on disk before the name appears
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    try:
        os.rename(tmp, out)
    except OSError:
        if already_there():
            return
        _refuse_occupied(out, what)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


@contextlib.contextmanager
def _quiet():
    """Building from configs makes transformers/diffusers chatty about unused defaults."""
    import diffusers
    import transformers

    libs = [(lib.logging, lib.logging.get_verbosity(), lib.logging.is_progress_bar_enabled())
            for lib in (transformers, diffusers)]
    for log, _, _ in libs:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level, bars in libs:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


def _build(folder: Path, family: str, seed: int) -> None:
    import torch

    # fork_rng: seeding must not disturb the caller's global RNG (e.g. a training run).
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _PIPELINES[family](folder)
        pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites tokenizers in whatever layout this transformers version
    # prefers; put back the plain SD layout (vocab.json + merges.txt), which every
    # transformers version reads, and which stays byte-identical across runs.
    for sub, pad in _TOKENIZER_PADS[family].items():
        shutil.rmtree(folder / sub)
        write_tokenizer(folder / sub, pad)
    for sub in ("text_encoder", "text_encoder_2"):
        if (folder / sub).is_dir():
            _legacy_text_keys(folder / sub / "model.safetensors")


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


_TOKENIZER_PADS = {
    "sd1": {"tokenizer": EOS},
    "sd2": {"tokenizer": "!"},  # OpenCLIP pads with id 0, which is "!" (as SD 2.x ships it)
    "sdxl": {"tokenizer": EOS, "tokenizer_2": "!"},
}


def _tokenizer(folder: Path, sub: str, pad: str):
    from transformers import CLIPTokenizer

    write_tokenizer(folder / sub, pad)
    tok = CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)
    check_single_tokens(tok)
    return tok


def _text_config(tok, width: int, act: str, intermediate: int, projection: int):
    from transformers import CLIPTextConfig

    # Real ids for bos/eos/pad (not the legacy eos_token_id=2 of old configs), so the
    # pooled output is taken at the first <|endoftext|> even after tokens are added.
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=intermediate, projection_dim=projection,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    # Four blocks = three downsamplings = the real factor of 8.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=32, scaling_factor=scaling_factor,
    )


_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1)


def _sd_pipeline(folder: Path, family: str):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd2 = family == "sd2"
    tok = _tokenizer(folder, "tokenizer", _TOKENIZER_PADS[family]["tokenizer"])
    width = TINY_WIDTHS["clip_h" if sd2 else "clip_l"]
    text_encoder = CLIPTextModel(_text_config(tok, width, "gelu" if sd2 else "quick_gelu",
                                              4 * width if sd2 else 37, width))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        # SD1: a fixed number of heads (8 at full size); SD2: a fixed head size, so the head
        # count grows per block ([5, 10, 20, 20] at full size), with linear projections.
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2,
    )
    vae = _vae(0.18215)
    if sd2:  # as stabilityai/stable-diffusion-2-1 ships it
        scheduler = DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    else:  # as runwayml/stable-diffusion-v1-5 ships it
        scheduler = PNDMScheduler(**_BETAS, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _sdxl_pipeline(folder: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer(folder, "tokenizer", EOS)
    tok_2 = _tokenizer(folder, "tokenizer_2", "!")
    w_l, w_g = TINY_WIDTHS["clip_l"], TINY_WIDTHS["clip_g"]
    projection = 32  # pooled text_embeds width (1280 at full size)
    text_encoder = CLIPTextModel(_text_config(tok, w_l, "quick_gelu", 37, w_l))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok_2, w_g, "gelu", 4 * w_g, projection))
    time_dim = 8  # each of the 6 size/crop ids gets a sinusoidal embedding this wide (256 full size)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=w_l + w_g,  # the two encoders' penultimate states, concatenated
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    scheduler = EulerDiscreteScheduler(**_BETAS, prediction_type="epsilon", timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False)
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
        tokenizer_2=tok_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


_PIPELINES = {
    "sd1": lambda folder: _sd_pipeline(folder, "sd1"),
    "sd2": lambda folder: _sd_pipeline(folder, "sd2"),
    "sdxl": _sdxl_pipeline,
}


# -- demo images --------------------------------------------------------------------------

def write_demo_images(out: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write `n` pictures of one made-up concept (a round red toy with ears and eyes) into
    `out` as 000.png, 001.png, ... and return `out`.

    Backgrounds, positions, sizes and poses vary with the seed; the toy's look does not,
    so there is a concept to learn. Image 1 is RGBA (toy on transparency), image 2
    grayscale and image 3 non-square (1.5 x size wide), so a trainer meets every case.
    Idempotent like write_tiny_model: an `out` holding exactly these images is returned.
    """
    seed = _seed(seed)
    if not (isinstance(n, int) and n >= 1) or not (isinstance(size, int) and size >= 16):
        raise TextinvError(f"Need n >= 1 images of size >= 16 px (got n={n!r}, size={size!r}).")
    out = Path(out).expanduser().absolute()
    images = {f"{i:03d}.png": _demo_image(random.Random(seed * 1_000_003 + i), i, size) for i in range(n)}
    if _same_images(out, images):
        return out
    _refuse_occupied(out, f"{n} demo images")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, img in images.items():
            img.save(tmp / name, format="PNG")
        _publish(tmp, out, lambda: _same_images(out, images), f"{n} demo images")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _same_images(out: Path, images: dict) -> bool:
    """Compare pixels, not bytes: another Pillow may compress the same pixels differently."""
    from PIL import Image

    try:
        if sorted(p.name for p in out.iterdir()) != sorted(images):
            return False
        for name, img in images.items():
            with Image.open(out / name) as f:
                if f.mode != img.mode or f.size != img.size or f.tobytes() != img.tobytes():
                    return False
    except OSError:
        return False
    return True


def _demo_image(rng: random.Random, i: int, size: int):
    from PIL import Image, ImageDraw

    w, h = (size * 3 // 2, size) if i == 3 else (size, size)
    rgba = i == 1
    bg = (0, 0, 0, 0) if rgba else tuple(rng.randint(60, 240) for _ in range(3)) + (255,)
    img = Image.new("RGBA", (w, h), bg)
    d = ImageDraw.Draw(img)
    if not rgba:  # some background clutter: stripes or a horizon, in a second colour
        other = tuple(rng.randint(40, 255) for _ in range(3)) + (255,)
        if rng.random() < 0.5:
            step = rng.randint(6, 14)
            for x in range(-h, w, step * 2):
                d.polygon([(x, h), (x + step, h), (x + step + h, 0), (x + h, 0)], fill=other)
        else:
            d.rectangle([0, int(h * rng.uniform(0.55, 0.8)), w, h], fill=other)
    r = int(min(w, h) * rng.uniform(0.18, 0.3))  # the toy: body, two ears, eyes, a yellow belly
    cx, cy = rng.randint(r + 2, w - r - 2), rng.randint(int(r * 1.6), h - r - 2)
    red, dark = (220, 40, 40, 255), (30, 20, 20, 255)
    for sx in (-1, 1):
        d.polygon([(cx + sx * r * 0.9, cy - r * 0.2), (cx + sx * r * 0.8, cy - r * 1.55),
                   (cx + sx * r * 0.15, cy - r * 0.85)], fill=red)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=red)
    d.ellipse([cx - r * 0.5, cy + r * 0.05, cx + r * 0.5, cy + r * 0.8], fill=(250, 210, 60, 255))
    e = max(1, r // 6)
    for sx in (-1, 1):
        ex, ey = cx + sx * r * 0.4, cy - r * 0.3
        d.ellipse([ex - e, ey - e, ex + e, ey + e], fill=dark)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rgba:
        return img
    return img.convert("L") if i == 2 else img.convert("RGB")
