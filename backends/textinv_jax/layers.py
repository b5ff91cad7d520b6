"""The `flax.nnx` building blocks every JAX model here is made of, and the two kinds of state
they hold.

    Frozen      a weight imported from the base model; never trained, never in the optimizer
    TokenRows   the new tokens' embedding rows (an nnx.Param): the only trainable state

So `nnx.split(model, TokenRows, Frozen)` gives (graphdef, rows, frozen weights): the step
differentiates the rows alone and the optimizer never sees a frozen weight.

Layers mirror torch's (Linear, Conv2d, GroupNorm, LayerNorm, Embedding) and diffusers'
(ResnetBlock2D, Downsample2D, Upsample2D), with Flax's leaf names: `kernel` (a conv's HWIO,
a linear's [in, out]), `bias`, `scale` (a norm's weight), `embedding` (a table). A model's
state path is then its torch name with those leaves, e.g. `down_blocks/0/resnets/1/conv1/
kernel` for `down_blocks.0.resnets.1.conv1.weight`: what weights.load_into fills, and what a
mesh partitioning rule matches. Each constructor takes shapes only and allocates zeros: the
loaders build models under `nnx.eval_shape` (nothing allocated) and fill them from the
model's files.

Every __call__ takes `dtype`, the compute dtype (None: the input's); weights are cast where
used (nn.py), so fp32 weights can drive a bf16 computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import nn

__all__ = ["Conv2d", "Downsample2D", "Dropout", "Embedding", "Frozen", "Graph", "GroupNorm", "LayerNorm", "Linear",
           "ResnetBlock2D", "TokenRows", "Upsample2D", "split"]


class Frozen(nnx.Variable):
    """A base-model weight: loaded from its files, never trained (not an nnx.Param)."""


class TokenRows(nnx.Param):
    """Embedding rows of the tokens being trained (or sampled with), [n, width]."""


def _zeros(*shape) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


class Linear(nnx.Module):
    """torch.nn.Linear: kernel [in, out], bias [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.kernel = Frozen(_zeros(in_features, out_features))
        self.bias = Frozen(_zeros(out_features)) if bias else None

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return nn.linear(x, self.kernel[...], None if self.bias is None else self.bias[...], dtype)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d (NHWC): kernel [k, k, in, out], bias [out]; `padding` as nn.conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding="same"):
        self.kernel = Frozen(_zeros(kernel_size, kernel_size, in_channels, out_channels))
        self.bias = Frozen(_zeros(out_channels))
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return nn.conv2d(x, self.kernel[...], self.bias[...], stride=self.stride, padding=self.padding, dtype=dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm, channels last; statistics in float32."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        self.scale, self.bias = Frozen(_zeros(channels)), Frozen(_zeros(channels))
        self.groups, self.eps = groups, eps

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return nn.group_norm(x, self.scale[...], self.bias[...], self.groups, self.eps, dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis; statistics in float32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        self.scale, self.bias = Frozen(_zeros(channels)), Frozen(_zeros(channels))
        self.eps = eps

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return nn.layer_norm(x, self.scale[...], self.bias[...], self.eps, dtype)


class Embedding(nnx.Module):
    """torch.nn.Embedding's table [rows, width] (read by the module that owns it)."""

    def __init__(self, rows: int, width: int):
        self.embedding = Frozen(_zeros(rows, width))


class Dropout(nnx.Module):
    """A place holder where torch's module lists hold a Dropout (identity at inference, and
    for training here: textinv trains no dropout), so list indices stay torch's."""

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return x


class ResnetBlock2D(nnx.Module):
    """diffusers.models.resnet.ResnetBlock2D (no up/down inside; dropout is a no-op here).

    temb_channels None: no time embedding (the VAE). time_embedding_norm "default" adds
    proj(act(temb)) before norm2; "scale_shift" applies norm2(h) * (1 + scale) + shift.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None = None, *, groups: int,
                 groups_out: int | None = None, eps: float = 1e-6, act: str = "silu",
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0):
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels)
        proj = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = Linear(temb_channels, proj) if temb_channels else None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        nn.activation(act)  # an unsupported name fails here, not inside jit
        self.act, self.time_embedding_norm, self.output_scale_factor = act, time_embedding_norm, output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, dtype=None) -> jax.Array:
        dt = jnp.dtype(dtype) if dtype is not None else x.dtype
        f = nn.activation(self.act)
        h = self.conv1(f(self.norm1(x, dt)), dt)
        t = None
        if temb is not None and self.time_emb_proj is not None:
            t = self.time_emb_proj(f(temb.astype(dt)), dt)[:, None, None, :]
        if self.time_embedding_norm == "scale_shift":
            if t is None:
                raise ValueError("ResnetBlock2D: scale_shift needs a time embedding")
            t_scale, t_shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h, dt) * (1 + t_scale) + t_shift
        else:
            if t is not None:
                h = h + t
            h = self.norm2(h, dt)
        h = self.conv2(f(h), dt)
        skip = x.astype(dt)
        if self.conv_shortcut is not None:
            skip = self.conv_shortcut(skip, dt)
        out = skip + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nnx.Module):
    """diffusers Downsample2D with use_conv: a 3x3 stride-2 conv.

    padding=1 (the UNet) pads one pixel all round; padding=0 (the VAE encoder) pads only
    bottom and right, as diffusers' F.pad(x, (0, 1, 0, 1)) does.
    """

    def __init__(self, channels: int, padding: int = 1):
        pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=pad)

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return self.conv(x, dtype)


class Upsample2D(nnx.Module):
    """diffusers Upsample2D with use_conv: nearest-neighbour x2 (or to `output_size`, as the
    UNet asks when a skip connection has an odd size), then a 3x3 conv."""

    def __init__(self, channels: int):
        self.conv = Conv2d(channels, channels)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None, dtype=None) -> jax.Array:
        dt = jnp.dtype(dtype) if dtype is not None else x.dtype
        return self.conv(nn.resize_nearest(x.astype(dt), output_size), dt)


class Graph:
    """A model's nnx graphdef as a static argument of jax.jit (the other half of nnx.split:
    `graph.merge(*states)` is the model again, inside the jitted function).

    jax hashes static arguments on every call, and a GraphDef hashes its whole module tree:
    2.5 ms for an SD 1.5 UNet on an idle CPU core (over 20 ms on a busy one), per training
    or denoising step (bench/jax_compile.py --overhead). This keeps the hash;
    equal graphs (one architecture, loaded twice) still compare equal, so runs of one model
    share their compiled steps."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Graph) and self._hash == other._hash
                                 and self.graphdef == other.graphdef)

    def merge(self, *states) -> nnx.Module:
        return nnx.merge(self.graphdef, *states)


def split(model: nnx.Module, *filters) -> tuple:
    """nnx.split for jitted functions: (graph, state, ...) with the graphdef as a Graph and
    each state as a pure dict of arrays (nnx.to_pure_dict; `graph.merge` takes those back).
    jax flattens its arguments on every call, and plain dicts 5-20x faster than nnx.State:
    0.12 ms against 0.6 ms (2 ms on a busy CPU) per step for an SD 1.5 UNet's 686 weights
    (bench/jax_compile.py --overhead)."""
    graphdef, *states = nnx.split(model, *filters)
    return (Graph(graphdef), *(nnx.to_pure_dict(state) for state in states))
