"""The JAX CLIP text encoder equals transformers' on the same weights (the JAX backend's parity bar).

Each family's tiny model (sd1 quick_gelu, sd2 gelu, sdxl's second encoder with a
projection) and one differently shaped model saved straight from transformers (more
layers, legacy eos_token_id == 2 pooling, no `text_model.` prefix) are run through
transformers and through our flax.nnx CLIPTextModel(WithProjection), jitted; every output
must agree within 1e-4 in fp32.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from textinv_jax import clip  # noqa: E402
from textinv_jax.layers import TokenRows  # noqa: E402

TOL = 1e-4


@functools.partial(nnx.jit, static_argnames="dtype")
def APPLY(model, ids, attention_mask=None, dtype=jnp.float32):
    return model(ids, attention_mask=attention_mask, dtype=dtype)
ENCODERS = [("sd1", "text_encoder"), ("sd2", "text_encoder"), ("sdxl", "text_encoder_2"), ("custom", "text_encoder")]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    out = {f: tiny_model(f) for f in ("sd1", "sd2", "sdxl")}  # the session's, built once for every test file
    # A shape the tiny factory never makes: gelu, 5 layers, 2 heads, 24 positions, and the
    # legacy eos_token_id == 2 (pool at the largest id), saved by transformers 5 itself.
    cfg = transformers.CLIPTextConfig(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=5,
                                      num_attention_heads=2, max_position_embeddings=24, hidden_act="gelu",
                                      eos_token_id=2, bos_token_id=0, pad_token_id=1)
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("custom-clip")
    transformers.CLIPTextModel(cfg).save_pretrained(folder / "text_encoder", safe_serialization=True)
    out["custom"] = folder
    return out


@functools.lru_cache(maxsize=None)
def reference(folder, component):
    """A transformers model to compare with (shared; tests that change a model load their own)."""
    return torch_model(folder, component)


def torch_model(folder, component):
    cfg = transformers.AutoConfig.from_pretrained(folder / component)
    cls = (transformers.CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (cfg.architectures or [])
           else transformers.CLIPTextModel)
    return cls.from_pretrained(folder / component).eval()


def prompt_ids(cfg: clip.ClipConfig, batch: int = 2, length: int = 16, seed: int = 0) -> np.ndarray:
    """Random ids shaped like tokenizer output: BOS, words, EOS, then padding with EOS."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size - 2, (batch, length))
    ids[:, 0] = cfg.vocab_size - 2
    for b in range(batch):
        ids[b, 4 + 5 * b:] = cfg.eos_token_id if cfg.eos_token_id != 2 else cfg.vocab_size - 1
    return ids


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("family,component", ENCODERS)
def test_text_encoder_matches_transformers(models, family, component):
    folder = models[family]
    cfg = clip.read_clip_config(folder, component)
    model = clip.load_clip(folder, cfg, component)
    assert isinstance(model, clip.CLIPTextModelWithProjection if cfg.projection_dim else clip.CLIPTextModel)
    ids = prompt_ids(cfg)
    with torch.no_grad():
        ref = reference(folder, component)(torch.tensor(ids), output_hidden_states=True)
    out = APPLY(model, ids)

    assert len(out["hidden_states"]) == cfg.num_hidden_layers + 1 == len(ref.hidden_states)
    diffs = {
        "last_hidden_state": maxdiff(out["last_hidden_state"], ref.last_hidden_state),
        "penultimate": maxdiff(out["hidden_states"][-2], ref.hidden_states[-2]),
        "all_hidden_states": max(maxdiff(a, b) for a, b in zip(out["hidden_states"], ref.hidden_states)),
    }
    if cfg.projection_dim is not None:
        diffs["text_embeds"] = maxdiff(out["text_embeds"], ref.text_embeds)
        assert out["text_embeds"].shape == (2, cfg.projection_dim)
    else:
        diffs["pooler_output"] = maxdiff(out["pooler_output"], ref.pooler_output)
    print(family, component, diffs)
    assert max(diffs.values()) < TOL, diffs
    assert out["last_hidden_state"].dtype == jnp.float32


def test_legacy_eos_pools_at_the_largest_id(models):
    # eos_token_id == 2: transformers pools where the id is largest, wherever that is.
    cfg = clip.read_clip_config(models["custom"], "text_encoder")
    assert cfg.eos_token_id == 2
    ids = prompt_ids(cfg)
    ids[0, 2] = cfg.vocab_size - 1  # now earlier than the "EOS" run
    out = APPLY(clip.load_clip(models["custom"], cfg), ids)
    np.testing.assert_array_equal(out["pooler_output"][0], out["last_hidden_state"][0, 2])


