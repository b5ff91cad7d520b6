"""The architectures a single-file checkpoint can hold, and the diffusers folder each becomes.

Real ones: SD 1.x, SD 2.x (512 epsilon / 768 v) and SDXL base, with the configs that
stable-diffusion-v1-5, stable-diffusion-2-1(-base) and stable-diffusion-xl-base-1.0 ship
(written here as our own data, so a conversion needs no Hub); and textinv's tiny sd1/sd2/sdxl,
whose configs come from models/tiny.py, so a tiny model saved in the LDM layout converts back
to exactly the tiny folder. An architecture is recognised by a few shapes (identify); the
full plan (ldm_keys) then checks every tensor.

Text encoder configs carry the real <|startoftext|>/<|endoftext|>/pad ids, not the legacy
eos_token_id=2 of the Hub configs: with those transformers takes the pooled output at the
first <|endoftext|>, which stays right after textual inversion adds tokens with higher ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ...errors import FormatError
from .. import tiny
from . import ldm_keys as K

EOS = "<|endoftext|>"
REAL_IDS = {"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407}
PAD_IDS = {EOS: 49407, "!": 0}  # CLIP-L pads with <|endoftext|>, OpenCLIP with "!" (id 0)
_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, trained_betas=None)
# As the real repos ship them (keys the class does not take left out, so diffusers warns of none).
SCHEDULERS = {"PNDMScheduler": dict(_BETAS, set_alpha_to_one=False, skip_prk_steps=True),
              "DDIMScheduler": dict(_BETAS, set_alpha_to_one=False, clip_sample=False),
              "EulerDiscreteScheduler": dict(_BETAS, interpolation_type="linear", use_karras_sigmas=False,
                                             timestep_spacing="leading")}
SCHEDULER_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


def _clip(width: int, layers: int, heads: int, act: str, projection: int, pad: str, cls: str) -> dict:
    return {"architectures": [cls], "model_type": "clip_text_model", "hidden_size": width,
            "intermediate_size": 4 * width, "num_hidden_layers": layers, "num_attention_heads": heads,
            "hidden_act": act, "projection_dim": projection, "max_position_embeddings": 77, "layer_norm_eps": 1e-05,
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
            **REAL_IDS, "pad_token_id": PAD_IDS[pad], "dtype": "float32"}


CLIP_L = _clip(768, 12, 12, "quick_gelu", 768, EOS, "CLIPTextModel")  # openai/clip-vit-large-patch14
# OpenCLIP ViT-H: 24 layers in the file, 23 in diffusers (SD 2.x uses the penultimate layer).
OPEN_CLIP_H = _clip(1024, 23, 16, "gelu", 512, "!", "CLIPTextModel")
OPEN_CLIP_BIGG = _clip(1280, 32, 20, "gelu", 1280, "!", "CLIPTextModelWithProjection")

_UNET_COMMON = {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
                "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32}
UNET_SD1 = {**_UNET_COMMON, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768, "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
UNET_SD2 = {**UNET_SD1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True, "dual_cross_attention": False, "only_cross_attention": False,
            "num_class_embeds": None, "upcast_attention": False}
UNET_SDXL = {**_UNET_COMMON, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "cross_attention_dim": 2048, "sample_size": 128, "use_linear_projection": True,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
             "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816,  # 6 size/crop ids x 256 + the pooled 1280
             "mid_block_type": "UNetMidBlock2DCrossAttn", "upcast_attention": False}
VAE_SD = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
VAE_SDXL = {**VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


@dataclass(frozen=True)
class TextSource:
    """Where a text encoder sits in the file and in which layout."""
    component: str     # text_encoder | text_encoder_2
    prefix: str        # ldm_keys.SD1_TEXT, ...
    layout: str        # "hf" (transformers CLIP) | "openclip"
    drops_last: bool = False  # SD 2.x: the file holds one more resblock than diffusers uses
    projection: bool = False  # SDXL's bigG: CLIPTextModelWithProjection


@dataclass(frozen=True)
class Architecture:
    name: str                          # shown to the user: "SD 1.x", "tiny sd2", ...
    family: str                        # sd1 | sd2 | sdxl
    tiny: bool
    texts: tuple[TextSource, ...]
    default_prediction: str | None     # None: the file or the user must say (SD 2.x)
    components: dict = field(hash=False, compare=False, default_factory=dict)  # name -> (library, class, config)

    def config(self, component: str) -> dict:
        return self.components[component][2]

    def fingerprint(self) -> dict:
        """The few shapes that tell architectures apart, as identify() reads them from a file."""
        unet = self.config("unet")
        fp = {"UNet width": unet["block_out_channels"][0], "UNet input channels": unet.get("in_channels", 4),
              "cross-attention width": unet["cross_attention_dim"],
              "size/crop conditioning": unet.get("projection_class_embeddings_input_dim")}
        for t in self.texts:
            c = self.config(t.component)
            fp[f"{t.component} ({_where(t.prefix)})"] = (c["hidden_size"], c["num_hidden_layers"] + t.drops_last,
                                                          c["vocab_size"])
        return fp

    def matches(self, fp: dict) -> bool:
        """A file's fingerprint is this architecture's. SD 2.x files may lack OpenCLIP's last
        resblock (savers that know it is unused, diffusers' own back-conversion among them)."""
        mine = self.fingerprint()
        if fp == mine:
            return True
        for t in self.texts:
            key = f"{t.component} ({_where(t.prefix)})"
            if t.drops_last and key in fp:
                w, layers, vocab = mine[key]
                if fp == {**mine, key: (w, layers - 1, vocab)}:
                    return True
        return False


def _where(prefix: str) -> str:
    return prefix.rstrip(".")


def _texts(family: str) -> tuple[TextSource, ...]:
    if family == "sd1":
        return (TextSource("text_encoder", K.SD1_TEXT, "hf"),)
    if family == "sd2":
        return (TextSource("text_encoder", K.SD2_TEXT, "openclip", drops_last=True),)
    return (TextSource("text_encoder", K.SDXL_TEXT_L, "hf"),
            TextSource("text_encoder_2", K.SDXL_TEXT_G, "openclip", projection=True))


def _real(name: str, family: str, text: dict, unet: dict, vae: dict, scheduler: str) -> Architecture:
    comps = {"unet": ("diffusers", "UNet2DConditionModel", unet), "vae": ("diffusers", "AutoencoderKL", vae),
             "scheduler": ("diffusers", scheduler, dict(SCHEDULERS[scheduler]))}
    comps.update({k: ("transformers", cfg["architectures"][0], cfg) for k, cfg in text.items()})
    return Architecture(name, family, False, _texts(family), None if family == "sd2" else "epsilon", comps)


def _tiny(family: str) -> Architecture:
    files = {k: json.loads(v) for k, v in tiny.recipe_files(family).items()}
    comps = {}
    for name, (library, cls, _) in tiny.recipe(family)["components"].items():
        cfg = files[f"{name}/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"]
        comps[name] = (library, cls, cfg)
    # Ours, so known: the prediction the recipe trains and samples with.
    prediction = "v" if comps["scheduler"][2].get("prediction_type") == "v_prediction" else "epsilon"
    return Architecture(f"tiny {family}", family, True, _texts(family), prediction, comps)


ARCHITECTURES: tuple[Architecture, ...] = (
    _real("SD 1.x", "sd1", {"text_encoder": CLIP_L}, UNET_SD1, VAE_SD, "PNDMScheduler"),
    _real("SD 2.x", "sd2", {"text_encoder": OPEN_CLIP_H}, UNET_SD2, VAE_SD, "DDIMScheduler"),
    _real("SDXL base", "sdxl", {"text_encoder": CLIP_L, "text_encoder_2": OPEN_CLIP_BIGG}, UNET_SDXL, VAE_SDXL,
          "EulerDiscreteScheduler"),
    *(_tiny(f) for f in ("sd1", "sd2", "sdxl")),
)


def _layer_count(names, prefix: str, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if n.startswith(prefix) and (m := re.match(pattern, n[len(prefix):]))}
    return max(found) + 1 if found else 0


def hf_prefix(names, prefix: str) -> str:
    """transformers' CLIP saved with or without its `text_model.` level."""
    return prefix + "text_model." if any(n.startswith(prefix + "text_model.") for n in names) else prefix


def file_fingerprint(tensors: dict) -> dict:
    """identify()'s view of a file: `tensors` maps names to objects with a .shape."""
    def shape(name):
        info = tensors.get(name)
        return tuple(info.shape) if info is not None else None

    conv_in = shape(K.UNET + "input_blocks.0.0.weight") or (None, None)
    ctx = next((tuple(i.shape)[-1] for n, i in sorted(tensors.items())
                if n.startswith(K.UNET) and n.endswith("attn2.to_k.weight") and len(i.shape) == 2), None)
    adm = shape(K.UNET + "label_emb.0.0.weight")
    fp = {"UNet width": conv_in[0], "UNet input channels": conv_in[1] if len(conv_in) > 1 else None,
          "cross-attention width": ctx, "size/crop conditioning": adm[1] if adm and len(adm) == 2 else None}
    names = list(tensors)
    for prefix, layout, component in ((K.SD1_TEXT, "hf", "text_encoder"), (K.SD2_TEXT, "openclip", "text_encoder"),
                                      (K.SDXL_TEXT_L, "hf", "text_encoder"),
                                      (K.SDXL_TEXT_G, "openclip", "text_encoder_2")):
        if layout == "hf":
            p = hf_prefix(names, prefix)
            emb, layers = shape(p + "embeddings.token_embedding.weight"), _layer_count(names, p, r"encoder\.layers\.(\d+)\.")
        else:
            emb, layers = shape(prefix + "token_embedding.weight"), _layer_count(names, prefix,
                                                                               r"transformer\.resblocks\.(\d+)\.")
        if emb is not None or layers:
            fp[f"{component} ({_where(prefix)})"] = (emb[1] if emb and len(emb) == 2 else None, layers,
                                                     emb[0] if emb else None)
    return fp


def _describe(key: str, value) -> str:
    if isinstance(value, tuple):
        return f"{key}: width {value[0]}, {value[1]} layers, vocabulary {value[2]}"
    return f"{key}: {'none' if value is None else value}"


def identify(tensors: dict, what: str) -> Architecture:
    """The architecture whose fingerprint the file's shapes match, else an error naming the
    closest known one and what differs from it."""
    fp = file_fingerprint(tensors)
    for arch in ARCHITECTURES:
        if arch.matches(fp):
            return arch

    def distance(arch):
        theirs = arch.fingerprint()
        return sum(fp.get(k) != theirs.get(k) for k in set(fp) | set(theirs))

    closest = min(ARCHITECTURES, key=distance)
    theirs = closest.fingerprint()
    diffs = [f"{_describe(k, fp.get(k))} (expected {_describe(k, theirs.get(k)).split(': ', 1)[1]})"
             for k in sorted(set(fp) | set(theirs)) if fp.get(k) != theirs.get(k)]
    raise FormatError(f"{what} is no Stable Diffusion architecture textinv converts; closest is {closest.name}, "
                      f"but {'; '.join(diffs[:4])}.",
                      "textinv converts SD 1.x, SD 2.x and SDXL base checkpoints (or convert it to a diffusers "
                      "folder elsewhere and pass that folder to --model).")


def with_prediction(arch: Architecture, prediction: str) -> dict:
    """Component name -> (library, class, config), the configs set for `prediction`."""
    comps = {k: (lib, cls, json.loads(json.dumps(cfg))) for k, (lib, cls, cfg) in arch.components.items()}
    sched = comps["scheduler"][2]
    sched["prediction_type"] = SCHEDULER_PREDICTION[prediction]
    if arch.name == "SD 2.x":
        # 768-v models (v2-1_768-ema-pruned) were trained at 768 px, the 512 base ones at 512,
        # as stable-diffusion-2-1 and -2-1-base ship them; 2.1-v needs attention in fp32
        # (its config sets upcast_attention, without which fp16 sampling turns black).
        v = prediction == "v"
        comps["unet"][2].update(sample_size=96 if v else 64, upcast_attention=v)
        comps["vae"][2]["sample_size"] = 768 if v else 512
    return comps
