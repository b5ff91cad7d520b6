"""The JAX AutoencoderKL equals diffusers' on the same weights, and weight import works.

The tiny model's VAE (the same architecture in every family: four blocks, quant convs,
mid-block attention) and a differently shaped one saved straight from diffusers (two
blocks, two resnets per block, channel changes, six latent channels, no quant convs) are
run through diffusers and through our flax.nnx AutoencoderKL, jitted: encoder mean/std and
decoder output must agree
within 1e-4 in fp32. Images are NCHW for torch and NHWC for JAX.
"""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from textinv_cli.errors import NotFoundError, TextinvError

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from textinv_jax import layers, vae, weights  # noqa: E402

TOL = 1e-4


@functools.partial(nnx.jit, static_argnames="dtype")
def ENCODE(model, images, dtype=jnp.float32):
    return model.encode(images, dtype)


@functools.partial(nnx.jit, static_argnames="dtype")
def DECODE(model, latents, dtype=jnp.float32):
    return model.decode(latents, dtype)


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    out = {"sd1": tiny_model("sd1")}  # the session's, built once for every test file
    torch.manual_seed(11)
    custom = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=6, layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 24), scaling_factor=0.5, use_quant_conv=False, use_post_quant_conv=False,
    )
    folder = tmp_path_factory.mktemp("custom-vae")
    custom.save_pretrained(folder / "vae", safe_serialization=True)
    out["custom"] = folder
    return out


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name,size", [("sd1", (32, 40)), ("custom", (12, 10))])
def test_vae_matches_diffusers(models, name, size):
    folder = models[name]
    cfg = vae.read_vae_config(folder)
    ours = vae.load_vae(folder, cfg)
    model = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.tensor(images)).latent_dist
        # decode something other than the encoder's output, with a spread like real latents
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
        decoded = model.decode(latents).sample

    mean, std = ENCODE(ours, nhwc(images))
    out = DECODE(ours, nhwc(latents))
    assert mean.shape == (2, size[0] // cfg.downscale, size[1] // cfg.downscale, cfg.latent_channels)
    assert out.shape == (2, *size, 3) and out.dtype == jnp.float32
    diffs = {"mean": maxdiff(nchw(mean), dist.mean), "std": maxdiff(nchw(std), dist.std),
             "decoded": maxdiff(nchw(out), decoded)}
    print(name, cfg.block_out_channels, diffs)
    assert max(diffs.values()) < TOL, diffs
    assert cfg.scaling_factor == model.config.scaling_factor


def test_bf16_compute_is_close_to_fp32(models):
    folder = models["custom"]
    ours = vae.load_vae(folder, vae.read_vae_config(folder))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 12, 10, 3)).astype(np.float32)
    mean, std = ENCODE(ours, images)
    mean16, std16 = ENCODE(ours, images, dtype=jnp.bfloat16)
    out, out16 = DECODE(ours, mean), DECODE(ours, mean, dtype=jnp.bfloat16)
    assert mean16.dtype == std16.dtype == out16.dtype == jnp.float32
    for key, a, b in (("mean", mean16, mean), ("std", std16, std), ("decoded", out16, out)):
        scale = float(np.abs(np.asarray(b)).max())
        diff = maxdiff(a, b)
        print("bf16", key, diff, "of", scale)
        assert 0 < diff < 0.05 * max(scale, 1.0), (key, diff, scale)


def test_encoder_and_decoder_need_only_their_half(models):
    cfg = vae.read_vae_config(models["sd1"])
    images = jax.ShapeDtypeStruct((1, 16, 24, 3), jnp.float32)
    # eval_shape traces without compiling: a use of a dropped half would fail here.
    enc = vae.load_vae(models["sd1"], cfg)
    enc.decoder = enc.post_quant_conv = None
    graphdef, state = nnx.split(enc)
    mean, std = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, images)
    assert mean.shape == std.shape == (1, 2, 3, 4)
    dec = vae.load_vae(models["sd1"], cfg)
    dec.encoder = dec.quant_conv = None
    graphdef, state = nnx.split(dec)
    out = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, mean)
    assert out.shape == (1, 16, 24, 3)


def test_config_and_params_layout(models):
    cfg = vae.read_vae_config(models["sd1"])
    assert (cfg.scaling_factor, cfg.downscale, cfg.latent_channels, cfg.use_quant_conv) == (0.18215, 8, 4, True)
    ours = vae.load_vae(models["sd1"], cfg)
    assert ours.encoder.conv_in.kernel.shape == (3, 3, 3, 32)  # HWIO
    assert ours.decoder.up_blocks[0].upsamplers[0].conv.kernel.shape == (3, 3, 64, 64)
    assert ours.encoder.mid_block.attentions[0].to_out[0].kernel.shape == (64, 64)
    assert ours.encoder.mid_block.resnets[0].norm1.scale.shape == (64,)
    custom = vae.read_vae_config(models["custom"])
    assert (custom.downscale, custom.latent_channels, custom.use_quant_conv) == (2, 6, False)


