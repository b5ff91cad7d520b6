"""Tiny single-file checkpoints in the original (LDM/SGM) layout, written from a diffusers folder.

The inverse of what textinv_cli.models.checkpoints converts, written here independently as
explicit diffusers -> LDM tables (the independent check of the mapping is diffusers' own
single-file loader, tests/test_checkpoint_vs_diffusers.py). It writes what real files hold:
`.safetensors` or a torch.save `.ckpt` ({"state_dict": ..., "global_step": ...}), fp32/fp16/bf16,
with or without a VAE, with or without EMA copies (LitEma's dotless names, different values),
the DDPM schedule buffers, CLIP's position_ids buffer, and for SD 2.x OpenCLIP's last
resblock (random: diffusers' SD 2.x text encoder leaves it out) and its unused projection.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = {"sd1": ["cond_stage_model.transformer."], "sd2": ["cond_stage_model.model."],
               "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def family_of(folder: Path) -> str:
    return json.loads((Path(folder) / "textinv-tiny.json").read_text())["family"]


def _config(folder: Path, component: str) -> dict:
    return json.loads((Path(folder) / component / "config.json").read_text())


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(str(Path(folder) / component / name))


def unet_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    lpb = cfg["layers_per_block"]
    attn_up = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    out = {}
    for name, t in sd.items():
        new = None
        for old, ldm in fixed.items():
            if name.startswith(old + "."):
                new = ldm + name[len(old):]
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                if kind == "downsamplers":
                    new = f"input_blocks.{(i + 1) * (lpb + 1)}.0.{rest.replace('conv.', 'op.')}"
                else:
                    new = f"input_blocks.{1 + i * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
            elif kind == "upsamplers":
                new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if attn_up[i] else 1}.{rest}"
            else:
                new = f"output_blocks.{i * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        if new is None:
            raise AssertionError(f"no LDM name for UNet tensor {name}")
        if ".resnets." in name:  # a ResBlock's own layer names
            m = re.match(r"((?:input|output)_blocks\.\d+\.0\.|middle_block\.[02]\.)(\w+)(\..*)", new)
            new = m.group(1) + RESNET[m.group(2)] + m.group(3)
        out[UNET + new] = t
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], cfg: dict, prefix: str = VAE) -> dict[str, torch.Tensor]:
    n = len(cfg["block_out_channels"])
    out = {}
    for name, t in sd.items():
        new = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.upsample.", new)
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in VAE_ATTN.items():
                new = new.replace(f"attn_1.{old}.", f"attn_1.{ldm}.")
            if t.ndim == 2:
                t = t[:, :, None, None]  # ldm's attention projections are 1x1 convs
        out[prefix + new] = t.contiguous()
    return out


def hf_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str, legacy: bool = False) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel as SD 1.x stores it; legacy: without the `text_model.` level.
    The folder's keys may lack that level too (transformers 5's save_pretrained drops it)."""
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": t for k, t in sd.items()}
    out = {prefix + (k.removeprefix("text_model.") if legacy else k): t for k, t in sd.items()}
    pos = ("" if legacy else "text_model.") + "embeddings.position_ids"
    out[prefix + pos] = torch.arange(77, dtype=torch.int64)[None]
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor], cfg: dict, prefix: str, extra_layer: bool,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    w, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "logit_scale": torch.tensor(4.6052)}
    for k in range(layers):
        src, dst = f"text_model.encoder.layers.{k}.", f"{prefix}transformer.resblocks.{k}."
        for what in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{what}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{what}"] for p in "qkv"])
            for old, new in OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{what}"] = sd[f"{src}{old}.{what}"]
    if extra_layer:  # SD 2.x: OpenCLIP's last block, which SD 2.x never runs (it takes the penultimate)
        like = {k.replace(f".resblocks.{layers - 1}.", f".resblocks.{layers}."): t
                for k, t in out.items() if f".resblocks.{layers - 1}." in k}
        out.update({k: torch.randn(t.shape, generator=gen) for k, t in like.items()})
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:  # SD 2.x files keep the projection, unused
        out[prefix + "text_projection"] = torch.randn((w, cfg.get("projection_dim", w)), generator=gen)
    return out


def ldm_state_dict(folder: Path, *, vae: bool = True, ema: bool = False, legacy_clip: bool = False,
                   seed: int = 0, sd2_last_block: bool = True) -> dict[str, torch.Tensor]:
    """The whole checkpoint's tensors (fp32, as the folder holds them, plus the extras).
    sd2_last_block=False: an SD 2.x file saved without OpenCLIP's unused last resblock."""
    folder = Path(folder)
    family = family_of(folder)
    gen = torch.Generator().manual_seed(seed)
    sd = unet_to_ldm(_weights(folder, "unet"), _config(folder, "unet"))
    if vae:
        sd.update(vae_to_ldm(_weights(folder, "vae"), _config(folder, "vae")))
    prefixes = TEXT_PREFIX[family]
    if family == "sd2":
        sd.update(hf_to_open_clip(_weights(folder, "text_encoder"), _config(folder, "text_encoder"), prefixes[0],
                                  sd2_last_block, gen))
    else:
        sd.update(hf_clip_to_ldm(_weights(folder, "text_encoder"), prefixes[0], legacy_clip))
    if family == "sdxl":
        sd.update(hf_to_open_clip(_weights(folder, "text_encoder_2"), _config(folder, "text_encoder_2"),
                                  prefixes[1], False, gen))
    for name in DDPM_BUFFERS:
        sd[name] = torch.rand(1000, generator=gen)
    if ema:  # LitEma: the UNet's parameters under names without dots, with other values
        for name, t in list(sd.items()):
            if name.startswith(UNET):
                sd["model_ema." + name[len("model."):].replace(".", "")] = torch.randn(t.shape, generator=gen)
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return sd


def save_checkpoint(sd: dict[str, torch.Tensor], out: Path, dtype: str = "fp32") -> Path:
    """`.safetensors` or `.ckpt` by out's suffix; float tensors cast to `dtype`."""
    out = Path(out)
    cast = {k: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).contiguous() for k, t in sd.items()}
    if out.suffix == ".ckpt":
        torch.save({"state_dict": cast, "global_step": 470000, "epoch": 6}, out)
    else:
        save_file(cast, str(out))
    return out


def write_ldm_checkpoint(folder: Path, out: Path, dtype: str = "fp32", **kw) -> Path:
    return save_checkpoint(ldm_state_dict(folder, **kw), out, dtype)


def write_ldm_vae(folder: Path, out: Path, *, prefixed: bool = False, layout: str = "ldm", dtype: str = "fp32",
                  extras: bool = True) -> Path:
    """A standalone VAE file as A1111 users download them (vae-ft-mse-840000-ema-pruned): LDM keys,
    with or without `first_stage_model.`, plus `loss.*` and `model_ema.*` leftovers; or diffusers keys."""
    folder = Path(folder)
    sd = _weights(folder, "vae")
    if layout == "ldm":
        sd = vae_to_ldm(sd, _config(folder, "vae"), VAE if prefixed else "")
    if extras:
        sd["loss.logvar"] = torch.zeros(())
        sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
        sd["model_ema.decay"] = torch.tensor(0.9999)
    return save_checkpoint(sd, out, dtype)
