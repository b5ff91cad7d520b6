"""The UNet's blocks as flax.nnx modules (diffusers' UNet2DConditionModel parts, same names).

Activations are NHWC; weights stay float32 and are cast to the compute dtype where used;
norms and softmax run in float32 (nn.py).

Structure follows diffusers 0.42: transformers/transformer_2d.py (Transformer2DModel on
continuous input), attention.py (BasicTransformerBlock, FeedForward), activations.py
(GEGLU), attention_processor.py (Attention + AttnProcessor2_0) and unets/unet_2d_blocks.py
(CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D).
Only what the SD 1.x / 2.x / SDXL UNets use is here; unet.py refuses configs needing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from . import nn
from .layers import Conv2d, Downsample2D, Dropout, GroupNorm, LayerNorm, Linear, ResnetBlock2D, Upsample2D

__all__ = ["BasicTransformerBlock", "BlockSpec", "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "DownBlock2D",
           "Transformer2DModel", "UNetMidBlock2DCrossAttn", "UpBlock2D"]


@dataclass(frozen=True)
class BlockSpec:
    """The static shape of one down / mid / up block, derived from the UNet config."""

    cross_attention: bool                # a Transformer2DModel after each resnet
    layers: int                          # resnets in the block
    transformer_layers: tuple[int, ...]  # BasicTransformerBlocks in each layer's Transformer2DModel
    heads: int                           # attention heads (diffusers' legacy "attention_head_dim")
    only_cross: bool                     # attn1 attends to the text too (only_cross_attention)
    resample: bool                       # a downsampler / upsampler at the end
    linear_proj: bool                    # proj_in/out are Linear (SD 2.x, XL), not 1x1 Conv (SD 1.x)
    output_scale_factor: float = 1.0


@dataclass(frozen=True)
class Widths:
    """What every block of one UNet shares: time embedding width, text width, norm groups/eps."""

    temb: int
    context: int
    groups: int
    eps: float


# -- Transformer2DModel -----------------------------------------------------------------------

class Attention(nnx.Module):
    """Attention (AttnProcessor2_0): to_q/k/v without bias, scaled dot product with scale
    1/sqrt(head_dim), to_out.0 with bias. nn.attention's default keeps logits and softmax in
    float32, which is also what diffusers' `upcast_attention` (SD 2.1 in fp16) asks for;
    impl "cudnn" is fused flash attention on GPU (bf16/fp16 compute only)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nnx.List([Linear(dim, dim), Dropout()])
        self.heads = heads

    def __call__(self, x, context, dtype, impl=None):
        q, k, v = self.to_q(x, dtype), self.to_k(context, dtype), self.to_v(context, dtype)
        return self.to_out[0](nn.attention(q, k, v, self.heads, implementation=impl), dtype)


class GEGLU(nnx.Module):
    """proj to 2*inner, value * gelu(gate) with exact (erf) gelu as torch's F.gelu."""

    def __init__(self, dim: int, inner: int):
        self.proj = Linear(dim, 2 * inner)

    def __call__(self, x, dtype):
        h, gate = jnp.split(self.proj(x, dtype), 2, axis=-1)
        return h * nn.activation("gelu")(gate)


class FeedForward(nnx.Module):
    """FeedForward(activation_fn="geglu"): net = [GEGLU, Dropout, Linear] as in torch."""

    def __init__(self, dim: int):
        self.net = nnx.List([GEGLU(dim, 4 * dim), Dropout(), Linear(4 * dim, dim)])

    def __call__(self, x, dtype):
        return self.net[2](self.net[0](x, dtype), dtype)


