"""diffusers' AutoencoderKL in JAX: the encoder (training caches latents) and the decoder
(sampling turns latents into pictures).

    config = read_vae_config(folder)
    params = load_vae(folder, config)
    mean, std = apply_vae_encoder(params, config, images)   # images NHWC in [-1, 1]
    latents = (mean + std * noise - shift) * config.scaling_factor   # what the UNet sees
    images = apply_vae_decoder(params, config, latents / config.scaling_factor + shift)

Like diffusers, the apply functions work on raw (unscaled) latents; scaling by
`scaling_factor` (and `shift_factor` where a config has one) is the caller's step, as it
is the pipeline's in diffusers. Structure and names follow diffusers/models/autoencoders
(vae.py Encoder/Decoder, autoencoder_kl.py), unet_2d_blocks.py (DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D) and attention_processor.py (the mid block's attention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from textinv_cli.errors import TextinvError

from . import nn
from .weights import read_config, read_state, require_keys, to_params

__all__ = ["VaeConfig", "apply_vae_decoder", "apply_vae_encoder", "load_vae", "read_vae_config", "vae_config"]

EPS = 1e-6  # diffusers hard-codes resnet_eps=1e-6 throughout the VAE


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """What the VAE functions need from an AutoencoderKL config. Frozen, hashable (static arg)."""

    block_out_channels: tuple[int, ...] = (64,)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config(config: Mapping) -> VaeConfig:
    """A VaeConfig from an AutoencoderKL config.json dict; refuses block types we do not port."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise TextinvError(f"The JAX backend ports AutoencoderKL, not {cls}.", "Use --backend torch for this model.")
    blocks = tuple(int(c) for c in config.get("block_out_channels", (64,)))
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = set(config.get(key, [allowed]))
        if kinds != {allowed}:
            raise TextinvError(f"VAE {key} {sorted(kinds)} are not supported by the JAX backend (only {allowed}).",
                               "Use --backend torch for this model.")
        if len(config.get(key, blocks)) != len(blocks):
            raise TextinvError(f"VAE config: {key} and block_out_channels differ in length.")
    shift = config.get("shift_factor")
    cfg = VaeConfig(
        block_out_channels=blocks, in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)), latent_channels=int(config.get("latent_channels", 4)),
        layers_per_block=int(config.get("layers_per_block", 1)), norm_num_groups=int(config.get("norm_num_groups", 32)),
        act_fn=str(config.get("act_fn", "silu")), scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=None if shift is None else float(shift),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
    )
    nn.activation(cfg.act_fn)
    return cfg


def read_vae_config(folder: Path, component: str = "vae") -> VaeConfig:
    """The VaeConfig of `<folder>/<component>/config.json`."""
    return vae_config(read_config(folder, component))


# -- weights -------------------------------------------------------------------------------

def _resnet_shapes(pre: str, cin: int, cout: int) -> dict[str, tuple]:
    s = {f"{pre}norm1.weight": (cin,), f"{pre}norm1.bias": (cin,), f"{pre}conv1.weight": (cout, cin, 3, 3),
         f"{pre}conv1.bias": (cout,), f"{pre}norm2.weight": (cout,), f"{pre}norm2.bias": (cout,),
         f"{pre}conv2.weight": (cout, cout, 3, 3), f"{pre}conv2.bias": (cout,)}
    if cin != cout:
        s[f"{pre}conv_shortcut.weight"] = (cout, cin, 1, 1)
        s[f"{pre}conv_shortcut.bias"] = (cout,)
    return s


def _mid_shapes(pre: str, c: int, attention: bool) -> dict[str, tuple]:
    s = {**_resnet_shapes(f"{pre}resnets.0.", c, c), **_resnet_shapes(f"{pre}resnets.1.", c, c)}
    if attention:
        a = f"{pre}attentions.0."
        s.update({f"{a}group_norm.weight": (c,), f"{a}group_norm.bias": (c,)})
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            s.update({f"{a}{proj}.weight": (c, c), f"{a}{proj}.bias": (c,)})
    return s


