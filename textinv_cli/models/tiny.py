"""The built-in tiny models: the recipe every backend builds them from, and their folder.

Product code, not a mock: no hub is reachable in CI and no real weights exist on these
machines, so the demo, the tests and a user smoke-testing an install all use a model
written from this recipe. A backend offers `make_tiny_model` (engine.contract.Backend) and
fills a folder with random weights in the real diffusers layout; this module holds what
must not differ between backends: the configs, the tokenizers, the marker and the
publishing protocol (built in a temp folder, renamed into place, idempotent).

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
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import OutputExistsError, TextinvError
from ..families import TRAINABLE_FAMILIES as FAMILIES  # tiny models exist only for what textinv trains
from .tiny_tokenizer import EOS, token_ids, write_tokenizer

TINY_WIDTHS = {"clip_l": 32, "clip_h": 48, "clip_g": 64}  # stand-ins for 768 / 1024 / 1280
MARKER = "textinv-tiny.json"  # written last into the temp folder: its presence means complete
RECIPE = 1  # bump when the recipe changes what a backend writes
SIZE = 64  # default image side; the UNet's sample_size is SIZE // 8
# Written into configs by backends that build without diffusers: any version past the
# pre-0.9 config migrations diffusers applies on load.
DIFFUSERS_VERSION = "0.30.0"

# Each tokenizer folder with its pad token: OpenCLIP pads with id 0, which is "!" (as SD 2.x ships it).
TOKENIZER_PADS = {"sd1": {"tokenizer": EOS}, "sd2": {"tokenizer": "!"},
                  "sdxl": {"tokenizer": EOS, "tokenizer_2": "!"}}
_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1)


def _text(pad: str, width: int, act: str, intermediate: int, projection: int) -> dict:
    # Real ids for bos/eos/pad (not the legacy eos_token_id=2 of old configs), so the
    # pooled output is taken at the first <|endoftext|> even after tokens are added.
    return dict(**token_ids(pad), hidden_size=width, intermediate_size=intermediate, projection_dim=projection,
                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act=act)


def _vae(scaling_factor: float) -> dict:
    # Four blocks = three downsamplings = the real factor of 8.
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(32, 32, 64, 64), norm_num_groups=32, scaling_factor=scaling_factor)


def recipe(family: str) -> dict:
    """What a tiny model of `family` is, as plain data:

        pipeline       the pipeline class and the options model_index.json records
        components     name -> (library, class, constructor arguments), in the order a
                       backend draws their random weights (text encoders, unet, vae)
        tokenizers     tokenizer folder -> pad token
    """
    check_family(family)
    unet = dict(sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64))
    if family == "sdxl":
        w_l, w_g = TINY_WIDTHS["clip_l"], TINY_WIDTHS["clip_g"]
        projection = 32  # pooled text_embeds width (1280 at full size)
        time_dim = 8  # each of the 6 size/crop ids gets a sinusoidal embedding this wide (256 full size)
        unet.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    cross_attention_dim=w_l + w_g,  # the two encoders' penultimate states, concatenated
                    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                    addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                    projection_class_embeddings_input_dim=6 * time_dim + projection)
        scheduler = ("EulerDiscreteScheduler", dict(**_BETAS, prediction_type="epsilon", timestep_spacing="leading",
                                                    interpolation_type="linear", use_karras_sigmas=False))
        return {
            "pipeline": ("StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True}),
            "components": {
                "text_encoder": ("transformers", "CLIPTextModel", _text(EOS, w_l, "quick_gelu", 37, w_l)),
                "text_encoder_2": ("transformers", "CLIPTextModelWithProjection",
                                   _text("!", w_g, "gelu", 4 * w_g, projection)),
                "unet": ("diffusers", "UNet2DConditionModel", unet),
                "vae": ("diffusers", "AutoencoderKL", _vae(0.13025)),
                "scheduler": ("diffusers", *scheduler),
            },
            "tokenizers": TOKENIZER_PADS[family],
        }
    sd2 = family == "sd2"
    width = TINY_WIDTHS["clip_h" if sd2 else "clip_l"]
    unet.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
                # SD1: a fixed number of heads (8 at full size); SD2: a fixed head size, so the head
                # count grows per block ([5, 10, 20, 20] at full size), with linear projections.
                attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2)
    if sd2:  # as stabilityai/stable-diffusion-2-1 ships it
        scheduler = ("DDIMScheduler", dict(**_BETAS, clip_sample=False, set_alpha_to_one=False,
                                           prediction_type="v_prediction"))
    else:  # as runwayml/stable-diffusion-v1-5 ships it
        scheduler = ("PNDMScheduler", dict(**_BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                                           prediction_type="epsilon"))
    text = _text(TOKENIZER_PADS[family]["tokenizer"], width, "gelu" if sd2 else "quick_gelu",
                 4 * width if sd2 else 37, width)
    return {
        "pipeline": ("StableDiffusionPipeline", {"requires_safety_checker": False}),
        "components": {
            "text_encoder": ("transformers", "CLIPTextModel", text),
            "unet": ("diffusers", "UNet2DConditionModel", unet),
            "vae": ("diffusers", "AutoencoderKL", _vae(0.18215)),
            "scheduler": ("diffusers", *scheduler),
        },
        "tokenizers": TOKENIZER_PADS[family],
    }


def recipe_files(family: str) -> dict[str, bytes]:
    """model_index.json and every component's config, as a backend without diffusers and
    transformers writes them: the recipe's arguments, the libraries fill in their defaults
    when they load it (the JAX backend's readers use the same defaults)."""
    r = recipe(family)
    pipeline, options = r["pipeline"]
    index: dict = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION, **options,
                   "feature_extractor": [None, None], "image_encoder": [None, None]}
    if pipeline == "StableDiffusionPipeline":
        index["safety_checker"] = [None, None]
    files: dict[str, dict] = {}
    for name, (library, cls, kwargs) in r["components"].items():
        index[name] = [library, cls]
        if library == "transformers":
            files[f"{name}/config.json"] = {"architectures": [cls], "model_type": "clip_text_model",
                                            "dtype": "float32", **kwargs}
        else:
            config = name + ("/scheduler_config.json" if name == "scheduler" else "/config.json")
            files[config] = {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **kwargs}
    for sub in r["tokenizers"]:
        index[sub] = ["transformers", "CLIPTokenizer"]
    files["model_index.json"] = dict(sorted(index.items()))
    return {path: (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode() for path, obj in files.items()}


def widths(family: str) -> dict[str, int]:
    """The embedding slots of `family` with their tiny widths."""
    slots = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}[family]
    return {s: TINY_WIDTHS[s] for s in slots}


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise TextinvError(f"Unknown model family {family!r}.", f"Pick one of: {', '.join(FAMILIES)}.")