@pytest.mark.parametrize("family,component", [("sd1", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_extra_rows_equal_resized_torch_embeddings(models, family, component):
    """New tokens' rows passed separately == transformers after resize_token_embeddings."""
    folder = models[family]
    cfg = clip.read_clip_config(folder, component)
    ours = clip.load_clip(folder, cfg, component)
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((3, cfg.hidden_size)) * 0.5).astype(np.float32)
    ids = prompt_ids(cfg)
    ids[0, 2:5] = cfg.vocab_size + np.arange(3)  # "a <x> <x>_1 <x>_2 photo"
    ids[1, 1] = cfg.vocab_size + 1

    model = torch_model(folder, component)
    model.resize_token_embeddings(cfg.vocab_size + 3, mean_resizing=False)
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table[cfg.vocab_size:] = torch.tensor(rows)
    ref = model(torch.tensor(ids), output_hidden_states=True)
    # One compiled function gives the outputs and the gradient w.r.t. the rows of a
    # weighted sum of last_hidden_state (torch gets the same loss below).
    weights = rng.standard_normal(ref.last_hidden_state.shape).astype(np.float32)

    # As the training step does: the rows split off the model, the only thing differentiated.
    ours.set_new_tokens(rows)
    graphdef, trained, frozen = nnx.split(ours, TokenRows, ...)

    def loss(r):
        out = nnx.merge(graphdef, r, frozen)(ids)
        return (out["last_hidden_state"] * weights).sum(), out

    grad, out = jax.jit(jax.grad(loss, has_aux=True))(trained)
    grad = grad["text_model"]["embeddings"]["new_tokens"][...]
    diffs = {"last_hidden_state": maxdiff(out["last_hidden_state"], ref.last_hidden_state.detach()),
             "penultimate": maxdiff(out["hidden_states"][-2], ref.hidden_states[-2].detach())}
    pooled, ref_pooled = ("text_embeds", ref.text_embeds) if cfg.projection_dim else ("pooler_output", ref.pooler_output)
    diffs[pooled] = maxdiff(out[pooled], ref_pooled.detach())

    # The gradient w.r.t. the rows is torch's gradient w.r.t. the same table rows.
    (ref.last_hidden_state * torch.tensor(weights)).sum().backward()
    diffs["grad"] = maxdiff(grad, table.grad[cfg.vocab_size:])
    print(family, "extra rows", diffs)
    assert max(diffs.values()) < TOL, diffs
    assert float(np.abs(np.asarray(grad)).min()) > 0


def test_ids_outside_every_table_give_nan_rows(models):
    cfg = clip.read_clip_config(models["sd1"])
    model = clip.load_clip(models["sd1"], cfg)
    ids = np.array([[0, cfg.vocab_size - 1, cfg.vocab_size, cfg.vocab_size + 2, -1]])
    rows = np.ones((2, cfg.hidden_size), np.float32)
    model.set_new_tokens(rows)
    emb = np.asarray(model.text_model.embeddings.embed_tokens(ids))
    table = model.token_table
    np.testing.assert_array_equal(emb[0, :2], table[[0, cfg.vocab_size - 1]])
    np.testing.assert_array_equal(emb[0, 2], rows[0])
    assert np.isnan(emb[0, 3]).all() and np.isnan(emb[0, 4]).all()
    model.set_new_tokens(None)
    assert np.isnan(np.asarray(model.text_model.embeddings.embed_tokens(ids[:, 2:3]))).all()  # no extra rows


def test_attention_mask_matches_transformers(models):
    cfg = clip.read_clip_config(models["sd2"])
    model = clip.load_clip(models["sd2"], cfg)
    ids = prompt_ids(cfg)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        ref = reference(models["sd2"], "text_encoder")(torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = APPLY(model, ids, attention_mask=mask)
    diff = maxdiff(out["last_hidden_state"], ref.last_hidden_state)
    print("attention mask", diff)
    assert diff < TOL
    unmasked = APPLY(model, ids)["last_hidden_state"]
    assert maxdiff(out["last_hidden_state"][0, 6:], unmasked[0, 6:]) > 1e-3  # the mask did something


def test_bf16_compute_is_close_to_fp32(models):
    cfg = clip.read_clip_config(models["sdxl"], "text_encoder_2")
    model = clip.load_clip(models["sdxl"], cfg, "text_encoder_2")
    ids = prompt_ids(cfg)
    ref = APPLY(model, ids)
    out = APPLY(model, ids, dtype=jnp.bfloat16)
    assert out["last_hidden_state"].dtype == jnp.float32  # outputs are float32 whatever the compute
    for key in ("last_hidden_state", "text_embeds"):
        scale = float(np.abs(np.asarray(ref[key])).max())
        diff = maxdiff(out[key], ref[key])
        print("bf16", key, diff, "of", scale)
        assert 0 < diff < 0.05 * max(scale, 1.0), (key, diff, scale)


def test_weights_without_prefix_and_mismatches(models):
    from safetensors.numpy import load_file

    from textinv_cli.errors import TextinvError

    cfg = clip.read_clip_config(models["sd1"])
    state = load_file(models["sd1"] / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in state)
    bare = {k.removeprefix("text_model."): v for k, v in state.items()}
    a, b = clip.load_clip(state, cfg), clip.load_clip(bare, cfg)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(a), nnx.state(b))
    with pytest.raises(TextinvError, match="missing encoder.layers.0.mlp.fc1.bias"):
        clip.load_clip({k: v for k, v in bare.items() if k != "encoder.layers.0.mlp.fc1.bias"}, cfg)
    with pytest.raises(TextinvError, match="wrong shape embeddings.token_embedding.weight"):
        clip.load_clip({**bare, "embeddings.token_embedding.weight": np.zeros((5, cfg.hidden_size))}, cfg)


def test_importing_the_backend_does_not_import_jax():
    code = "import sys, textinv_jax; assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_new_rows_are_the_only_params(models):
    # What keeps frozen weights out of the optimizer: every imported weight is Frozen, and
    # the only nnx.Param is the new tokens' rows.
    model = clip.load_clip(models["sdxl"], clip.read_clip_config(models["sdxl"], "text_encoder_2"), "text_encoder_2")
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert [path for path, _ in params] == [("text_model", "embeddings", "new_tokens")]
    frozen = dict(nnx.to_flat_state(nnx.state(model, clip.Frozen)))
    assert frozen[("text_model", "encoder", "layers", 0, "self_attn", "q_proj", "kernel")].shape == (64, 64)
    assert ("text_projection", "kernel") in frozen and ("text_projection", "bias") not in frozen