def test_legacy_attention_names_load_the_same(models):
    cfg = vae.read_vae_config(models["sd1"])
    state = weights.read_state(models["sd1"], "vae")
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in state.items():
        for new, old in names.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v  # as 1x1 convs, like LDM checkpoints
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    jax.tree.map(np.testing.assert_array_equal, nnx.state(vae.load_vae(legacy, cfg)),
                 nnx.state(vae.load_vae(state, cfg)))


def test_unsupported_vae_configs_are_refused():
    with pytest.raises(TextinvError, match="AttnDownEncoderBlock2D"):
        vae.vae_config({"block_out_channels": [8], "down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(TextinvError, match="AutoencoderTiny"):
        vae.vae_config({"_class_name": "AutoencoderTiny"})


# -- weight import -------------------------------------------------------------------------

def test_layout_converters():
    w = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)  # O I H W
    hwio = weights.conv_weight(w)
    assert hwio.shape == (5, 7, 3, 2) and hwio[4, 6, 2, 1] == w[1, 2, 4, 6]
    lin = np.arange(6, dtype=np.float32).reshape(2, 3)  # out, in
    np.testing.assert_array_equal(weights.linear_weight(lin), lin.T)
    np.testing.assert_array_equal(weights.linear_weight(lin[:, :, None, None]), lin.T)
    params = weights.to_params({"a.0.weight": lin, "a.0.bias": np.zeros(2), "n.weight": np.ones(3),
                                "emb.weight": lin, "c.weight": w}, embeddings=("emb",))
    assert set(params) == {"a", "n", "emb", "c"} and set(params["a"]["0"]) == {"kernel", "bias"}
    assert params["n"]["scale"].shape == (3,) and params["emb"]["embedding"].shape == (2, 3)
    assert params["c"]["kernel"].shape == (5, 7, 3, 2)


def test_load_into_fills_by_path_and_refuses_what_does_not_fit():
    build = lambda: layers.ResnetBlock2D(4, 6, groups=2)  # noqa: E731
    shapes = {"norm1.weight": (4,), "norm1.bias": (4,), "conv1.weight": (6, 4, 3, 3), "conv1.bias": (6,),
              "norm2.weight": (6,), "norm2.bias": (6,), "conv2.weight": (6, 6, 3, 3), "conv2.bias": (6,),
              "conv_shortcut.weight": (6, 4, 1, 1), "conv_shortcut.bias": (6,)}
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    block = weights.load_into(build, weights.to_params(state), "test")
    np.testing.assert_array_equal(block.conv1.kernel[...], state["conv1.weight"].transpose(2, 3, 1, 0))  # HWIO
    assert isinstance(block.conv1.kernel, layers.Frozen) and not nnx.to_flat_state(nnx.state(block, nnx.Param))
    with pytest.raises(TextinvError, match="has a weight conv_shortcut.bias that its files do not give"):
        weights.load_into(build, weights.to_params({k: v for k, v in state.items() if k != "conv_shortcut.bias"}),
                          "test")
    with pytest.raises(TextinvError, match="1 tensor"):
        weights.load_into(build, weights.to_params({**state, "extra.bias": np.zeros(2, np.float32)}), "test")
    with pytest.raises(TextinvError, match="conv2.bias is \\(5,\\), the model needs \\(6,\\)"):
        weights.load_into(build, weights.to_params({**state, "conv2.bias": np.zeros(5, np.float32)}), "test")


def _copy_vae(src, dst):
    shutil.copytree(src / "vae", dst / "vae")
    return dst / "vae"


def test_read_state_variants_shards_and_refusals(models, tmp_path):
    src = models["custom"]
    state = weights.read_state(src, "vae")
    assert all(v.dtype == np.float32 for v in state.values())

    comp = _copy_vae(src, tmp_path / "fp16")  # only an fp16 variant: read, widened to float32
    (comp / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.astype(np.float16) for k, v in state.items()}, comp / "diffusion_pytorch_model.fp16.safetensors")
    half = weights.read_state(tmp_path / "fp16", "vae")
    assert half.keys() == state.keys() and all(v.dtype == np.float32 for v in half.values())
    assert max(maxdiff(half[k], state[k]) for k in state) < 1e-2

    comp = _copy_vae(src, tmp_path / "sharded")  # a sharded checkpoint with its index
    (comp / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(state)
    shards = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, comp / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    sharded = weights.read_state(tmp_path / "sharded", "vae")
    assert sharded.keys() == state.keys() and all(np.array_equal(sharded[k], state[k]) for k in state)

    comp = _copy_vae(src, tmp_path / "pickled")  # pickles are never loaded
    (comp / "diffusion_pytorch_model.safetensors").rename(comp / "diffusion_pytorch_model.bin")
    with pytest.raises(TextinvError, match=r"only pickled weights \(diffusion_pytorch_model.bin\)"):
        weights.read_state(tmp_path / "pickled", "vae")
    (comp / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(NotFoundError, match="no model weights"):
        weights.read_state(tmp_path / "pickled", "vae")
    with pytest.raises(NotFoundError, match="no 'unet' folder"):
        weights.read_state(tmp_path / "pickled", "unet")

    comp = _copy_vae(src, tmp_path / "truncated")  # the strict reader's errors come through
    path = comp / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TextinvError, match="truncated, corrupt or not a safetensors file"):
        weights.read_state(tmp_path / "truncated", "vae")


def test_weights_that_do_not_match_the_config_are_refused(models):
    cfg = vae.read_vae_config(models["custom"])
    state = load_file(models["custom"] / "vae" / "diffusion_pytorch_model.safetensors")
    other = vae.VaeConfig(**{**cfg.__dict__, "layers_per_block": 1})
    with pytest.raises(TextinvError, match="unexpected decoder.up_blocks.0.resnets.2"):
        vae.load_vae(state, other)
    with pytest.raises(TextinvError, match="missing quant_conv"):
        vae.load_vae(state, vae.VaeConfig(**{**cfg.__dict__, "use_quant_conv": True}))


# -- shared layers (layers.py) the UNet builds on: the cases the VAE itself does not reach --

def _ours(module, build):
    """Our layer `build()` makes, filled with the torch module's weights."""
    params = weights.to_params({k: v.detach().numpy() for k, v in module.state_dict().items()})
    return weights.load_into(build, params, type(module).__name__)


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_resnet_block_with_time_embedding_matches_diffusers(norm):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(5)
    block = ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=10, groups=4, eps=1e-5,
                          time_embedding_norm=norm, output_scale_factor=1.5).eval()
    x = torch.randn(2, 8, 6, 5)
    temb = torch.randn(2, 10)
    with torch.no_grad():
        ref = block(x, temb)
    ours = _ours(block, lambda: layers.ResnetBlock2D(8, 12, 10, groups=4, eps=1e-5, time_embedding_norm=norm,
                                                     output_scale_factor=1.5))
    out = nnx.jit(lambda m, x, t: m(x, t))(ours, nhwc(x), temb.numpy())
    assert maxdiff(nchw(out), ref) < TOL


