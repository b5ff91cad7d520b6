"""The JAX UNet2DConditionModel equals diffusers' on the same weights, and weight import works.

Four UNets: the tiny SD 1.x and SD 2.x models of the tiny-model factory (1x1-conv vs
linear projections, one head count vs per-block head counts), a differently shaped one
built straight from diffusers (three blocks, two layers per block, a two-deep transformer,
a head count that does not divide the width, upcast_attention, a latent side that does not
halve evenly so upsamplers resize to their skips) and a tiny SDXL-style one (text_time
added embedding). Each runs through diffusers and through jax.jit, batch 2 with different
timesteps: outputs within 1e-4 in fp32 (ours: the flax.nnx UNet2DConditionModel, jitted). Textual inversion backpropagates through the UNet
into the text encoder's output, so the gradient with respect to encoder_hidden_states is
compared too (on SD 1.x: every compile costs seconds on CPU). Latents are NCHW for torch
and NHWC for JAX.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from textinv_cli.errors import TextinvError

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from textinv_jax import nn, unet, weights  # noqa: E402

TOL = 1e-4


@functools.partial(nnx.jit, static_argnames=("dtype", "attention"))
def APPLY(model, x, t, ctx, added_cond=None, dtype=jnp.float32, attention=None):
    return model(x, t, ctx, added_cond=added_cond, dtype=dtype, attention=attention)


@pytest.fixture(scope="module", autouse=True)
def jax_settings():
    """Full float32 matmuls and convs: on GPUs XLA's default lets them run in TF32 (about
    1e-3 off). And few optimisation passes: on CPU they take about half of each UNet
    compile, and compiling is nearly all of this module's time."""
    names = ("jax_default_matmul_precision", "jax_disable_most_optimizations")
    before = {n: jax.config.values[n] for n in names}
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    for n, v in before.items():
        jax.config.update(n, v)


def _custom_unet():
    # Three blocks, two layers each, a two-deep transformer in the mid block, heads that
    # split 16 channels into 3 x 5 (so the transformer's inner width, 15, differs from the
    # block's), 1x1-conv projections, upcast_attention, an output width unlike the input's,
    # sin/cos unflipped, a frequency shift of 1, and a 6x6 latent (6 -> 3 -> 2 -> 3 -> 6).
    torch.manual_seed(5)
    return diffusers.UNet2DConditionModel(
        sample_size=6, in_channels=4, out_channels=3, layers_per_block=2, block_out_channels=(16, 24, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        cross_attention_dim=48, attention_head_dim=(3, 2, 4), transformer_layers_per_block=(1, 1, 2),
        upcast_attention=True, freq_shift=1, flip_sin_to_cos=False,
    )


def _sdxl_unet():
    # SDXL's extras: the "text_time" added embedding (pooled text + six size/crop ids) and
    # linear projections with per-block heads; kept one layer deep to compile fast.
    torch.manual_seed(6)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=40, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
    )


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    out = {f: tiny_model(f) for f in ("sd1", "sd2")}  # the session's, built once for every test file
    for name, build in (("custom", _custom_unet), ("sdxl", _sdxl_unet)):
        folder = tmp_path_factory.mktemp(f"{name}-unet")
        build().save_pretrained(folder / "unet", safe_serialization=True)
        out[name] = folder
    return out


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def inputs(model, seed=0, tokens=7):
    """Batch 2 at different timesteps (one early, one late), text states like a CLIP output."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, cfg.sample_size, cfg.sample_size)).astype(np.float32)
    ctx = rng.standard_normal((2, tokens, cfg.cross_attention_dim)).astype(np.float32)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                 "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 80, 8, 4, 64, 64]], np.float32)}
    return x, np.array([17, 901]), ctx, added


def torch_reference(model, x, t, ctx, added, weight):
    """diffusers' output, and the gradient of sum(output * weight) w.r.t. the text states."""
    tctx = torch.tensor(ctx, requires_grad=True)
    kw = {} if added is None else {"added_cond_kwargs": {k: torch.tensor(v) for k, v in added.items()}}
    out = model(torch.tensor(x), torch.tensor(t), tctx, **kw).sample
    (out * torch.tensor(nchw(weight))).sum().backward()
    return out.detach().numpy(), tctx.grad.numpy()


def load(folder):
    cfg = unet.read_unet_config(folder)
    return unet.load_unet(folder, cfg), cfg  # the module, and its config


@pytest.mark.parametrize("name", ["sd1", "sd2", "custom", "sdxl"])
def test_unet_matches_diffusers(models, name, monkeypatch):
    folder = models[name]
    ours, cfg = load(folder)
    model = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, t, ctx, added = inputs(model)
    weight = np.random.default_rng(9).standard_normal((2, x.shape[2], x.shape[3], cfg.out_channels)).astype(np.float32)
    want, want_grad = torch_reference(model, x, t, ctx, added, weight)

    if name == "sd1":
        # What textual inversion differentiates: a loss through the UNet w.r.t. the text
        # states. One compile gives the output (aux) and the gradient; compiling is what
        # makes these tests slow on CPU, so the other UNets check the forward pass only.
        graphdef, state = nnx.split(ours)

        def loss(c, s):  # the weights as an argument: closed over, XLA would constant-fold them
            out = nnx.merge(graphdef, s)(nhwc(x), t, c, added_cond=added)
            return jnp.sum(out * weight), out

        (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(ctx), state)
        gdiff, gscale = maxdiff(grad, want_grad), float(np.abs(want_grad).max())
        print(name, "grad", gdiff, "of", gscale)
        assert gdiff < TOL * max(1.0, gscale)
    else:
        out = APPLY(ours, nhwc(x), t, ctx, added_cond=added)
    if name == "sdxl":  # the attention= option reaches the kernel (traced only: compiles cost)
        seen, real = [], nn.attention
        monkeypatch.setattr(nn, "attention", lambda *a, **k: seen.append(k["implementation"]) or real(*a, **k))
        graphdef, state = nnx.split(ours)
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(nhwc(x), t, ctx, added_cond=added, attention="xla"), state)
        assert set(seen) == {None, "xla"}  # fused for self-attention, plain for the text
    assert out.shape == (2, x.shape[2], x.shape[3], cfg.out_channels) and out.dtype == jnp.float32
    diff = maxdiff(nchw(out), want)
    print(name, "out", diff, "of", float(np.abs(want).max()))
    assert diff < TOL


