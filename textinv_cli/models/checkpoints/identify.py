"""What a checkpoint is, from its tensor names and shapes (and metadata) alone.

The family follows from which groups of keys the file has, in the original (LDM) layout that
A1111, ComfyUI and Stability's releases use, never from exact widths (the repo's tiny models
are 32/48/64 wide where SD's encoders are 768/1024/1280):

    sd1   cond_stage_model.transformer.*                    (CLIP ViT-L, 768)
    sd2   cond_stage_model.model.*                          (OpenCLIP ViT-H, 1024)
    sdxl  conditioner.embedders.0.transformer.* (CLIP-L)  + conditioner.embedders.1.model.* (bigG, 1280)

each with a UNet (model.diffusion_model.*) that takes 4 latent channels. Everything else is
refused with what the file looks like and, where one fits, the command that takes it.
"""

from __future__ import annotations

import shlex

from ...errors import FormatError
from ...untrusted import quoted, shown

UNET = "model.diffusion_model."
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE = "first_stage_model."
EMA = "model_ema."
# The text encoders' token embedding, per family: the first key present gives the width.
TOKEN_EMBEDDINGS = {
    "sd1": ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.embeddings.token_embedding.weight"),
    "sd2": ("cond_stage_model.model.token_embedding.weight",),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.0.transformer.embeddings.token_embedding.weight"),
    "sdxl_g": ("conditioner.embedders.1.model.token_embedding.weight",),
}
REAL_WIDTHS = {"sd1": (768,), "sd2": (1024,), "sdxl": (768, 1280)}
_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model.",
             "xl_l": "conditioner.embedders.0.transformer.", "xl_g": "conditioner.embedders.1.model.",
             "refiner_g": "conditioner.embedders.0.model."}
_DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}
_IN_CHANNELS = {9: "an inpainting model", 8: "an instruct-pix2pix (image editing) model"}
_V_WORDS = ("v", "v_prediction", "v-prediction", "v_pred")
_EPS_WORDS = ("epsilon", "eps")


def family_of(shapes: dict[str, tuple], path) -> tuple[str, dict[str, int]]:
    """(family, {slot: text-encoder width}) of a full SD checkpoint; FormatError otherwise."""
    has = {group: any(k.startswith(p) for k in shapes) for group, p in _PREFIXES.items()}
    families = [f for f, present in (("sd1", has["sd1"]), ("sd2", has["sd2"]),
                                     ("sdxl", has["xl_l"] or has["xl_g"] or has["refiner_g"])) if present]
    if len(families) > 1:
        raise FormatError(f"{shown(path)} mixes the text encoder keys of {' and '.join(families)}; it is no single "
                          "Stable Diffusion model.", "Use the checkpoint as it was released.")
    if not families or not any(k.startswith(UNET) for k in shapes):
        raise FormatError(*_not_a_checkpoint(shapes, path))
    family = families[0]
    if family == "sdxl" and not has["xl_l"]:
        what = "the SDXL refiner" if has["refiner_g"] else "an SDXL model without its CLIP-L text encoder"
        raise FormatError(f"{shown(path)} is {what} (it has no CLIP-L text encoder, conditioner.embedders.0"
                          ".transformer); embeddings are trained on a base model.",
                          "Use the SDXL base model (sd_xl_base_1.0.safetensors) or a model fine-tuned from it.")
    if family == "sdxl" and not has["xl_g"]:
        raise FormatError(f"{shown(path)} is an SDXL model without its OpenCLIP bigG text encoder "
                          "(conditioner.embedders.1.model).", "Use the full SDXL checkpoint.")
    _check_unet_inputs(shapes, path)
    slots = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}[family]
    groups = {"sd1": ("sd1",), "sd2": ("sd2",), "sdxl": ("sdxl", "sdxl_g")}[family]
    widths = {}
    for slot, group in zip(slots, groups):
        key = next((k for k in TOKEN_EMBEDDINGS[group] if k in shapes), None)
        if key is None or len(shapes[key]) != 2:
            raise FormatError(f"{shown(path)} has {family} text encoder keys but no token embedding "
                              f"({TOKEN_EMBEDDINGS[group][0]}).", "The checkpoint is incomplete or damaged.")
        widths[slot] = int(shapes[key][1])
    return family, widths


def _check_unet_inputs(shapes: dict[str, tuple], path) -> None:
    shape = shapes.get(UNET_IN)
    if shape is None or len(shape) != 4:
        raise FormatError(f"{shown(path)} has UNet keys but no 4-D {UNET_IN}; it is not a Stable Diffusion "
                          "1.x/2.x/XL UNet.", "Use an SD 1.x, 2.x or SDXL checkpoint.")
    if shape[1] != 4:
        what = _IN_CHANNELS.get(shape[1], f"a model whose UNet takes {shape[1]} input channels")
        raise FormatError(f"{shown(path)} is {what} (its UNet takes {shape[1]} input channels, not 4); "
                          "embeddings are trained on a text-to-image model.",
                          "Use the base model it was made from (e.g. v1-5-pruned-emaonly.safetensors).")