def test_resampling_and_norms_match_torch():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(6)
    x = torch.randn(2, 8, 7, 5)  # odd sizes: padding and nearest-neighbour indexing must agree
    down = Downsample2D(8, use_conv=True, out_channels=8, padding=1, name="op").eval()
    up = Upsample2D(8, use_conv=True, out_channels=8).eval()
    ln, gn = torch.nn.LayerNorm(8), torch.nn.GroupNorm(2, 8, eps=1e-6)
    with torch.no_grad():
        for m in (ln, gn):
            m.weight.normal_()
            m.bias.normal_()
        refs = [down(x), up(x, output_size=(13, 11)), ln(x.permute(0, 2, 3, 1)),
                gn(x.flatten(2)).transpose(1, 2)]  # group norm over a token sequence, as in the UNet

    def run(d, u, lnorm, gnorm, x):
        seq = x.reshape(x.shape[0], -1, x.shape[-1])
        return d(x), u(x, output_size=(13, 11)), lnorm(x), gnorm(seq)

    outs = nnx.jit(run)(_ours(down, lambda: layers.Downsample2D(8, padding=1)), _ours(up, lambda: layers.Upsample2D(8)),
                        _ours(ln, lambda: layers.LayerNorm(8)), _ours(gn, lambda: layers.GroupNorm(2, 8, 1e-6)),
                        nhwc(x))
    assert outs[0].shape == (2, 4, 3, 8) and outs[1].shape == (2, 13, 11, 8)
    diffs = [maxdiff(nchw(outs[0]), refs[0]), maxdiff(nchw(outs[1]), refs[1]), maxdiff(outs[2], refs[2]),
             maxdiff(outs[3], refs[3])]
    assert max(diffs) < TOL, diffs
