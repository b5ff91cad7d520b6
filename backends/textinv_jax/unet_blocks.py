"""The UNet's blocks as pure functions of params (diffusers' UNet2DConditionModel parts).

Each function takes the params subtree of one torch module (as `weights.to_params` builds
it: torch names, list indices as string keys), NHWC activations and the compute dtype.
Params stay float32 and are cast where used; norms and softmax run in float32 (nn.py).

Structure follows diffusers 0.42: transformers/transformer_2d.py (Transformer2DModel on
continuous input), attention.py (BasicTransformerBlock, FeedForward), activations.py
(GEGLU), attention_processor.py (Attention + AttnProcessor2_0) and unets/unet_2d_blocks.py
(CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D).
Only what the SD 1.x / 2.x / SDXL UNets use is here; unet.py refuses configs needing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from . import nn

__all__ = ["BlockSpec", "down_block", "mid_block", "transformer_2d", "up_block"]


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


# -- Transformer2DModel -----------------------------------------------------------------------

def _attention(p, x, context, heads: int, dtype, impl):
    """Attention (AttnProcessor2_0): to_q/k/v without bias, scaled dot product with scale
    1/sqrt(head_dim), to_out.0 with bias. nn.attention's default keeps logits and softmax in
    float32, which is also what diffusers' `upcast_attention` (SD 2.1 in fp16) asks for;
    impl "cudnn" is fused flash attention on GPU (bf16/fp16 compute only)."""
    q = nn.linear(p["to_q"], x, dtype)
    k = nn.linear(p["to_k"], context, dtype)
    v = nn.linear(p["to_v"], context, dtype)
    return nn.linear(p["to_out"]["0"], nn.attention(q, k, v, heads, implementation=impl), dtype)


def _geglu_feed_forward(p, x, dtype):
    """FeedForward(activation_fn="geglu"): proj to 2*inner, value * gelu(gate) with exact
    (erf) gelu as torch's F.gelu, then back to the width."""
    h, gate = jnp.split(nn.linear(p["net"]["0"]["proj"], x, dtype), 2, axis=-1)
    return nn.linear(p["net"]["2"], h * nn.activation("gelu")(gate), dtype)


def _basic_transformer_block(p, x, context, heads: int, only_cross: bool, dtype, impl):
    """BasicTransformerBlock (norm_type "layer_norm", eps 1e-5), pre-norm residuals:
    self-attention (on the text instead when only_cross_attention), cross-attention, FF."""
    # A fused kernel pays off on self-attention over the latent pixels (4096 tokens at 512 px);
    # cross-attention has 77 keys (which cuDNN's kernel refuses) and small logits anyway.
    h = nn.layer_norm(p["norm1"], x, 1e-5, dtype)
    x = x + _attention(p["attn1"], h, context if only_cross else h, heads, dtype, None if only_cross else impl)
    h = nn.layer_norm(p["norm2"], x, 1e-5, dtype)
    x = x + _attention(p["attn2"], h, context, heads, dtype, None)
    h = nn.layer_norm(p["norm3"], x, 1e-5, dtype)
    return x + _geglu_feed_forward(p["ff"], h, dtype)


def _pointwise(p, x, linear_proj: bool, dtype):
    # A 1x1 conv (SD 1.x) and a Linear (SD 2.x/XL) are the same map on NHWC; only the
    # stored layout differs, so each keeps its own op and imports without reshaping.
    return nn.linear(p, x, dtype) if linear_proj else nn.conv2d(p, x, padding=0, dtype=dtype)


def transformer_2d(p, x, context, depth: int, spec: BlockSpec, groups: int, dtype, impl=None):
    """Transformer2DModel on an NHWC map: group norm (eps 1e-6, fixed in diffusers),
    proj_in, `depth` transformer blocks over the H*W tokens, proj_out, plus the input."""
    b, hh, ww, _ = x.shape
    h = nn.group_norm(p["norm"], x, groups, 1e-6, dtype)
    h = _pointwise(p["proj_in"], h, spec.linear_proj, dtype)
    h = h.reshape(b, hh * ww, h.shape[-1])
    for j in range(depth):
        h = _basic_transformer_block(p["transformer_blocks"][str(j)], h, context, spec.heads, spec.only_cross, dtype,
                                     impl)
    h = _pointwise(p["proj_out"], h.reshape(b, hh, ww, h.shape[-1]), spec.linear_proj, dtype)
    return h + x.astype(h.dtype)


# -- blocks -----------------------------------------------------------------------------------

def _resnet(p, x, temb, spec: BlockSpec, groups: int, eps: float, dtype):
    return nn.resnet_block(p, x, temb, groups=groups, eps=eps, output_scale_factor=spec.output_scale_factor,
                           dtype=dtype)


def _layer(p, j: int, x, temb, context, spec: BlockSpec, groups: int, eps: float, dtype, impl):
    """One resnet, then (in cross-attention blocks) its Transformer2DModel."""
    x = _resnet(p["resnets"][str(j)], x, temb, spec, groups, eps, dtype)
    if spec.cross_attention:
        x = transformer_2d(p["attentions"][str(j)], x, context, spec.transformer_layers[j], spec, groups, dtype,
                           impl)
    return x


def down_block(p, x, temb, context, spec: BlockSpec, *, groups: int, eps: float, dtype, impl=None):
    """CrossAttnDownBlock2D / DownBlock2D. Returns (output, skips): every layer's output and,
    when it downsamples (3x3 conv, stride 2, padding 1), the downsampled map, as
    diffusers' `output_states`."""
    skips = []
    for j in range(spec.layers):
        x = _layer(p, j, x, temb, context, spec, groups, eps, dtype, impl)
        skips.append(x)
    if spec.resample:
        x = nn.downsample2d(p["downsamplers"]["0"], x, padding=1, dtype=dtype)
        skips.append(x)
    return x, skips


def mid_block(p, x, temb, context, spec: BlockSpec, *, groups: int, eps: float, dtype, impl=None):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""
    x = _resnet(p["resnets"]["0"], x, temb, spec, groups, eps, dtype)
    x = transformer_2d(p["attentions"]["0"], x, context, spec.transformer_layers[0], spec, groups, dtype, impl)
    return _resnet(p["resnets"]["1"], x, temb, spec, groups, eps, dtype)


def up_block(p, x, skips, temb, context, spec: BlockSpec, *, upsample_size, groups: int, eps: float, dtype,
             impl=None):
    """CrossAttnUpBlock2D / UpBlock2D: each layer concatenates the newest remaining skip on
    the channel axis before its resnet; then nearest-neighbour up to `upsample_size` (the
    next skip's size: 2x, or what an odd size needs) and a 3x3 conv."""
    skips = list(skips)
    for j in range(spec.layers):
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        x = _layer(p, j, x, temb, context, spec, groups, eps, dtype, impl)
    if spec.resample:
        h, w = x.shape[1:3]
        size = None if tuple(upsample_size) == (2 * h, 2 * w) else tuple(upsample_size)
        x = nn.upsample2d(p["upsamplers"]["0"], x, output_size=size, dtype=dtype)
    return x
