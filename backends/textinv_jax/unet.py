"""diffusers' UNet2DConditionModel as a flax.nnx module: config, weight import, forward.

    config = read_unet_config(folder)              # or unet_config(config_dict)
    unet = load_unet(folder, config)               # or load_unet(state_dict, config)
    pred = unet(latents_nhwc, timesteps, text_states, dtype=jnp.bfloat16)

The module tree is diffusers' (`unet.down_blocks[0].resnets[1].conv1.kernel` holds
down_blocks.0.resnets.1.conv1.weight as HWIO; linears [in, out], norm `scale`s; see
weights.py), all Frozen weights. Activations are NHWC.

Covers SD 1.x (1x1-conv projections, one head count), SD 2.x (linear projections, a head
count per block, upcast_attention) and the SDXL UNet (text_time added embedding, deeper
transformers per block). Config options that change the network in other ways are refused
by name rather than silently ignored. Structure: diffusers/models/unets/unet_2d_condition.py
and embeddings.py (Timesteps, TimestepEmbedding); blocks in unet_blocks.py.
A UNet the JAX backend runs is what `unet_config` accepts; its module is then exactly what
`expected_shapes` names (weights.load_into checks both ways).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from textinv_cli.errors import TextinvError

from . import nn
from .layers import Conv2d, GroupNorm, Linear
from .unet_blocks import (BlockSpec, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
                          UpBlock2D, Widths)
from .weights import load_into, read_config, read_state, require_keys, to_params

__all__ = ["BlockSpec", "UNet2DConditionModel", "UNetConfig", "load_unet", "read_unet_config", "timestep_embedding",
           "unet_config"]

_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# Options whose other values change the network in ways not ported here, with the value
# that means "off". A config that sets one is refused, never half-honoured.
_OFF = {
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim_type": None, "encoder_hid_dim": None,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "dual_cross_attention": False, "attention_type": "default",
    "resnet_time_scale_shift": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "act_fn": "silu", "num_attention_heads": None, "center_input_sample": False,
}
_TORCH = "Use --backend torch for this model."


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """What UNet2DConditionModel needs from its config, normalised per block. Hashable."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down: tuple[BlockSpec, ...]
    mid: BlockSpec | None
    up: tuple[BlockSpec, ...]
    cross_attention_dim: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_dim: int = 1280
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None            # None, or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None        # SDXL: sinusoid width per size/crop id
    projection_class_embeddings_input_dim: int | None = None  # SDXL: pooled text + 6 ids' sinusoids
    sample_size: int | None = None                    # latent side the model was trained at (info)


