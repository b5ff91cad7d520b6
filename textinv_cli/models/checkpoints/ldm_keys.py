"""Where each tensor of an original (LDM/SGM) Stable Diffusion checkpoint goes in a diffusers folder.

A plan is derived from the diffusers configs of the architecture (architectures.py): walking
the UNet, VAE and text encoders block by block, it lists every tensor the diffusers models
hold, with its shape, and the file's tensor it comes from. So the plan is also the check:
a tensor the plan does not expect under a mapped prefix, a missing one or a wrong shape is
an error, never a silently dropped or half-loaded weight.

The facts (key names of CompVis/Stability's ldm and sgm code, OpenCLIP and transformers'
CLIP) were read from the published checkpoints' layouts and diffusers' converter; the code
is ours. Every operation is a rename, a reshape (1x1 conv <-> linear), a row slice (OpenCLIP's
packed q/k/v) or a 2-D transpose (OpenCLIP's text projection), so bytes are enough: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# The file's prefixes per component. Keys under MAPPED_PREFIXES that no plan entry takes
# (and IGNORED does not name) are refused; other top-level keys are not model weights:
# `model_ema.*` (the EMA copy: A1111 and ComfyUI load the model's own weights, and
# "-ema-pruned"/"emaonly" files already hold the EMA values there), the DDPM schedule
# buffers (betas, alphas_cumprod, ... : the scheduler config recomputes them), `lvlb_weights`.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_L = "conditioner.embedders.0.transformer."
SDXL_TEXT_G = "conditioner.embedders.1.model."
MAPPED_PREFIXES = (UNET, VAE, "cond_stage_model.", "conditioner.")


@dataclass(frozen=True)
class Move:
    """One diffusers tensor: `dst` (name in its component's file) with `shape`, made from the
    file's tensor `src` by `op`:
        copy       same shape, same bytes
        reshape    same bytes, the shape differs by trailing 1x1 (a 1x1 conv <-> a linear layer)
        transpose  a 2-D matrix transposed (src holds shape reversed)
        chunk      rows part*n .. (part+1)*n of src, which stacks `parts` such blocks
    """
    src: str
    dst: str
    shape: tuple[int, ...]
    op: str = "copy"
    part: int = 0
    parts: int = 1

    def source_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes the file's tensor may have."""
        if self.op == "transpose":
            return (tuple(reversed(self.shape)),)
        if self.op == "chunk":
            return ((self.shape[0] * self.parts, *self.shape[1:]),)
        if self.op == "reshape":
            if len(self.shape) == 2:  # a linear layer, stored as a 1x1 conv or already linear
                return (self.shape + (1, 1), self.shape)
            return (self.shape[:2], self.shape)  # a 1x1 conv, stored as a linear layer or already a conv
        return (self.shape,)


# -- the UNet -----------------------------------------------------------------------------

def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _resnet(src: str, dst: str, c_in: int, c_out: int, time_dim: int | None) -> Iterator[Move]:
    """A ResBlock (UNet: in_layers/emb_layers/out_layers/skip_connection) or a VAE ResnetBlock
    (norm1/conv1/norm2/conv2/nin_shortcut; time_dim None)."""
    unet = time_dim is not None
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
             "conv_shortcut": "skip_connection", "time_emb_proj": "emb_layers.1"} if unet else {
             "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    shapes = {"norm1": (c_in,), "conv1": (c_out, c_in, 3, 3), "norm2": (c_out,), "conv2": (c_out, c_out, 3, 3)}
    if unet:
        shapes["time_emb_proj"] = (c_out, time_dim)
    if c_in != c_out:
        shapes["conv_shortcut"] = (c_out, c_in, 1, 1)
    for name, shape in shapes.items():
        yield Move(f"{src}{names[name]}.weight", f"{dst}{name}.weight", shape)
        yield Move(f"{src}{names[name]}.bias", f"{dst}{name}.bias", (shape[0],))


def _transformer(src: str, dst: str, c: int, depth: int, context: int, linear: bool) -> Iterator[Move]:
    """A SpatialTransformer. Inside it ldm and diffusers use the same names (attn1/attn2,
    to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, norm1-3); only proj_in/proj_out differ:
    1x1 convs in SD 1.x, linear layers where the config says use_linear_projection."""
    yield Move(f"{src}norm.weight", f"{dst}norm.weight", (c,))
    yield Move(f"{src}norm.bias", f"{dst}norm.bias", (c,))
    proj = (c, c) if linear else (c, c, 1, 1)
    for p in ("proj_in", "proj_out"):
        yield Move(f"{src}{p}.weight", f"{dst}{p}.weight", proj, "reshape")
        yield Move(f"{src}{p}.bias", f"{dst}{p}.bias", (c,))
    for k in range(depth):
        b = f"transformer_blocks.{k}."
        for attn, kv in (("attn1", c), ("attn2", context)):
            for name, width in (("to_q", c), ("to_k", kv), ("to_v", kv)):
                yield Move(f"{src}{b}{attn}.{name}.weight", f"{dst}{b}{attn}.{name}.weight", (c, width))
            yield Move(f"{src}{b}{attn}.to_out.0.weight", f"{dst}{b}{attn}.to_out.0.weight", (c, c))
            yield Move(f"{src}{b}{attn}.to_out.0.bias", f"{dst}{b}{attn}.to_out.0.bias", (c,))
        for name, shape in (("ff.net.0.proj", (8 * c, c)), ("ff.net.2", (c, 4 * c))):  # GEGLU: 2 x 4c out
            yield Move(f"{src}{b}{name}.weight", f"{dst}{b}{name}.weight", shape)
            yield Move(f"{src}{b}{name}.bias", f"{dst}{b}{name}.bias", (shape[0],))
        for name in ("norm1", "norm2", "norm3"):
            yield Move(f"{src}{b}{name}.weight", f"{dst}{b}{name}.weight", (c,))
            yield Move(f"{src}{b}{name}.bias", f"{dst}{b}{name}.bias", (c,))


def _pair(src: str, dst: str, shape: tuple[int, ...]) -> Iterator[Move]:
    yield Move(f"{src}.weight", f"{dst}.weight", shape)
    yield Move(f"{src}.bias", f"{dst}.bias", (shape[0],))


def unet_moves(cfg: dict, p: str = UNET) -> Iterator[Move]:
    """openaimodel's UNetModel -> UNet2DConditionModel. input_blocks[0] is conv_in; then each
    down block has layers_per_block entries [ResBlock, (SpatialTransformer)] and, except the
    last, one [Downsample]; output_blocks hold layers_per_block + 1 entries per up block,
    the last of them ending in an Upsample (after the transformer where there is one)."""
    ch = list(cfg["block_out_channels"])
    n, lpb = len(ch), cfg["layers_per_block"]
    t = ch[0] * 4
    ctx, linear = cfg["cross_attention_dim"], bool(cfg.get("use_linear_projection", False))
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    yield from _pair(f"{p}time_embed.0", "time_embedding.linear_1", (t, ch[0]))
    yield from _pair(f"{p}time_embed.2", "time_embedding.linear_2", (t, t))
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop ids
        yield from _pair(f"{p}label_emb.0.0", "add_embedding.linear_1", (t, cfg["projection_class_embeddings_input_dim"]))
        yield from _pair(f"{p}label_emb.0.2", "add_embedding.linear_2", (t, t))
    yield from _pair(f"{p}input_blocks.0.0", "conv_in", (ch[0], cfg.get("in_channels", 4), 3, 3))
    idx = 1
    for i, kind in enumerate(cfg["down_block_types"]):
        c_prev = ch[0] if i == 0 else ch[i - 1]
        for j in range(lpb):
            yield from _resnet(f"{p}input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}.", c_prev if j == 0 else ch[i],
                               ch[i], t)
            if kind.startswith("CrossAttn"):
                yield from _transformer(f"{p}input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}.", ch[i],
                                        depth[i], ctx, linear)
            idx += 1
        if i < n - 1:
            yield from _pair(f"{p}input_blocks.{idx}.0.op", f"down_blocks.{i}.downsamplers.0.conv", (ch[i], ch[i], 3, 3))
            idx += 1
    yield from _resnet(f"{p}middle_block.0.", "mid_block.resnets.0.", ch[-1], ch[-1], t)
    yield from _transformer(f"{p}middle_block.1.", "mid_block.attentions.0.", ch[-1], depth[-1], ctx, linear)
    yield from _resnet(f"{p}middle_block.2.", "mid_block.resnets.1.", ch[-1], ch[-1], t)
    rch, rdepth = ch[::-1], depth[::-1]
    prev = rch[0]
    idx = 0
    for i, kind in enumerate(cfg["up_block_types"]):
        out, skip_in = rch[i], rch[min(i + 1, n - 1)]
        attn = kind.startswith("CrossAttn")
        for j in range(lpb + 1):
            skip = skip_in if j == lpb else out
            yield from _resnet(f"{p}output_blocks.{idx}.0.", f"up_blocks.{i}.resnets.{j}.",
                               (prev if j == 0 else out) + skip, out, t)
            if attn:
                yield from _transformer(f"{p}output_blocks.{idx}.1.", f"up_blocks.{i}.attentions.{j}.", out,
                                        rdepth[i], ctx, linear)
            if j == lpb and i < n - 1:
                yield from _pair(f"{p}output_blocks.{idx}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv",
                                 (out, out, 3, 3))
            idx += 1
        prev = out
    yield from _pair(f"{p}out.0", "conv_norm_out", (ch[0],))
    yield from _pair(f"{p}out.2", "conv_out", (cfg.get("out_channels", 4), ch[0], 3, 3))


# -- the VAE ------------------------------------------------------------------------------

def _vae_mid(src: str, dst: str, c: int) -> Iterator[Move]:
    yield from _resnet(f"{src}block_1.", f"{dst}resnets.0.", c, c, None)
    a = f"{dst}attentions.0."
    yield from _pair(f"{src}attn_1.norm", f"{a}group_norm", (c,))
    for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        yield Move(f"{src}attn_1.{old}.weight", f"{a}{new}.weight", (c, c), "reshape")  # 1x1 conv -> linear
        yield Move(f"{src}attn_1.{old}.bias", f"{a}{new}.bias", (c,))
    yield from _resnet(f"{src}block_2.", f"{dst}resnets.1.", c, c, None)


def vae_moves(cfg: dict, p: str = VAE) -> Iterator[Move]:
    """ldm's Encoder/Decoder -> AutoencoderKL. The decoder's `up` list is numbered from the
    lowest resolution's last block backwards: up.{n-1-i} is diffusers' up_blocks.{i}."""
    ch = list(cfg["block_out_channels"])
    n, lpb, lat = len(ch), cfg["layers_per_block"], cfg.get("latent_channels", 4)
    yield from _pair(f"{p}encoder.conv_in", "encoder.conv_in", (ch[0], cfg.get("in_channels", 3), 3, 3))
    for i in range(n):
        c_prev = ch[0] if i == 0 else ch[i - 1]
        for j in range(lpb):
            yield from _resnet(f"{p}encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                               c_prev if j == 0 else ch[i], ch[i], None)
        if i < n - 1:
            yield from _pair(f"{p}encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                             (ch[i], ch[i], 3, 3))
    yield from _vae_mid(f"{p}encoder.mid.", "encoder.mid_block.", ch[-1])
    yield from _pair(f"{p}encoder.norm_out", "encoder.conv_norm_out", (ch[-1],))
    yield from _pair(f"{p}encoder.conv_out", "encoder.conv_out", (2 * lat, ch[-1], 3, 3))
    yield from _pair(f"{p}quant_conv", "quant_conv", (2 * lat, 2 * lat, 1, 1))
    yield from _pair(f"{p}post_quant_conv", "post_quant_conv", (lat, lat, 1, 1))
    yield from _pair(f"{p}decoder.conv_in", "decoder.conv_in", (ch[-1], lat, 3, 3))
    yield from _vae_mid(f"{p}decoder.mid.", "decoder.mid_block.", ch[-1])
    rch = ch[::-1]
    prev = rch[0]
    for i in range(n):
        up = f"{p}decoder.up.{n - 1 - i}."
        for j in range(lpb + 1):
            yield from _resnet(f"{up}block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", prev if j == 0 else rch[i],
                               rch[i], None)
        if i < n - 1:
            yield from _pair(f"{up}upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", (rch[i], rch[i], 3, 3))
        prev = rch[i]
    yield from _pair(f"{p}decoder.norm_out", "decoder.conv_norm_out", (ch[0],))
    yield from _pair(f"{p}decoder.conv_out", "decoder.conv_out", (cfg.get("out_channels", 3), ch[0], 3, 3))


# -- the text encoders --------------------------------------------------------------------

def _clip_dims(cfg: dict) -> tuple[int, int, int, int, int]:
    return (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"],
            cfg.get("max_position_embeddings", 77))


def hf_clip_moves(cfg: dict, p: str) -> Iterator[Move]:
    """transformers' CLIPTextModel saved inside the checkpoint (SD 1.x, SDXL's first encoder):
    the same names after the prefix. `p` ends in `text_model.` or not (older saves lack it)."""
    w, inner, layers, vocab, positions = _clip_dims(cfg)
    t = "text_model."
    yield Move(f"{p}embeddings.token_embedding.weight", f"{t}embeddings.token_embedding.weight", (vocab, w))
    yield Move(f"{p}embeddings.position_embedding.weight", f"{t}embeddings.position_embedding.weight", (positions, w))
    for k in range(layers):
        layer = f"encoder.layers.{k}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _pair(f"{p}{layer}self_attn.{name}", f"{t}{layer}self_attn.{name}", (w, w))
        yield from _pair(f"{p}{layer}layer_norm1", f"{t}{layer}layer_norm1", (w,))
        yield from _pair(f"{p}{layer}layer_norm2", f"{t}{layer}layer_norm2", (w,))
        yield from _pair(f"{p}{layer}mlp.fc1", f"{t}{layer}mlp.fc1", (inner, w))
        yield from _pair(f"{p}{layer}mlp.fc2", f"{t}{layer}mlp.fc2", (w, inner))
    yield from _pair(f"{p}final_layer_norm", f"{t}final_layer_norm", (w,))


def open_clip_moves(cfg: dict, p: str, projection: bool) -> Iterator[Move]:
    """OpenCLIP's text tower (SD 2.x, SDXL's second encoder) -> CLIPTextModel(WithProjection).
    Its attention packs q, k and v in one in_proj (rows q, then k, then v); its projection
    is applied as x @ text_projection, so diffusers' Linear weight is the transpose."""
    w, inner, layers, vocab, positions = _clip_dims(cfg)
    t = "text_model."
    yield Move(f"{p}token_embedding.weight", f"{t}embeddings.token_embedding.weight", (vocab, w))
    yield Move(f"{p}positional_embedding", f"{t}embeddings.position_embedding.weight", (positions, w))
    for k in range(layers):
        src, dst = f"{p}transformer.resblocks.{k}.", f"{t}encoder.layers.{k}."
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            yield Move(f"{src}attn.in_proj_weight", f"{dst}self_attn.{name}.weight", (w, w), "chunk", part, 3)
            yield Move(f"{src}attn.in_proj_bias", f"{dst}self_attn.{name}.bias", (w,), "chunk", part, 3)
        yield from _pair(f"{src}attn.out_proj", f"{dst}self_attn.out_proj", (w, w))
        yield from _pair(f"{src}ln_1", f"{dst}layer_norm1", (w,))
        yield from _pair(f"{src}ln_2", f"{dst}layer_norm2", (w,))
        yield from _pair(f"{src}mlp.c_fc", f"{dst}mlp.fc1", (inner, w))
        yield from _pair(f"{src}mlp.c_proj", f"{dst}mlp.fc2", (w, inner))
    yield from _pair(f"{p}ln_final", f"{t}final_layer_norm", (w,))
    if projection:
        yield Move(f"{p}text_projection", "text_projection.weight", (cfg["projection_dim"], w), "transpose")


def ignored(name: str, text_prefixes: dict[str, tuple[str, int | None]]) -> bool:
    """Keys under a mapped prefix that are known and deliberately not converted.

    `text_prefixes`: prefix -> (layout "hf"|"openclip", the index of a resblock diffusers
    leaves out or None). SD 2.x conditions on OpenCLIP's penultimate layer, so diffusers'
    SD 2.x text encoder has one layer fewer than the file: the last one is never used.
    """
    if name.startswith(VAE + "loss."):  # the VAE's training loss (discriminator, LPIPS), never inference weights
        return True
    for prefix, (layout, dropped) in text_prefixes.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if layout == "hf":
            # a buffer (0..76), rebuilt by transformers; some saves keep it as a float or int tensor
            return rest in ("text_model.embeddings.position_ids", "embeddings.position_ids")
        if rest in ("logit_scale", "attn_mask"):  # CLIP's contrastive temperature; the causal mask buffer
            return True
        if rest == "text_projection" and dropped is not None:  # SD 2.x: the projection is unused
            return True
        return dropped is not None and rest.startswith(f"transformer.resblocks.{dropped}.")
    return False