class BasicTransformerBlock(nnx.Module):
    """norm_type "layer_norm" (eps 1e-5), pre-norm residuals: self-attention (on the text
    instead when only_cross_attention), cross-attention, feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, only_cross: bool):
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, context_dim if only_cross else dim, heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.only_cross = only_cross

    def __call__(self, x, context, dtype, impl=None):
        # A fused kernel pays off on self-attention over the latent pixels (4096 tokens at 512 px);
        # cross-attention has 77 keys (which cuDNN's kernel refuses) and small logits anyway.
        h = self.norm1(x, dtype)
        x = x + self.attn1(h, context if self.only_cross else h, dtype, None if self.only_cross else impl)
        x = x + self.attn2(self.norm2(x, dtype), context, dtype, None)
        return x + self.ff(self.norm3(x, dtype), dtype)


class Transformer2DModel(nnx.Module):
    """On an NHWC map: group norm (eps 1e-6, fixed in diffusers), proj_in, `depth`
    transformer blocks over the H*W tokens, proj_out, plus the input. A 1x1 conv (SD 1.x)
    and a Linear (SD 2.x/XL) are the same map on NHWC; each keeps its own stored layout."""

    def __init__(self, channels: int, spec: BlockSpec, depth: int, w: Widths):
        inner = spec.heads * (channels // spec.heads)
        self.norm = GroupNorm(w.groups, channels, 1e-6)
        if spec.linear_proj:
            self.proj_in, self.proj_out = Linear(channels, inner), Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = Conv2d(channels, inner, 1, padding=0), Conv2d(inner, channels, 1, padding=0)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(inner, w.context, spec.heads, spec.only_cross)
                                            for _ in range(depth)])

    def __call__(self, x, context, dtype, impl=None):
        b, hh, ww, _ = x.shape
        h = self.proj_in(self.norm(x, dtype), dtype)
        h = h.reshape(b, hh * ww, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context, dtype, impl)
        h = self.proj_out(h.reshape(b, hh, ww, h.shape[-1]), dtype)
        return h + x.astype(h.dtype)


# -- blocks -----------------------------------------------------------------------------------

class _Layers(nnx.Module):
    """resnets[j], each followed (in cross-attention blocks) by attentions[j]."""

    def _build(self, ins: list[int], cout: int, spec: BlockSpec, w: Widths):
        self.resnets = nnx.List([ResnetBlock2D(cin, cout, w.temb, groups=w.groups, eps=w.eps,
                                               output_scale_factor=spec.output_scale_factor) for cin in ins])
        self.attentions = nnx.List([Transformer2DModel(cout, spec, spec.transformer_layers[j], w)
                                    for j in range(len(ins))] if spec.cross_attention else [])

    def _layer(self, j: int, x, temb, context, dtype, impl):
        x = self.resnets[j](x, temb, dtype)
        if len(self.attentions):
            x = self.attentions[j](x, context, dtype, impl)
        return x


class DownBlock2D(_Layers):
    """Returns (output, skips): every layer's output and, when it downsamples (3x3 conv,
    stride 2, padding 1), the downsampled map, as diffusers' `output_states`."""

    def __init__(self, cin: int, cout: int, spec: BlockSpec, w: Widths):
        self._build([cin] + [cout] * (spec.layers - 1), cout, spec, w)
        self.downsamplers = nnx.List([Downsample2D(cout, padding=1)] if spec.resample else [])

    def __call__(self, x, temb, context, dtype, impl=None):
        skips = []
        for j in range(len(self.resnets)):
            x = self._layer(j, x, temb, context, dtype, impl)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x, dtype)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, transformer, resnet."""

    def __init__(self, channels: int, spec: BlockSpec, w: Widths):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, w.temb, groups=w.groups, eps=w.eps,
                                               output_scale_factor=spec.output_scale_factor) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(channels, spec, spec.transformer_layers[0], w)])

    def __call__(self, x, temb, context, dtype, impl=None):
        x = self.resnets[0](x, temb, dtype)
        x = self.attentions[0](x, context, dtype, impl)
        return self.resnets[1](x, temb, dtype)


class UpBlock2D(_Layers):
    """Each layer concatenates the newest remaining skip on the channel axis before its
    resnet; then nearest-neighbour up to `upsample_size` (the next skip's size: 2x, or what
    an odd size needs) and a 3x3 conv."""

    def __init__(self, prev: int, cout: int, skip_in: int, spec: BlockSpec, w: Widths):
        n = spec.layers
        ins = [(prev if j == 0 else cout) + (skip_in if j == n - 1 else cout) for j in range(n)]
        self._build(ins, cout, spec, w)
        self.upsamplers = nnx.List([Upsample2D(cout)] if spec.resample else [])

    def __call__(self, x, skips, temb, context, dtype, *, upsample_size=None, impl=None):
        skips = list(skips)
        for j in range(len(self.resnets)):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self._layer(j, x, temb, context, dtype, impl)
        for up in self.upsamplers:
            h, w = x.shape[1:3]
            size = None if tuple(upsample_size) == (2 * h, 2 * w) else tuple(upsample_size)
            x = up(x, output_size=size, dtype=dtype)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""
