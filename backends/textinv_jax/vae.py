"""diffusers' AutoencoderKL as flax.nnx modules: the encoder (training caches latents) and
the decoder (sampling turns latents into pictures).

    config = read_vae_config(folder)
    vae = load_vae(folder, config)                     # weights in host memory (numpy)
    mean, std = vae.encode(images)                     # images NHWC in [-1, 1]
    latents = (mean + std * noise - shift) * config.scaling_factor   # what the UNet sees
    images = vae.decode(latents / config.scaling_factor + shift)

Like diffusers, encode/decode work on raw (unscaled) latents; scaling by `scaling_factor`
(and `shift_factor` where a config has one) is the caller's step, as it is the pipeline's in
diffusers. Module tree and names follow diffusers/models/autoencoders (vae.py Encoder/Decoder,
autoencoder_kl.py), unet_2d_blocks.py (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D)
and attention_processor.py (the mid block's attention). encode uses only `encoder` and
`quant_conv`, decode only `decoder` and `post_quant_conv`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from textinv_cli.errors import TextinvError

from . import nn
from .layers import Conv2d, Downsample2D, GroupNorm, Linear, ResnetBlock2D, Upsample2D
from .weights import load_into, read_config, read_state, require_keys, to_params

__all__ = ["AutoencoderKL", "VaeConfig", "load_vae", "read_vae_config", "vae_config"]

EPS = 1e-6  # diffusers hard-codes resnet_eps=1e-6 throughout the VAE


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """What AutoencoderKL needs from its config. Frozen and hashable."""

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


def load_vae(folder_or_state: Path | str | Mapping[str, np.ndarray], config: VaeConfig,
             component: str = "vae") -> AutoencoderKL:
    """The AutoencoderKL from a diffusers folder (`<folder>/<component>`) or a torch-named
    state dict (legacy LDM attention names accepted); weights float32 numpy, host memory."""
    if isinstance(folder_or_state, Mapping):
        state = dict(folder_or_state)
    else:
        state = read_state(Path(folder_or_state), component)
    state = _modern_names(state)
    require_keys(state, expected_shapes(config), f"VAE ({component})")
    params = to_params({k: np.asarray(v, np.float32) for k, v in state.items()})
    return load_into(lambda: AutoencoderKL(config), params, f"VAE ({component})")


# -- the modules -----------------------------------------------------------------------------

def _resnet(cfg: VaeConfig, cin: int, cout: int) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, groups=cfg.norm_num_groups, eps=EPS, act=cfg.act_fn)


class Attention(nnx.Module):
    """The mid block's one-head self-attention over all H*W positions, with a residual:
    diffusers' Attention(..., heads=1, dim_head=C, residual_connection=True, upcast_softmax=True)."""

    def __init__(self, cfg: VaeConfig, channels: int):
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, EPS)
        self.to_q, self.to_k, self.to_v = (Linear(channels, channels) for _ in range(3))
        self.to_out = nnx.List([Linear(channels, channels)])  # to_out.1 is torch's dropout

    def __call__(self, x: jax.Array, dt) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x, dt).reshape(b, h * w, c)
        y = self.to_out[0](nn.attention(self.to_q(y, dt), self.to_k(y, dt), self.to_v(y, dt), 1), dt)
        return x + y.reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
    """resnet, attention (mid_block_add_attention), resnet."""

    def __init__(self, cfg: VaeConfig, channels: int):
        self.resnets = nnx.List([_resnet(cfg, channels, channels), _resnet(cfg, channels, channels)])
        self.attentions = nnx.List([Attention(cfg, channels)] if cfg.mid_block_add_attention else [])

    def __call__(self, x: jax.Array, dt) -> jax.Array:
        x = self.resnets[0](x, dtype=dt)
        for attention in self.attentions:
            x = attention(x, dt)
        return self.resnets[1](x, dtype=dt)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cfg: VaeConfig, cin: int, cout: int, downsample: bool):
        self.resnets = nnx.List([_resnet(cfg, cin if j == 0 else cout, cout) for j in range(cfg.layers_per_block)])
        # diffusers builds these with padding=0 and pads only bottom/right by one.
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0)] if downsample else [])

    def __call__(self, x: jax.Array, dt) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, dtype=dt)
        for down in self.downsamplers:
            x = down(x, dt)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cfg: VaeConfig, cin: int, cout: int, upsample: bool):
        self.resnets = nnx.List([_resnet(cfg, cin if j == 0 else cout, cout)
                                 for j in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample2D(cout)] if upsample else [])

    def __call__(self, x: jax.Array, dt) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, dtype=dt)
        for up in self.upsamplers:
            x = up(x, dtype=dt)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VaeConfig):
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, ch[0])
        self.down_blocks = nnx.List([DownEncoderBlock2D(cfg, ch[max(i - 1, 0)], ch[i], i < n - 1) for i in range(n)])
        self.mid_block = UNetMidBlock2D(cfg, ch[-1])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels)
        self.act = cfg.act_fn

    def __call__(self, x: jax.Array, dt) -> jax.Array:
        x = self.conv_in(x.astype(dt), dt)
        for block in self.down_blocks:
            x = block(x, dt)
        x = self.conv_norm_out(self.mid_block(x, dt), dt)
        return self.conv_out(nn.activation(self.act)(x), dt)


class Decoder(nnx.Module):
    def __init__(self, cfg: VaeConfig):
        rev, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, rev[0])
        self.mid_block = UNetMidBlock2D(cfg, rev[0])
        self.up_blocks = nnx.List([UpDecoderBlock2D(cfg, rev[max(i - 1, 0)], rev[i], i < n - 1) for i in range(n)])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], EPS)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels)
        self.act = cfg.act_fn

    def __call__(self, z: jax.Array, dt) -> jax.Array:
        x = self.mid_block(self.conv_in(z, dt), dt)
        for block in self.up_blocks:
            x = block(x, dt)
        x = self.conv_norm_out(x, dt)
        return self.conv_out(nn.activation(self.act)(x), dt)


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VaeConfig):
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        lat = cfg.latent_channels
        self.quant_conv = Conv2d(2 * lat, 2 * lat, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(lat, lat, 1) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """The latent distribution of `images` [B, H, W, in_channels] (NHWC, values in [-1, 1];
        H and W divisible by config.downscale): (mean, std), each float32
        [B, H/8, W/8, latent_channels], unscaled. As diffusers' DiagonalGaussianDistribution:
        logvar is clipped to [-30, 20] and std = exp(logvar / 2)."""
        dt = jnp.dtype(dtype)
        x = self.encoder(jnp.asarray(images), dt)
        if self.quant_conv is not None:
            x = self.quant_conv(x, dt)
        # The distribution's parameters are taken in float32 even in a bf16 run: exp() of a
        # bf16 logvar would cost the latents' std most of its precision.
        mean, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Images [B, H*8, W*8, out_channels] (NHWC, float32, nominally [-1, 1], not clipped)
        from unscaled latents [B, H, W, latent_channels], as AutoencoderKL.decode."""
        dt = jnp.dtype(dtype)
        z = jnp.asarray(latents).astype(dt)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z, dt)
        return self.decoder(z, dt).astype(jnp.float32)