def check_seed(seed) -> int:
    try:
        value = operator.index(seed)  # ints and numpy ints; not floats, strings or bools
    except TypeError:
        value = -1
    if isinstance(seed, bool) or not 0 <= value < 2**63:
        raise TextinvError(f"The seed must be an integer from 0 to 2**63-1, not {seed!r}.")
    return value


# -- the folder ----------------------------------------------------------------------------

def read_tiny_info(path: Path) -> dict | None:
    """The marker of a folder ({"recipe", "family", "seed", "widths", "backend"}), or None
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
    """Any backend's tiny model of this family, seed and recipe will do (they load alike)."""
    info = read_tiny_info(path)
    return bool(info) and (info.get("recipe"), info.get("family"), info.get("seed")) == (RECIPE, family, seed)


def publish_tiny_model(out: Path, family: str, seed: int, build: Callable[[Path, str, int], None],
                       backend: str) -> Path:
    """Write a complete tiny model of `family` into `out` and return `out`.

    `build(folder, family, seed)` is the backend's part: it writes model_index.json and
    every component (configs and random weights from `recipe(family)`) into an empty temp
    folder; the tokenizers and the marker are written here, the same for every backend.
    Idempotent: if `out` already holds a tiny model of this family, seed and recipe it is
    returned untouched; any other non-empty `out` is refused. The temp folder is renamed
    into place, so an interrupted call leaves nothing half-written under `out`.
    """
    check_family(family)
    seed = check_seed(seed)
    out = Path(out).expanduser().absolute()
    if _matches(out, family, seed):
        return out
    what = f"a tiny {family} model (seed {seed})"
    refuse_occupied(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(tmp, family, seed)
        # The plain SD layout (vocab.json + merges.txt), which every transformers version
        # reads and which stays byte-identical across runs, whatever the backend wrote.
        for sub, pad in TOKENIZER_PADS[family].items():
            shutil.rmtree(tmp / sub, ignore_errors=True)
            write_tokenizer(tmp / sub, pad)
        (tmp / MARKER).write_text(json.dumps({"recipe": RECIPE, "family": family, "seed": seed,
                                              "widths": widths(family), "backend": backend}, indent=2) + "\n")
        publish_folder(tmp, out, lambda: _matches(out, family, seed), what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; cleanup otherwise
    return out


def refuse_occupied(out: Path, what: str) -> None:
    """Refuse a non-empty `out`, naming the tiny model in it if it holds one."""
    from ..writes import check_new_folder

    check_new_folder(out, what, "Pick another folder: a new or empty one, somewhere writable.")
    if out.is_dir() and any(out.iterdir()):
        info = read_tiny_info(out)
        found = (f"the tiny {info['family']} model with seed {info.get('seed')} (recipe {info.get('recipe')})"
                 if info else "other files")
        raise OutputExistsError(f"{out} already holds {found}; refusing to write {what} there.",
                                "Pick an empty or new folder, or remove this one.")


def publish_folder(tmp: Path, out: Path, already_there: Callable[[], bool], what: str) -> None:
    """Rename tmp to out. rename() replaces only an empty folder, so two processes racing
    to write the same thing both end up returning the one that landed first."""
    for f in sorted(tmp.rglob("*")):  # contents on disk before the name appears
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    try:
        os.rename(tmp, out)
    except OSError:
        if already_there():
            return
        refuse_occupied(out, what)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
