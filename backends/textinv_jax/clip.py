"""The CLIP text encoder as flax.nnx modules: transformers' CLIPTextModel and
CLIPTextModelWithProjection (SDXL's second encoder), same module tree and names.

    config = read_clip_config(folder, "text_encoder")
    model = load_clip(folder, config, "text_encoder")     # weights in host memory (numpy)
    model.set_new_tokens(rows)                             # rows: [n, width], the trained tokens
    out = model(ids)                                       # {"last_hidden_state", "hidden_states", ...}

Stable Diffusion conditions on the text encoder's hidden states; Textual Inversion trains
only the embedding rows of the new tokens. So the token table stays a Frozen weight and
ids >= vocab_size read their rows from `text_model.embeddings.new_tokens`, a TokenRows
variable: `nnx.split(model, TokenRows, ...)` hands the step those rows alone to
differentiate (the optimizer never sees the 49k-row table).

The state paths are transformers' names (text_model/encoder/layers/0/self_attn/q_proj/kernel
is text_model.encoder.layers.0.self_attn.q_proj.weight, transposed), structure as in
transformers/models/clip/modeling_clip.py: pre-LN transformer, causal mask, final LayerNorm.
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
from .layers import Embedding, Frozen, Graph, LayerNorm, Linear, TokenRows, split
from .weights import load_into, read_config, read_state, require_keys, to_params

__all__ = ["CLIPTextModel", "CLIPTextModelWithProjection", "ClipConfig", "clip_config", "load_clip",
           "read_clip_config", "rows_state", "split_frozen"]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """What the text models need from a CLIPTextConfig. Frozen and hashable."""

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


# -- the modules -----------------------------------------------------------------------------

class CLIPTextEmbeddings(nnx.Module):
    """Token and position embeddings; ids V .. V+n-1 (V = the table's rows) read the n rows
    of `new_tokens`, any other id outside the table gives a NaN row, so an id that fits
    no table shows up instead of silently reading row 0."""

    def __init__(self, cfg: ClipConfig):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.new_tokens = TokenRows(jnp.zeros((0, cfg.hidden_size), jnp.float32))

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, W] for `input_ids` [B, T]."""
        table = self.token_embedding.embedding[...]
        v = table.shape[0]
        ids = jnp.asarray(input_ids, jnp.int32)
        base = jnp.take(table, jnp.clip(ids, 0, v - 1), axis=0)
        valid = (ids >= 0) & (ids < v)
        rows = self.new_tokens[...]
        n = rows.shape[0]
        if n:
            extra = jnp.take(rows, jnp.clip(ids - v, 0, n - 1), axis=0).astype(base.dtype)
            in_extra = (ids >= v) & (ids < v + n)
            base = jnp.where(in_extra[..., None], extra, base)
            valid = valid | in_extra
        return jnp.where(valid[..., None], base, jnp.nan)

    def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None, dtype=jnp.float32):
        t = input_ids.shape[-1]
        emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        pos = self.position_embedding.embedding[...][:t]
        return (emb.astype(jnp.float32) + pos.astype(jnp.float32)).astype(dtype)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention: q/k/v/out projections with biases, scale head_dim**-0.5."""

    def __init__(self, cfg: ClipConfig):
        w = cfg.hidden_size
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (Linear(w, w) for _ in range(4))
        self.heads = cfg.num_attention_heads

    def __call__(self, x: jax.Array, mask: jax.Array, dtype) -> jax.Array:
        q, k, v = self.q_proj(x, dtype), self.k_proj(x, dtype), self.v_proj(x, dtype)
        return self.out_proj(nn.attention(q, k, v, self.heads, mask=mask), dtype)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: ClipConfig):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        return self.fc2(nn.activation(self.act)(self.fc1(x, dtype)), dtype)


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ClipConfig):
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, h: jax.Array, mask: jax.Array, dtype) -> jax.Array:
        h = h + self.self_attn(self.layer_norm1(h, dtype), mask, dtype)
        return h + self.mlp(self.layer_norm2(h, dtype), dtype)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: ClipConfig):
        self.layers = nnx.List([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, h: jax.Array, mask: jax.Array, dtype) -> list[jax.Array]:
        """Every hidden state: the input, then each layer's output."""
        hidden = [h]
        for layer in self.layers:
            h = layer(h, mask, dtype)
            hidden.append(h)
        return hidden


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: ClipConfig):
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, input_ids, *, inputs_embeds=None, attention_mask=None, dtype=jnp.float32) -> dict:
        cfg, dt = self.config, jnp.dtype(dtype)
        ids = jnp.asarray(input_ids, jnp.int32)
        t = ids.shape[-1]
        if t > cfg.max_position_embeddings:
            raise ValueError(f"CLIP: {t} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((t, t), bool))
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask)[:, None, None, :] != 0)
        hidden = self.encoder(self.embeddings(ids, inputs_embeds, dt), mask, dt)
        last = self.final_layer_norm(hidden[-1], dt)
        # Which position is pooled follows transformers exactly: configs from before its PR
        # #24773 say eos_token_id == 2 and pool at the largest id (the EOS of the original
        # vocabulary, but a new token's id once tokens are added); newer configs pool at the
        # first EOS.
        where = ids if cfg.eos_token_id == 2 else (ids == cfg.eos_token_id).astype(jnp.int32)
        pooled = jnp.take_along_axis(last, jnp.argmax(where, axis=-1)[:, None, None], axis=1)[:, 0]
        return {"last_hidden_state": last.astype(jnp.float32),
                "hidden_states": tuple(x.astype(jnp.float32) for x in hidden),
                "pooler_output": pooled.astype(jnp.float32)}