def unet_config(cfg: Mapping) -> UNetConfig:
    """Normalise a diffusers unet/config.json as UNet2DConditionModel.__init__ does.

    diffusers' legacy naming: `attention_head_dim` is the number of heads per block (SD 1.x:
    8 everywhere; SD 2.x: [5, 10, 20, 20]); each head is channels // heads wide.
    """
    for key, off in _OFF.items():
        if cfg.get(key, off) != off:
            raise TextinvError(f"This UNet sets {key}={cfg[key]!r}, which the JAX backend does not support.", _TORCH)
    down_types = [_strip(t) for t in cfg.get("down_block_types", ())]
    up_types = [_strip(t) for t in cfg.get("up_block_types", ())]
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    bad = [t for t in down_types if t not in _DOWN] + [t for t in up_types if t not in _UP]
    bad += [mid_type] if mid_type not in ("UNetMidBlock2DCrossAttn", None) else []
    if bad:
        raise TextinvError(f"This UNet has blocks the JAX backend does not support: {', '.join(bad)}.", _TORCH)
    add = cfg.get("addition_embed_type")
    if add not in (None, "text_time"):
        raise TextinvError(f"This UNet sets addition_embed_type={add!r}, which the JAX backend does not support.",
                           _TORCH)
    n = len(down_types)
    channels = tuple(int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    if not n or len(channels) != n or len(up_types) != n:
        raise TextinvError("The UNet config's down_block_types, up_block_types and block_out_channels "
                           "differ in length.")

    def per_block(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

    def per_layer(value, count):
        return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * count

    heads = per_block(cfg.get("attention_head_dim", 8))
    layers = per_block(cfg.get("layers_per_block", 2))
    xdims = per_block(cfg.get("cross_attention_dim", 1280))
    only_cross = per_block(cfg.get("only_cross_attention", False))
    depth = per_block(cfg.get("transformer_layers_per_block", 1))
    rdepth = cfg.get("reverse_transformer_layers_per_block") or depth[::-1]
    if not cfg.get("reverse_transformer_layers_per_block") and any(isinstance(d, (list, tuple)) for d in depth):
        raise TextinvError("This UNet gives transformer_layers_per_block per layer without "
                           "reverse_transformer_layers_per_block (diffusers refuses it too).")
    if len(set(xdims)) != 1:
        raise TextinvError("This UNet has a different cross_attention_dim per block, which the JAX backend "
                           "does not support.", _TORCH)
    if any(h is None for h in heads):
        raise TextinvError("This UNet's attention_head_dim has empty entries, which the JAX backend does "
                           "not support.", _TORCH)
    common = dict(linear_proj=bool(cfg.get("use_linear_projection", False)),
                  output_scale_factor=float(cfg.get("resnet_out_scale_factor", 1.0)))
    if int(cfg.get("downsample_padding", 1)) != 1:
        raise TextinvError("This UNet sets downsample_padding != 1, which the JAX backend does not support.", _TORCH)
    # upcast_attention (SD 2.1) needs no flag: attention softmax always runs in float32 here.
    down = tuple(
        BlockSpec(cross_attention=_DOWN[t], layers=int(layers[i]), transformer_layers=per_layer(depth[i], layers[i]),
                  heads=int(heads[i]), only_cross=bool(only_cross[i]), resample=i < n - 1, **common)
        for i, t in enumerate(down_types))
    mid = None if mid_type is None else BlockSpec(
        cross_attention=True, layers=2, transformer_layers=per_layer(depth[-1], 1)[:1], heads=int(heads[-1]),
        only_cross=False, resample=False, linear_proj=common["linear_proj"],
        output_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)))
    rheads, rlayers, ronly = heads[::-1], layers[::-1], only_cross[::-1]
    up = tuple(
        BlockSpec(cross_attention=_UP[t], layers=int(rlayers[i]) + 1,
                  transformer_layers=per_layer(rdepth[i], int(rlayers[i]) + 1), heads=int(rheads[i]),
                  only_cross=bool(ronly[i]), resample=i < n - 1, **common)
        for i, t in enumerate(up_types))
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise TextinvError("This UNet sets norm_num_groups=None, which the JAX backend does not support.", _TORCH)
    size = cfg.get("sample_size")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        block_out_channels=channels, down=down, mid=mid, up=up, cross_attention_dim=int(xdims[0]),
        norm_num_groups=int(groups), norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
        time_embed_dim=int(cfg.get("time_embedding_dim") or channels[0] * 4),
        conv_in_kernel=int(cfg.get("conv_in_kernel", 3)), conv_out_kernel=int(cfg.get("conv_out_kernel", 3)),
        addition_embed_type=add,
        addition_time_embed_dim=None if add is None else int(cfg["addition_time_embed_dim"]),
        projection_class_embeddings_input_dim=None if add is None else int(cfg["projection_class_embeddings_input_dim"]),
        sample_size=size if isinstance(size, int) else None,
    )


def _strip(block_type: str) -> str:
    return block_type[7:] if block_type.startswith("UNetRes") else block_type  # as get_down_block does


def read_unet_config(folder: Path, component: str = "unet") -> UNetConfig:
    """The UNetConfig of `<folder>/<component>/config.json`."""
    return unet_config(read_config(folder, component))


# -- weights -------------------------------------------------------------------------------------