def test_bf16_compute_is_close_to_fp32(models):
    ours, cfg = load(models["sd2"])
    model = diffusers.UNet2DConditionModel.from_pretrained(models["sd2"] / "unet").eval()
    x, t, ctx, added = inputs(model)  # called as in the fp32 test above, so its compile is reused
    out32 = APPLY(ours, nhwc(x), t, ctx, added_cond=added)
    out16 = APPLY(ours, nhwc(x), t, ctx, added_cond=added, dtype=jnp.bfloat16)
    assert out16.dtype == jnp.float32  # params stay fp32, the result comes back fp32
    scale, diff = float(np.abs(np.asarray(out32)).max()), maxdiff(out16, out32)
    print("bf16", diff, "of", scale)
    assert 0 < diff < 0.05 * max(scale, 1.0)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 500.5, 999])
    cases = ((32, True, 0), (33, False, 1), (8, True, 1))
    ours = jax.jit(lambda t: [unet.timestep_embedding(t, *case) for case in cases])(jnp.asarray(t))
    for (dim, flip, shift), got in zip(cases, ours):
        want = get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        # float32 arguments near 1000 have an ulp of 6e-5: XLA's exp and torch's may round
        # the frequencies one ulp apart, which moves sin/cos of t * freq by that much
        assert got.shape == want.shape and maxdiff(got, want) < 1e-4


def test_config_follows_diffusers_naming(models):
    sd1, sd2 = unet.read_unet_config(models["sd1"]), unet.read_unet_config(models["sd2"])
    # SD 1.x: attention_head_dim 4 means 4 heads in every block; SD 2.x: (2, 4) per block
    assert [b.heads for b in sd1.down + (sd1.mid,) + sd1.up] == [4, 4, 4, 4, 4]
    assert [b.heads for b in sd2.down] == [2, 4] and sd2.mid.heads == 4 and [b.heads for b in sd2.up] == [4, 2]
    assert not sd1.down[0].linear_proj and sd2.down[0].linear_proj
    assert [b.layers for b in sd1.down] == [1, 1] and [b.layers for b in sd1.up] == [2, 2]
    custom = unet.read_unet_config(models["custom"])
    assert custom.mid.transformer_layers == (2,) and custom.up[2].transformer_layers == (1, 1, 1)
    assert custom.down[0].heads == custom.up[2].heads == 3 and custom.mid.heads == 4
    hash(custom)  # static argument of jax.jit
    model = unet.load_unet(models["sd1"], sd1)
    assert model.conv_in.kernel.shape == (3, 3, 4, 32)  # HWIO
    assert model.down_blocks[0].attentions[0].proj_in.kernel.shape == (1, 1, 32, 32)
    block = model.up_blocks[1].attentions[0].transformer_blocks[0]
    assert block.attn2.to_k.kernel.shape == (32, 32) and block.attn2.to_k.bias is None
    assert block.ff.net[0].proj.kernel.shape == (32, 256)
    assert [type(b).__name__ for b in model.down_blocks] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    # every weight is Frozen: nothing of the UNet is an nnx.Param, so no optimizer ever sees it
    assert not nnx.to_flat_state(nnx.state(model, nnx.Param))


def test_load_from_state_dict_and_mismatches(models):
    cfg = unet.read_unet_config(models["sd2"])
    state = weights.read_state(models["sd2"], "unet")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(unet.load_unet(state, cfg)),
                 nnx.state(unet.load_unet(models["sd2"], cfg)))
    # sd2 weights (linear projections) under sd1's config (1x1 convs): named, not run
    with pytest.raises(TextinvError, match="proj_in"):
        unet.load_unet(state, unet.read_unet_config(models["sd1"]))
    missing = dict(state)
    del missing["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(TextinvError, match="missing mid_block.attentions.0.transformer_blocks.0.attn2.to_k"):
        unet.load_unet(missing, cfg)


@pytest.mark.parametrize("change,match", [
    ({"transformer_layers_per_block": [[1], [1]]}, "reverse_transformer_layers_per_block"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "AttnDownBlock2D"),
    ({"addition_embed_type": "text"}, "addition_embed_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "UNetMidBlock2DSimpleCrossAttn"),
    ({"block_out_channels": [32, 64, 64]}, "differ in length"),
])
def test_unsupported_configs_are_refused_by_name(models, change, match):
    config = json.loads((models["sd1"] / "unet" / "config.json").read_text())
    with pytest.raises(TextinvError, match=match):
        unet.unet_config({**config, **change})


def test_sdxl_needs_its_added_conditions(models):
    ours, cfg = load(models["sdxl"])
    graphdef, state = nnx.split(ours)
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="added_cond"):
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(x, 1, jnp.zeros((1, 3, 40))), state)
