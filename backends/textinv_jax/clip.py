"""The CLIP text encoder in JAX: transformers' CLIPTextModel / CLIPTextModelWithProjection.

    config = read_clip_config(folder, "text_encoder")
    params = load_clip(folder, config, "text_encoder")          # numpy, host memory
    out = apply_clip(params, config, ids, extra_rows=rows)      # rows: [n, width], trainable

Stable Diffusion conditions on the text encoder's hidden states; Textual Inversion trains
only the embedding rows of the new tokens. So the token table stays frozen in `params`,
and ids >= vocab_size read their rows from `extra_rows`, a separate argument that
`jax.grad` can differentiate with respect to (the optimizer never sees the 49k-row table).

Structure (pre-LN transformer, causal mask, final LayerNorm) and parameter names follow
transformers/models/clip/modeling_clip.py, so params["encoder"]["layers"]["0"]["self_attn"]
["q_proj"] is text_model.encoder.layers.0.self_attn.q_proj.
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

__all__ = ["ClipConfig", "apply_clip", "clip_config", "embed_tokens", "load_clip", "read_clip_config"]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """What apply_clip needs from a CLIPTextConfig. Frozen and hashable: a valid static arg."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int | None = None  # set for CLIPTextModelWithProjection (SDXL's second encoder)


def clip_config(config: Mapping) -> ClipConfig:
    """A ClipConfig from a transformers text-encoder config.json dict (or a CLIPConfig's
    `text_config`). `projection_dim` is kept only for CLIPTextModelWithProjection."""
    if "text_config" in config and "hidden_size" not in config:
        config = config["text_config"]
    archs = config.get("architectures") or []
    try:
        cfg = ClipConfig(
            vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]), num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 77)),
            hidden_act=str(config.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            eos_token_id=int(2 if config.get("eos_token_id") is None else config["eos_token_id"]),
            projection_dim=(int(config.get("projection_dim", 512))
                            if "CLIPTextModelWithProjection" in archs else None),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TextinvError(f"Not a CLIP text encoder config (missing or bad {e}).") from None
    nn.activation(cfg.hidden_act)  # unsupported activations fail here, not inside jit
    if cfg.hidden_size % cfg.num_attention_heads:
        raise TextinvError(f"CLIP hidden_size {cfg.hidden_size} does not split into {cfg.num_attention_heads} heads.")
    return cfg


def read_clip_config(folder: Path, component: str = "text_encoder") -> ClipConfig:
    """The ClipConfig of `<folder>/<component>/config.json`."""
    return clip_config(read_config(folder, component))


def expected_shapes(cfg: ClipConfig) -> dict[str, tuple]:
    w, m = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.token_embedding.weight": (cfg.vocab_size, w),
        "embeddings.position_embedding.weight": (cfg.max_position_embeddings, w),
        "final_layer_norm.weight": (w,), "final_layer_norm.bias": (w,),
    }
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{proj}.weight"] = (w, w)
            shapes[f"{pre}self_attn.{proj}.bias"] = (w,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{ln}.weight"] = (w,)
            shapes[f"{pre}{ln}.bias"] = (w,)
        shapes[f"{pre}mlp.fc1.weight"] = (m, w)
        shapes[f"{pre}mlp.fc1.bias"] = (m,)
        shapes[f"{pre}mlp.fc2.weight"] = (w, m)
        shapes[f"{pre}mlp.fc2.bias"] = (w,)
    if cfg.projection_dim is not None:
        shapes["text_projection.weight"] = (cfg.projection_dim, w)
    return shapes


def load_clip(folder_or_state: Path | str | Mapping[str, np.ndarray], config: ClipConfig,
              component: str = "text_encoder") -> dict:
    """Params for apply_clip from a diffusers model folder (`<folder>/<component>`) or from
    a torch-named state dict ({name: array}, with or without the `text_model.` prefix).

    Returns a nested dict of float32 numpy arrays (host memory; the caller puts it on its
    devices once, e.g. jax.device_put(params, replicated_sharding)):
      embeddings.token_embedding.embedding [V, W], embeddings.position_embedding.embedding,
      encoder.layers.<i>.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2},
      final_layer_norm, and text_projection.kernel [W, P] with a projection.
    """
    if isinstance(folder_or_state, Mapping):
        state = dict(folder_or_state)
    else:
        state = read_state(Path(folder_or_state), component)
    # transformers 5 may save a bare CLIPTextModel without the prefix; SD checkpoints have it.
    state = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)  # a buffer (arange) older transformers saved
    require_keys(state, expected_shapes(config), f"CLIP text encoder ({component})")
    return to_params({k: np.asarray(v, np.float32) for k, v in state.items()},
                     embeddings=("embeddings.token_embedding", "embeddings.position_embedding"))