def expected_shapes(cfg: UNetConfig) -> dict[str, tuple]:
    """Every tensor name of the torch module with its shape, derived from the config alone."""
    s: dict[str, tuple] = {}
    ted, xdim = cfg.time_embed_dim, cfg.cross_attention_dim

    def conv(name, cout, cin, k=3):
        s.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def lin(name, cout, cin, bias=True):
        s[f"{name}.weight"] = (cout, cin)
        if bias:
            s[f"{name}.bias"] = (cout,)

    def norm(name, c):
        s.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def resnet(pre, cin, cout):
        norm(f"{pre}.norm1", cin)
        conv(f"{pre}.conv1", cout, cin)
        lin(f"{pre}.time_emb_proj", cout, ted)
        norm(f"{pre}.norm2", cout)
        conv(f"{pre}.conv2", cout, cout)
        if cin != cout:
            conv(f"{pre}.conv_shortcut", cout, cin, 1)

    def transformer(pre, c, spec: BlockSpec, depth: int):
        inner = spec.heads * (c // spec.heads)
        norm(f"{pre}.norm", c)
        for name, cout, cin in ((f"{pre}.proj_in", inner, c), (f"{pre}.proj_out", c, inner)):
            if spec.linear_proj:
                lin(name, cout, cin)
            else:
                conv(name, cout, cin, 1)
        for j in range(depth):
            b = f"{pre}.transformer_blocks.{j}"
            for k in (1, 2, 3):
                norm(f"{b}.norm{k}", inner)
            for attn, kv in (("attn1", xdim if spec.only_cross else inner), ("attn2", xdim)):
                lin(f"{b}.{attn}.to_q", inner, inner, bias=False)
                lin(f"{b}.{attn}.to_k", inner, kv, bias=False)
                lin(f"{b}.{attn}.to_v", inner, kv, bias=False)
                lin(f"{b}.{attn}.to_out.0", inner, inner)
            lin(f"{b}.ff.net.0.proj", 8 * inner, inner)
            lin(f"{b}.ff.net.2", inner, 4 * inner)

    ch = cfg.block_out_channels
    conv("conv_in", ch[0], cfg.in_channels, cfg.conv_in_kernel)
    lin("time_embedding.linear_1", ted, ch[0])
    lin("time_embedding.linear_2", ted, ted)
    if cfg.addition_embed_type == "text_time":
        lin("add_embedding.linear_1", ted, cfg.projection_class_embeddings_input_dim)
        lin("add_embedding.linear_2", ted, ted)
    cout = ch[0]
    for i, spec in enumerate(cfg.down):
        cin, cout = cout, ch[i]
        for j in range(spec.layers):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
            if spec.cross_attention:
                transformer(f"down_blocks.{i}.attentions.{j}", cout, spec, spec.transformer_layers[j])
        if spec.resample:
            conv(f"down_blocks.{i}.downsamplers.0.conv", cout, cout)
    if cfg.mid is not None:
        resnet("mid_block.resnets.0", ch[-1], ch[-1])
        transformer("mid_block.attentions.0", ch[-1], cfg.mid, cfg.mid.transformer_layers[0])
        resnet("mid_block.resnets.1", ch[-1], ch[-1])
    rch = ch[::-1]
    out = rch[0]
    for i, spec in enumerate(cfg.up):
        prev, out, skip_in = out, rch[i], rch[min(i + 1, len(ch) - 1)]
        for j in range(spec.layers):
            res_in = skip_in if j == spec.layers - 1 else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + res_in, out)
            if spec.cross_attention:
                transformer(f"up_blocks.{i}.attentions.{j}", out, spec, spec.transformer_layers[j])
        if spec.resample:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out, out)
    norm("conv_norm_out", ch[0])
    conv("conv_out", cfg.out_channels, ch[0], cfg.conv_out_kernel)
    return s


def load_unet(folder_or_state: Path | str | Mapping[str, np.ndarray], config: UNetConfig,
              component: str = "unet") -> UNet2DConditionModel:
    """The UNet from a diffusers folder (`<folder>/<component>`, safetensors, no torch) or a
    torch-named UNet2DConditionModel state dict, weights float32 numpy in host memory. Every
    tensor the config implies must be there with its shape, and nothing else (a mismatch is
    an error naming the keys)."""
    if isinstance(folder_or_state, Mapping):
        state = dict(folder_or_state)
    else:
        state = read_state(Path(folder_or_state), component)
    require_keys(state, expected_shapes(config), f"UNet ({component})")
    params = to_params({k: np.asarray(v, np.float32) for k, v in state.items()})
    return load_into(lambda: UNet2DConditionModel(config), params, f"UNet ({component})")