def expected_shapes(cfg: VaeConfig) -> dict[str, tuple]:
    ch, n, lat = cfg.block_out_channels, len(cfg.block_out_channels), cfg.latent_channels
    s: dict[str, tuple] = {}

    def conv(name, cout, cin, k=3):
        s.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def norm(name, c):
        s.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    conv("encoder.conv_in", ch[0], cfg.in_channels)
    cin = ch[0]
    for i, cout in enumerate(ch):
        for j in range(cfg.layers_per_block):
            s.update(_resnet_shapes(f"encoder.down_blocks.{i}.resnets.{j}.", cin if j == 0 else cout, cout))
        if i < n - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout)
        cin = cout
    s.update(_mid_shapes("encoder.mid_block.", ch[-1], cfg.mid_block_add_attention))
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", 2 * lat, ch[-1])

    conv("decoder.conv_in", ch[-1], lat)
    s.update(_mid_shapes("decoder.mid_block.", ch[-1], cfg.mid_block_add_attention))
    rev = ch[::-1]
    cin = rev[0]
    for i, cout in enumerate(rev):
        for j in range(cfg.layers_per_block + 1):
            s.update(_resnet_shapes(f"decoder.up_blocks.{i}.resnets.{j}.", cin if j == 0 else cout, cout))
        if i < n - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout)
        cin = cout
    norm("decoder.conv_norm_out", ch[0])
    conv("decoder.conv_out", cfg.out_channels, ch[0])
    if cfg.use_quant_conv:
        conv("quant_conv", 2 * lat, 2 * lat, 1)
    if cfg.use_post_quant_conv:
        conv("post_quant_conv", lat, lat, 1)
    return s


# Checkpoints converted from the original LDM code name the mid-block attention
# query/key/value/proj_attn (sometimes as 1x1 convs); diffusers renames them on load too.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-3] == "0" and parts[-4] == "attentions" and parts[-2] in _LEGACY_ATTENTION:
            name = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
            if value.ndim == 4:
                value = value[:, :, 0, 0]
        out[name] = value
    return out


def load_vae(folder_or_state: Path | str | Mapping[str, np.ndarray], config: VaeConfig, component: str = "vae") -> dict:
    """Params for the VAE functions from a diffusers folder (`<folder>/<component>`) or a
    torch-named AutoencoderKL state dict.

    Returns nested float32 numpy arrays named as the torch module: encoder.{conv_in,
    down_blocks.<i>.{resnets.<j>, downsamplers.0.conv}, mid_block.{resnets.<j>,
    attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}}, conv_norm_out, conv_out},
    decoder.{conv_in, mid_block, up_blocks.<i>.{resnets.<j>, upsamplers.0.conv},
    conv_norm_out, conv_out}, quant_conv, post_quant_conv. The encoder needs only
    "encoder" and "quant_conv", the decoder only "decoder" and "post_quant_conv": drop the
    other half to save device memory.
    """
    if isinstance(folder_or_state, Mapping):
        state = dict(folder_or_state)
    else:
        state = read_state(Path(folder_or_state), component)
    state = _modern_names(state)
    require_keys(state, expected_shapes(config), f"VAE ({component})")
    return to_params({k: np.asarray(v, np.float32) for k, v in state.items()})


# -- forward -------------------------------------------------------------------------------

def _resnet(p, cfg, x, dt):
    return nn.resnet_block(p, x, groups=cfg.norm_num_groups, eps=EPS, act=cfg.act_fn, dtype=dt)