def embed_tokens(params: dict, input_ids: jax.Array, extra_rows: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, W] for `input_ids` [B, T].

    Ids below the table's row count V read the frozen table; ids V .. V+n-1 read
    `extra_rows` [n, W] (the rows being trained, differentiable); any other id gives a
    NaN row, so an id that fits no table shows up instead of silently reading row 0.
    """
    table = params["embeddings"]["token_embedding"]["embedding"]
    v = table.shape[0]
    ids = jnp.asarray(input_ids, jnp.int32)
    base = jnp.take(table, jnp.clip(ids, 0, v - 1), axis=0)
    valid = (ids >= 0) & (ids < v)
    if extra_rows is not None:
        n = extra_rows.shape[0]
        extra = jnp.take(extra_rows, jnp.clip(ids - v, 0, n - 1), axis=0).astype(base.dtype)
        in_extra = (ids >= v) & (ids < v + n)
        base = jnp.where(in_extra[..., None], extra, base)
        valid = valid | in_extra
    return jnp.where(valid[..., None], base, jnp.nan)


def _layer(p: dict, cfg: ClipConfig, h: jax.Array, mask: jax.Array, dt) -> jax.Array:
    a = p["self_attn"]
    x = nn.layer_norm(p["layer_norm1"], h, cfg.layer_norm_eps, dt)
    q, k, v = (nn.linear(a[name], x, dt) for name in ("q_proj", "k_proj", "v_proj"))
    h = h + nn.linear(a["out_proj"], nn.attention(q, k, v, cfg.num_attention_heads, mask=mask), dt)
    x = nn.layer_norm(p["layer_norm2"], h, cfg.layer_norm_eps, dt)
    x = nn.linear(p["mlp"]["fc2"], nn.activation(cfg.hidden_act)(nn.linear(p["mlp"]["fc1"], x, dt)), dt)
    return h + x


def apply_clip(params: dict, config: ClipConfig, input_ids: jax.Array, *, extra_rows: jax.Array | None = None,
               inputs_embeds: jax.Array | None = None, attention_mask: jax.Array | None = None,
               dtype=jnp.float32) -> dict:
    """The text encoder's forward pass, as transformers computes it.

    input_ids [B, T] int (T <= max_position_embeddings); extra_rows [n, W]: rows for ids
    V .. V+n-1 (see embed_tokens). inputs_embeds [B, T, W] replaces the token lookup
    entirely (input_ids still pick the pooled position). attention_mask [B, T] (1 = token,
    0 = padding) masks padded keys on top of the causal mask; SD pipelines pass none.

    Returns a dict of float32 arrays:
      last_hidden_state [B, T, W]   after the final LayerNorm (SD 1.x/2.x conditioning)
      hidden_states     tuple of L+1 [B, T, W]: the embeddings, then each layer's output
                        before the final LayerNorm (SDXL conditions on hidden_states[-2])
      pooler_output     [B, W]: last_hidden_state at the EOS position (first id ==
                        eos_token_id; with the legacy eos_token_id == 2, the largest id)
      text_embeds       [B, P]: pooler_output @ text_projection (only with a projection)
    Jit with `config` static, e.g. jax.jit(apply_clip, static_argnums=1).
    """
    cfg, dt = config, jnp.dtype(dtype)
    ids = jnp.asarray(input_ids, jnp.int32)
    t = ids.shape[-1]
    if t > cfg.max_position_embeddings:
        raise ValueError(f"apply_clip: {t} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
    emb = embed_tokens(params, ids, extra_rows) if inputs_embeds is None else inputs_embeds
    pos = params["embeddings"]["position_embedding"]["embedding"][:t]
    h = (emb.astype(jnp.float32) + pos.astype(jnp.float32)).astype(dt)
    mask = jnp.tril(jnp.ones((t, t), bool))
    if attention_mask is not None:
        mask = mask & (jnp.asarray(attention_mask)[:, None, None, :] != 0)
    hidden = [h]
    for i in range(cfg.num_hidden_layers):
        h = _layer(params["encoder"]["layers"][str(i)], cfg, h, mask, dt)
        hidden.append(h)
    last = nn.layer_norm(params["final_layer_norm"], h, cfg.layer_norm_eps, dt)
    # Which position is pooled follows transformers exactly: configs from before its PR
    # #24773 say eos_token_id == 2 and pool at the largest id (the EOS of the original
    # vocabulary, but a new token's id once tokens are added); newer configs pool at the
    # first EOS.
    where = ids if cfg.eos_token_id == 2 else (ids == cfg.eos_token_id).astype(jnp.int32)
    pooled = jnp.take_along_axis(last, jnp.argmax(where, axis=-1)[:, None, None], axis=1)[:, 0]
    out = {
        "last_hidden_state": last.astype(jnp.float32),
        "hidden_states": tuple(x.astype(jnp.float32) for x in hidden),
        "pooler_output": pooled.astype(jnp.float32),
    }
    if cfg.projection_dim is not None:
        out["text_embeds"] = nn.linear(params["text_projection"], pooled, dt).astype(jnp.float32)
    return out