# -- forward --------------------------------------------------------------------------------------

def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, shift: float, max_period: float = 10000.0):
    """diffusers' get_timestep_embedding: [B] (int or float) -> [B, dim] float32 sinusoids,
    with torch's operation order, so the arguments of t ~ 999 round the same way."""
    half = dim // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / (half - shift)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1, silu, linear_2 (the time embedding, and SDXL's add_embedding)."""

    def __init__(self, in_channels: int, dim: int):
        self.linear_1, self.linear_2 = Linear(in_channels, dim), Linear(dim, dim)

    def __call__(self, x, dtype):
        return self.linear_2(nn.activation("silu")(self.linear_1(x, dtype)), dtype)


class UNet2DConditionModel(nnx.Module):
    """unet(sample, timesteps, encoder_hidden_states, *, added_cond, dtype, attention): the
    prediction (noise or v, as the model was trained) for NHWC `sample` [B, H, W, in_channels]
    at `timesteps` (scalar or [B]; int or float) conditioned on `encoder_hidden_states`
    [B, T, cross_attention_dim]. Returns float32 [B, H, W, out_channels].

    `dtype` is the compute dtype: weights are cast where used, norms and softmax stay
    float32. `attention`: None is plain XLA attention (float32 logits, [tokens x tokens]
    per head in memory); "cudnn" is fused flash attention on NVIDIA GPUs, for bf16/fp16
    compute and large latents (see nn.attention). SDXL (addition_embed_type "text_time")
    also needs added_cond={"text_embeds": [B, P], "time_ids": [B, 6]}. A side that does not
    divide by 2**(upsamplers) works as in diffusers: each upsampler resizes to its skip's size.
    """

    def __init__(self, cfg: UNetConfig):
        self.config = cfg
        ch, ted = cfg.block_out_channels, cfg.time_embed_dim
        w = Widths(temb=ted, context=cfg.cross_attention_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel)
        self.time_embedding = TimestepEmbedding(ch[0], ted)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, ted)
                              if cfg.addition_embed_type == "text_time" else None)
        down, cout = [], ch[0]
        for i, spec in enumerate(cfg.down):
            cin, cout = cout, ch[i]
            down.append((CrossAttnDownBlock2D if spec.cross_attention else DownBlock2D)(cin, cout, spec, w))
        self.down_blocks = nnx.List(down)
        self.mid_block = None if cfg.mid is None else UNetMidBlock2DCrossAttn(ch[-1], cfg.mid, w)
        up, rch = [], ch[::-1]
        out = rch[0]
        for i, spec in enumerate(cfg.up):
            prev, out, skip_in = out, rch[i], rch[min(i + 1, len(ch) - 1)]
            up.append((CrossAttnUpBlock2D if spec.cross_attention else UpBlock2D)(prev, out, skip_in, spec, w))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel)

    def __call__(self, sample, timesteps, encoder_hidden_states, *, added_cond: Mapping | None = None,
                 dtype=jnp.float32, attention: str | None = None):
        config = self.config
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        emb = self.time_embedding(t_emb, dtype)
        if self.add_embedding is not None:
            if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet (SDXL) needs added_cond={'text_embeds': ..., 'time_ids': ...}")
            ids = jnp.asarray(added_cond["time_ids"]).reshape(-1)
            ids_emb = timestep_embedding(ids, config.addition_time_embed_dim, config.flip_sin_to_cos,
                                         config.freq_shift)
            add = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32), ids_emb.reshape(b, -1)],
                                  axis=-1)
            emb = emb + self.add_embedding(add, dtype)
        context = jnp.asarray(encoder_hidden_states).astype(dtype)

        x = self.conv_in(jnp.asarray(sample).astype(dtype), dtype)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, context, dtype, attention)
            skips += res
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, dtype, attention)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if len(block.upsamplers) else None
            x = block(x, res, emb, context, dtype, upsample_size=size, impl=attention)
        x = nn.activation("silu")(self.conv_norm_out(x, dtype))
        return self.conv_out(x, dtype).astype(jnp.float32)