def _mid_attention(p: dict, cfg: VaeConfig, x: jax.Array, dt) -> jax.Array:
    """One-head self-attention over all H*W positions, with a residual: diffusers'
    Attention(..., heads=1, dim_head=C, residual_connection=True, upcast_softmax=True)."""
    b, h, w, c = x.shape
    y = nn.group_norm(p["group_norm"], x, cfg.norm_num_groups, EPS, dt).reshape(b, h * w, c)
    q, k, v = (nn.linear(p[name], y, dt) for name in ("to_q", "to_k", "to_v"))
    y = nn.linear(p["to_out"]["0"], nn.attention(q, k, v, 1), dt)
    return x + y.reshape(b, h, w, c)


def _mid_block(p: dict, cfg: VaeConfig, x: jax.Array, dt) -> jax.Array:
    x = _resnet(p["resnets"]["0"], cfg, x, dt)
    if cfg.mid_block_add_attention:
        x = _mid_attention(p["attentions"]["0"], cfg, x, dt)
    return _resnet(p["resnets"]["1"], cfg, x, dt)


def _tail(p: dict, cfg: VaeConfig, x: jax.Array, dt) -> jax.Array:
    x = nn.group_norm(p["conv_norm_out"], x, cfg.norm_num_groups, EPS, dt)
    return nn.conv2d(p["conv_out"], nn.activation(cfg.act_fn)(x), dtype=dt)


def apply_vae_encoder(params: dict, config: VaeConfig, images: jax.Array, *,
                      dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The latent distribution of `images` [B, H, W, in_channels] (NHWC, values in [-1, 1];
    H and W divisible by config.downscale): (mean, std), each float32
    [B, H/8, W/8, latent_channels], unscaled. As diffusers' DiagonalGaussianDistribution:
    logvar is clipped to [-30, 20] and std = exp(logvar / 2).
    Jit with `config` static, e.g. jax.jit(apply_vae_encoder, static_argnums=1).
    """
    cfg, dt = config, jnp.dtype(dtype)
    p = params["encoder"]
    x = nn.conv2d(p["conv_in"], jnp.asarray(images).astype(dt), dtype=dt)
    for i in range(len(cfg.block_out_channels)):
        block = p["down_blocks"][str(i)]
        for j in range(cfg.layers_per_block):
            x = _resnet(block["resnets"][str(j)], cfg, x, dt)
        if i < len(cfg.block_out_channels) - 1:
            # diffusers builds these with padding=0 and pads only bottom/right by one.
            x = nn.downsample2d(block["downsamplers"]["0"], x, padding=0, dtype=dt)
    x = _tail(p, cfg, _mid_block(p["mid_block"], cfg, x, dt), dt)
    if cfg.use_quant_conv:
        x = nn.conv2d(params["quant_conv"], x, dtype=dt)
    # The distribution's parameters are taken in float32 even in a bf16 run: exp() of a
    # bf16 logvar would cost the latents' std most of its precision.
    mean, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))


def apply_vae_decoder(params: dict, config: VaeConfig, latents: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """Images [B, H*8, W*8, out_channels] (NHWC, float32, nominally [-1, 1], not clipped)
    from unscaled latents [B, H, W, latent_channels], as AutoencoderKL.decode.
    Jit with `config` static, e.g. jax.jit(apply_vae_decoder, static_argnums=1).
    """
    cfg, dt = config, jnp.dtype(dtype)
    z = jnp.asarray(latents).astype(dt)
    if cfg.use_post_quant_conv:
        z = nn.conv2d(params["post_quant_conv"], z, dtype=dt)
    p = params["decoder"]
    x = _mid_block(p["mid_block"], cfg, nn.conv2d(p["conv_in"], z, dtype=dt), dt)
    for i in range(len(cfg.block_out_channels)):
        block = p["up_blocks"][str(i)]
        for j in range(cfg.layers_per_block + 1):
            x = _resnet(block["resnets"][str(j)], cfg, x, dt)
        if i < len(cfg.block_out_channels) - 1:
            x = nn.upsample2d(block["upsamplers"]["0"], x, dtype=dt)
    return _tail(p, cfg, x, dt).astype(jnp.float32)
