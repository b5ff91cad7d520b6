"""The array math under the JAX modules (layers.py, clip.py, unet_blocks.py, vae.py).

Pure functions of arrays: the modules hold the weights (in the layouts weights.py converts
torch's to: HWIO conv kernels, [in, out] linear kernels) and call these. Images are NHWC;
sequences are [batch, tokens, channels].

Precision: `dtype` is the compute dtype (None: the input's dtype). Weights are cast to it
at the point of use, so fp32 weights can drive a bf16 computation. Normalisation
statistics and softmax are always computed in float32, as diffusers does with
`upcast_softmax` and as torch autocast does for norms; this keeps bf16 runs close to fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["activation", "attention", "conv2d", "group_norm", "layer_norm", "linear", "resize_nearest"]


def _dtype(x, dtype):
    return jnp.dtype(dtype) if dtype is not None else x.dtype


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, dtype=None) -> jax.Array:
    """torch.nn.Linear: x @ kernel [in, out] (+ bias [out]) over the last axis."""
    dt = _dtype(x, dtype)
    y = jnp.matmul(x.astype(dt), kernel.astype(dt))
    if bias is not None:
        y = y + bias.astype(dt)
    return y


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, stride: int = 1, padding="same",
           dtype=None) -> jax.Array:
    """torch.nn.Conv2d on NHWC input; kernel [kh, kw, in, out] (HWIO), bias [out].

    padding: "same" pads k//2 on every side (torch's padding=k//2 for odd kernels),
    an int pads that much on every side, or explicit ((top, bottom), (left, right)).
    """
    dt = _dtype(x, dtype)
    kernel = kernel.astype(dt)
    kh, kw = kernel.shape[:2]
    if padding == "same":
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    elif isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    y = lax.conv_general_dilated(x.astype(dt), kernel, window_strides=(stride, stride), padding=padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if bias is not None:
        y = y + bias.astype(dt)
    return y


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float = 1e-5,
               dtype=None) -> jax.Array:
    """torch.nn.GroupNorm with channels last: x is [batch, ..., channels].

    Group g holds channels g*C/G .. (g+1)*C/G - 1, the same grouping torch uses on NCHW,
    so imported weights line up. Statistics (biased variance, as torch) are taken in
    float32 over all positions of the group.
    """
    dt = _dtype(x, dtype)
    c = x.shape[-1]
    if c % groups:
        raise ValueError(f"group_norm: {c} channels do not split into {groups} groups")
    xf = x.astype(jnp.float32).reshape(x.shape[0], -1, groups, c // groups)
    mean = xf.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
    y = ((xf - mean) * lax.rsqrt(var + eps)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dt)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5, dtype=None) -> jax.Array:
    """torch.nn.LayerNorm over the last axis; stats in float32."""
    dt = _dtype(x, dtype)
    xf = x.astype(jnp.float32)
    mean = xf.mean(axis=-1, keepdims=True)
    var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
    y = (xf - mean) * lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dt)


def activation(name: str):
    """The activation called `name` in diffusers/transformers configs.

    silu/swish; gelu (exact, erf-based: torch's default and transformers' "gelu");
    gelu_new/gelu_pytorch_tanh (tanh approximation); quick_gelu (x * sigmoid(1.702 x),
    OpenAI CLIP / SD 1.x); relu.
    """
    table = {
        "silu": jax.nn.silu, "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(table)})")
    return table[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, mask: jax.Array | None = None,
              scale: float | None = None, implementation: str | None = None) -> jax.Array:
    """Multi-head scaled dot-product attention on already-projected inputs.

    q: [B, Tq, heads*d]; k, v: [B, Tk, heads*d] -> [B, Tq, heads*d] in q's dtype.
    scale defaults to d**-0.5. mask (optional) is boolean, True = may attend, and
    broadcasts to [B, heads, Tq, Tk] (e.g. a causal [Tq, Tk] or a key mask [B, 1, 1, Tk]).
    implementation None: plain XLA with logits and softmax in float32 (matches torch to
    ~1e-6); "xla" or "cudnn": jax.nn.dot_product_attention (cudnn = fused flash attention
    on GPU, bf16/fp16 only), for large sequences where the [Tq, Tk] logits would not fit.
    """
    b, tq, inner = q.shape
    tk = k.shape[1]
    d = inner // heads
    scale = d ** -0.5 if scale is None else scale
    qh = q.reshape(b, tq, heads, d)
    kh = k.reshape(b, tk, heads, d)
    vh = v.reshape(b, tk, heads, d)
    if implementation is not None:
        m = None if mask is None else jnp.broadcast_to(mask, (b, heads, tq, tk))
        out = jax.nn.dot_product_attention(qh, kh, vh, mask=m, scale=scale, implementation=implementation)
        return out.reshape(b, tq, inner)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vh)
    return out.reshape(b, tq, inner)


def resize_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling of NHWC `x`: x2, or to `output_size` with torch's
    "nearest" rule (source index floor(dst * in / out)), as an UNet asks when a skip
    connection has an odd size."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    (h, w), (oh, ow) = x.shape[1:3], output_size
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]
