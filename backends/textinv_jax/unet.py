"""diffusers' UNet2DConditionModel in JAX: config, weight import and a pure forward function.

    config = read_unet_config(folder)              # or unet_config(config_dict)
    params = load_unet(folder, config)             # or load_unet(state_dict, config)
    pred = apply_unet(params, config, latents_nhwc, timesteps, text_states, dtype=jnp.bfloat16)

`params` is a nested dict of float32 arrays named as the torch module
(`params["down_blocks"]["0"]["resnets"]["1"]["conv1"]["kernel"]`, HWIO convs, [in, out]
linears, norm `scale`s; see weights.to_params). `config` is a frozen dataclass, hashable,
so it is a static argument of jax.jit. Activations are NHWC.

Covers SD 1.x (1x1-conv projections, one head count), SD 2.x (linear projections, a head
count per block, upcast_attention) and the SDXL UNet (text_time added embedding, deeper
transformers per block). Config options that change the network in other ways are refused
by name rather than silently ignored. Structure: diffusers/models/unets/unet_2d_condition.py
and embeddings.py (Timesteps, TimestepEmbedding); blocks in unet_blocks.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from textinv_cli.errors import TextinvError

from . import nn
from .unet_blocks import BlockSpec, down_block, mid_block, up_block
from .weights import read_config, read_state, require_keys, to_params

__all__ = ["BlockSpec", "UNetConfig", "apply_unet", "load_unet", "read_unet_config", "timestep_embedding",
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
    """What apply_unet needs from a UNet2DConditionModel config, normalised per block."""

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
              component: str = "unet") -> dict:
    """Params for apply_unet from a diffusers folder (`<folder>/<component>`, safetensors, no
    torch) or a torch-named UNet2DConditionModel state dict. Every tensor the config implies
    must be there with its shape, and nothing else (a mismatch is an error naming the keys)."""
    if isinstance(folder_or_state, Mapping):
        state = dict(folder_or_state)
    else:
        state = read_state(Path(folder_or_state), component)
    require_keys(state, expected_shapes(config), f"UNet ({component})")
    return to_params({k: np.asarray(v, np.float32) for k, v in state.items()})


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


def _mlp(p, x, dtype):
    """TimestepEmbedding: linear_1, silu, linear_2."""
    return nn.linear(p["linear_2"], nn.activation("silu")(nn.linear(p["linear_1"], x, dtype)), dtype)


def apply_unet(params, config: UNetConfig, sample, timesteps, encoder_hidden_states, *,
               added_cond: Mapping | None = None, dtype=jnp.float32, attention: str | None = None):
    """The UNet's prediction (noise or v, as the model was trained) for NHWC `sample`
    [B, H, W, in_channels] at `timesteps` (scalar or [B]; int or float) conditioned on
    `encoder_hidden_states` [B, T, cross_attention_dim]. Returns float32 [B, H, W, out_channels].

    `dtype` is the compute dtype: params are cast where used, norms and softmax stay
    float32. `attention`: None is plain XLA attention (float32 logits, [tokens x tokens]
    per head in memory); "cudnn" is fused flash attention on NVIDIA GPUs, for bf16/fp16
    compute and large latents (see nn.attention). SDXL (addition_embed_type "text_time") also needs
    added_cond={"text_embeds": [B, P], "time_ids": [B, 6]}. A side that does not divide by
    2**(upsamplers) works as in diffusers: each upsampler resizes to its skip's size.
    """
    b = sample.shape[0]
    groups, eps = config.norm_num_groups, config.norm_eps
    t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    t_emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
    emb = _mlp(params["time_embedding"], t_emb, dtype)
    if config.addition_embed_type == "text_time":
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("this UNet (SDXL) needs added_cond={'text_embeds': ..., 'time_ids': ...}")
        ids = jnp.asarray(added_cond["time_ids"]).reshape(-1)
        ids_emb = timestep_embedding(ids, config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
        add = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32), ids_emb.reshape(b, -1)], axis=-1)
        emb = emb + _mlp(params["add_embedding"], add, dtype)
    context = jnp.asarray(encoder_hidden_states).astype(dtype)

    x = nn.conv2d(params["conv_in"], jnp.asarray(sample).astype(dtype), dtype=dtype)
    skips = [x]
    for i, spec in enumerate(config.down):
        x, res = down_block(params["down_blocks"][str(i)], x, emb, context, spec, groups=groups, eps=eps, dtype=dtype,
                            impl=attention)
        skips += res
    if config.mid is not None:
        x = mid_block(params["mid_block"], x, emb, context, config.mid, groups=groups, eps=eps, dtype=dtype,
                      impl=attention)
    for i, spec in enumerate(config.up):
        res, skips = skips[-spec.layers:], skips[:-spec.layers]
        size = tuple(skips[-1].shape[1:3]) if spec.resample else None
        x = up_block(params["up_blocks"][str(i)], x, res, emb, context, spec, upsample_size=size,
                     groups=groups, eps=eps, dtype=dtype, impl=attention)
    x = nn.activation("silu")(nn.group_norm(params["conv_norm_out"], x, groups, eps, dtype))
    return nn.conv2d(params["conv_out"], x, dtype=dtype).astype(jnp.float32)