class CLIPTextModel(nnx.Module):
    """transformers' CLIPTextModel (SD 1.x/2.x, SDXL's first encoder).

    model(input_ids [B, T], *, inputs_embeds, attention_mask, dtype) -> dict of float32:
      last_hidden_state [B, T, W]   after the final LayerNorm (SD 1.x/2.x conditioning)
      hidden_states     tuple of L+1 [B, T, W]: the embeddings, then each layer's output
                        before the final LayerNorm (SDXL conditions on hidden_states[-2])
      pooler_output     [B, W]: last_hidden_state at the EOS position (first id ==
                        eos_token_id; with the legacy eos_token_id == 2, the largest id)
    inputs_embeds [B, T, W] replaces the token lookup (input_ids still pick the pooled
    position); attention_mask [B, T] (1 = token) masks padded keys on top of the causal
    mask (SD pipelines pass none); dtype is the compute dtype.
    """

    def __init__(self, cfg: ClipConfig):
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    @property
    def token_table(self):
        """The frozen token embedding table [V, W]."""
        return self.text_model.embeddings.token_embedding.embedding[...]

    def set_new_tokens(self, rows) -> None:
        """The rows [n, width] that ids V .. V+n-1 read (None: no new tokens)."""
        width = self.config.hidden_size
        rows = np.zeros((0, width), np.float32) if rows is None else rows
        self.text_model.embeddings.new_tokens = TokenRows(rows)

    def __call__(self, input_ids, *, inputs_embeds=None, attention_mask=None, dtype=jnp.float32) -> dict:
        return self.text_model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, dtype=dtype)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' CLIPTextModelWithProjection (SDXL's second encoder): CLIPTextModel's
    outputs plus text_embeds [B, P] = pooler_output @ text_projection (no bias)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__(cfg)
        self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def __call__(self, input_ids, *, inputs_embeds=None, attention_mask=None, dtype=jnp.float32) -> dict:
        out = super().__call__(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, dtype=dtype)
        out["text_embeds"] = self.text_projection(out["pooler_output"], dtype).astype(jnp.float32)
        return out


def split_frozen(model: CLIPTextModel) -> tuple[Graph, dict]:
    """(graph, frozen weights) of a text model (layers.split), its new rows left out: a jitted function
    takes the graph as a static argument and rebuilds the model with any rows:
    `graph.merge(rows_state(rows), frozen)`."""
    graph, _, frozen = split(model, TokenRows, Frozen)
    return graph, frozen


def rows_state(rows) -> nnx.State:
    """The state holding `rows` [n, width] as a text model's new tokens."""
    return nnx.State({"text_model": {"embeddings": {"new_tokens": TokenRows(rows)}}})


# -- weights ---------------------------------------------------------------------------------

def load_clip(folder_or_state: Path | str | Mapping[str, np.ndarray], config: ClipConfig,
              component: str = "text_encoder") -> CLIPTextModel:
    """The text model (CLIPTextModelWithProjection where the config has a projection) from a
    diffusers model folder (`<folder>/<component>`) or from a torch-named state dict
    ({name: array}, with or without the `text_model.` prefix). Its weights are float32
    numpy arrays in host memory: the caller places the state on its devices once."""
    if isinstance(folder_or_state, Mapping):
        state = dict(folder_or_state)
    else:
        state = read_state(Path(folder_or_state), component)
    # transformers 5 may save a bare CLIPTextModel without the prefix; SD checkpoints have it.
    state = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)  # a buffer (arange) older transformers saved
    require_keys(state, expected_shapes(config), f"CLIP text encoder ({component})")
    params = to_params({k: np.asarray(v, np.float32) for k, v in state.items()},
                       embeddings=("embeddings.token_embedding", "embeddings.position_embedding"))
    tree = {"text_model": {k: v for k, v in params.items() if k != "text_projection"}}
    if "text_projection" in params:
        tree["text_projection"] = params["text_projection"]
    cls = CLIPTextModel if config.projection_dim is None else CLIPTextModelWithProjection
    return load_into(lambda: cls(config), tree, f"CLIP text encoder ({component})")