def _not_a_checkpoint(shapes: dict[str, tuple], path) -> tuple[str, str]:
    """(message, hint) naming what a file that is no SD checkpoint looks like."""
    keys = list(shapes)
    name = shown(path)
    again = shown(shlex.quote(str(path)), 200)
    example = f", e.g. {quoted(keys[0], 60)}" if keys else ""
    if not keys:
        return f"{name} holds no tensors; it is not a Stable Diffusion checkpoint.", "Check that the file is complete."
    if any(k.startswith(("lora_", "lora.")) or ".lora_" in k or ".lora." in k or "hada_w" in k or "lokr_w" in k
           for k in keys):
        return (f"{name} looks like a LoRA ({len(keys)} tensors{example}), not a base model.",
                f"Train on the model it was made for; if it bundles embeddings, import them: textinv import {again}")
    if len(keys) <= 4 and all(len(s) <= 2 for s in shapes.values()) and (
            any(k in ("emb_params", "clip_l", "clip_g", "clip_h", "t5") or k.startswith(("string_to_param",))
                for k in keys) or len(keys) == 1):
        return (f"{name} looks like a Textual Inversion embedding ({len(keys)} tensor(s){example}), not a model.",
                f"Register it with: textinv import {again}")
    if any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys):
        return (f"{name} looks like a Stable Diffusion 3 model; textinv trains on SD 1.x, 2.x and SDXL.",
                "Use an SD 1.x, 2.x or SDXL checkpoint.")
    if any(k.startswith(("model.diffusion_model.double_blocks.", "double_blocks.")) for k in keys):
        return (f"{name} looks like a FLUX model; textinv trains on SD 1.x, 2.x and SDXL.",
                "Use an SD 1.x, 2.x or SDXL checkpoint.")
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE)) for k in keys):
        return (f"{name} looks like a VAE ({len(keys)} tensors), not a full model.",
                f"Pass it with a base model: --model MODEL --vae {again}")
    if any(k.startswith(("down_blocks.", "conv_in.", "text_model.", "encoder.layers.")) for k in keys):
        return (f"{name} looks like one component of a diffusers model (a UNet, text encoder or VAE file), "
                "not a single-file checkpoint.", "Give the model's folder (the one with model_index.json) as --model.")
    if any(k.startswith(UNET) for k in keys):
        return (f"{name} has a UNet (model.diffusion_model.*) but no text encoder; embeddings need one.",
                "Use a full checkpoint (with cond_stage_model.* or conditioner.* keys).")
    return (f"{name} does not look like a Stable Diffusion checkpoint ({len(keys)} tensors{example}).",
            "Give an SD 1.x, 2.x or SDXL .safetensors or .ckpt file.")


def variant_of(dtypes: dict[str, str]) -> str:
    """The UNet's storage dtype ("fp32", "fp16", "bf16"), or "mixed": what a file's size reflects."""
    found = {dtypes[k] for k in dtypes if k.startswith(UNET) and k.endswith(".weight")}
    if len(found) == 1:
        tag = found.pop()
        return _DTYPE_NAMES.get(tag, tag.lower())
    return "mixed" if found else "unknown"


def has_ema(shapes: dict[str, tuple]) -> bool:
    """EMA weights, not just the counters pruned files keep (model_ema.decay, .num_updates)."""
    return any(k.startswith(EMA) and k not in ("model_ema.decay", "model_ema.num_updates") for k in shapes)


def prediction_in_file(metadata: dict[str, str], shapes: dict[str, tuple]) -> tuple[str | None, str | None]:
    """(prediction, where the file says so): modelspec metadata (Stability's and kohya's), or the
    `v_pred` marker key (ComfyUI's); (None, None) when the file does not say."""
    kind = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if kind in _V_WORDS:
        return "v", "modelspec.prediction_type"
    if kind in _EPS_WORDS:
        return "epsilon", "modelspec.prediction_type"
    arch = str(metadata.get("modelspec.architecture", "")).strip().lower()
    if arch.endswith("-v") or "-v/" in arch:
        return "v", "modelspec.architecture"
    if "v_pred" in shapes:
        return "v", "the v_pred key"
    return None, None


def prediction_in_config(config) -> str | None:
    """An LDM config's parameterization (A1111's sidecar .yaml): "v" -> "v", else "epsilon"
    (the LDM default "eps" applies when a config leaves it out)."""
    params = config.get("model", {}).get("params", {}) if isinstance(config, dict) else {}
    value = params.get("parameterization") if isinstance(params, dict) else None
    return "v" if isinstance(value, str) and value.strip().lower() in _V_WORDS else "epsilon"
