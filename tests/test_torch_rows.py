"""The trainable-rows splice: same gradient as training the whole (resized) embedding
matrix, same text-encoder output as diffusers' load_textual_inversion, init from words,
and the refusals. Tiny models are written once per module; nothing here downloads.
"""

from __future__ import annotations

import copy

import pytest

from textinv_cli.engine import run_files as S
from textinv_cli.engine.quiet_libraries import quiet
from textinv_cli.engine.captions import placeholder_names
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.errors import TextinvError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

from textinv_torch import loading as M  # noqa: E402
from textinv_torch import tokens as R  # noqa: E402
from textinv_torch.step import Batch, encode_text, forward_loss  # noqa: E402

TOKEN = "<cat-toy>"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny kernels gain nothing from a second thread; on a busy 2-core machine they lose a lot.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dirs(tiny_model):
    return {f: tiny_model(f) for f in ("sd1", "sd2", "sdxl")}


def load(path, image_side=True):
    with quiet():
        comp = M.load_text_side(str(path))
        if image_side:
            M.load_image_side(comp)
    return comp


def ids_for(comp, text, n):
    text = R.expand_placeholder(text, TOKEN, n)
    return [tok([text] * 2, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in comp.tokenizers]


def fixed_batch(comp, ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, comp.unet.config.in_channels, 8, 8)
    return Batch(ids=ids, latents=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
                 timesteps=torch.tensor([10, 900]), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_gradient_matches_training_the_whole_matrix(model_dirs, family):
    comp = load(model_dirs[family])
    n = 2
    naive_encoders = [copy.deepcopy(te) for te in comp.text_encoders]  # before any splice
    prepared = R.prepare_rows(comp, TOKEN, ["toy"], n)
    rows = R.install_rows(comp, prepared)
    ids = ids_for(comp, f"a photo of a {TOKEN} on the beach", n)
    batch = fixed_batch(comp, ids)

    loss = forward_loss(comp, batch, torch.float32)
    loss.backward()

    # diffusers' way: resize the matrix to the tokenizer, copy the init in, train all of it.
    weights = []
    for te, tok, (first, init) in zip(naive_encoders, comp.tokenizers, prepared):
        te.resize_token_embeddings(len(tok))
        w = te.get_input_embeddings().weight
        with torch.no_grad():
            w[first:first + n] = init
        w.requires_grad_(True)
        weights.append((w, first))
    comp.text_encoders = naive_encoders
    naive = forward_loss(comp, batch, torch.float32)
    naive.backward()

    assert torch.allclose(loss, naive, rtol=0, atol=1e-6)
    for (slot, r), (w, first) in zip(rows.items(), weights):
        assert r.grad is not None and r.grad.abs().sum() > 0, slot
        torch.testing.assert_close(r.grad, w.grad[first:first + n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedding_loads_in_diffusers_with_the_same_text_encoder_output(model_dirs, family, tmp_path):
    comp = load(model_dirs[family], image_side=False)
    n = 3
    rows = R.setup_rows(comp, TOKEN, ["toy", "red"], n)
    with torch.no_grad():  # "trained" values, far from any init
        for i, r in enumerate(rows.values()):
            r.copy_(torch.randn(r.shape, generator=torch.Generator().manual_seed(i)))
    spec = TrainSpec(data_dir="x", token=TOKEN, init=["toy"], model=str(model_dirs[family]), run_dir="x", vectors=n)
    vectors = {s: r.detach().numpy().copy() for s, r in rows.items()}
    path = S.write_vectors(tmp_path / "learned_embeds.safetensors", vectors, spec, comp.family, 7)

    prompt = f"a photo of {TOKEN} on the beach"
    with torch.no_grad():
        ours, added = encode_text(comp, ids_for(comp, prompt, n))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with quiet():
        pipe = cls.from_pretrained(model_dirs[family], local_files_only=True)
        if family == "sdxl":
            pipe.load_textual_inversion(str(path), token=TOKEN, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(str(tmp_path / "learned_embeds_2.safetensors"), token=TOKEN,
                                        text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(path))
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours[:1], theirs[0], rtol=1e-5, atol=1e-6)
    if family == "sdxl":
        torch.testing.assert_close(added["text_embeds"][:1], theirs[2], rtol=1e-5, atol=1e-6)
    # and the rows matter: without the embedding the output differs
    with torch.no_grad():
        plain, _ = encode_text(comp, ids_for(comp, "a photo of toy on the beach", n))
    assert not torch.allclose(ours, plain)


def test_init_from_words(model_dirs):
    comp = load(model_dirs["sd1"], image_side=False)
    tok, te = comp.tokenizers[0], comp.text_encoders[0]
    w = R.token_embedding(te).weight

    def emb(word):
        (i,) = tok.encode(word, add_special_tokens=False)
        return w[i]

    rows = R.init_rows(tok, w, ["red", "toy"], 3)
    assert rows.dtype == torch.float32 and rows.shape == (3, w.shape[1])
    for got, word in zip(rows, ["red", "toy", "red"]):  # fewer words than vectors: cycled
        assert torch.equal(got, emb(word))
    # a word of several tokens is spread over the vectors when there are enough of them
    pieces = tok.encode("cats", add_special_tokens=False)
    assert len(pieces) == 3
    assert torch.equal(R.init_rows(tok, w, ["cats"], 3), w[pieces])


def test_splice_keeps_rows_fp32_under_a_low_precision_encoder(model_dirs):
    comp = load(model_dirs["sd1"], image_side=False)
    te = comp.text_encoders[0]
    prepared = R.prepare_rows(comp, TOKEN, ["toy"], 2)
    te.to(torch.bfloat16)
    rows = R.install_rows(comp, prepared)
    assert rows["clip_l"].dtype == torch.float32
    assert all(p is not rows["clip_l"] for p in te.parameters())  # the encoder never owns the rows
    out = te(ids_for(comp, f"a {TOKEN}", 2)[0])[0]
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert rows["clip_l"].grad is not None and rows["clip_l"].grad.dtype == torch.float32
    assert rows["clip_l"].grad.abs().sum() > 0


def test_placeholder_names_and_expansion():
    assert placeholder_names("<x>", 3) == ["<x>", "<x>_1", "<x>_2"]
    assert R.expand_placeholder("a <x> and <x>", "<x>", 2) == "a <x> <x>_1 and <x> <x>_1"
    assert R.expand_placeholder("a <x>_1", "<x>", 2) == "a <x>_1"
    assert R.expand_placeholder("a <x>", "<x>", 1) == "a <x>"


@pytest.mark.parametrize("token, words, n, message", [
    ("toy", ["red"], 1, "already in the clip_l tokenizer's vocabulary"),
    ("<cat toy>", ["red"], 1, "contains spaces"),
    (TOKEN, ["cats"], 1, "init word 'cats' is 3 tokens; with --vectors 1 pass a single-token word or --vectors 3"),
    (TOKEN, ["red", "toy"], 1, "--init has 2 words but --vectors is 1"),
    (TOKEN, [" "], 1, "empty"),
])
def test_refusals_leave_the_tokenizer_alone(model_dirs, token, words, n, message):
    comp = load(model_dirs["sd1"], image_side=False)
    before = len(comp.tokenizers[0])
    with pytest.raises(TextinvError) as e:
        R.prepare_rows(comp, token, words, n)
    assert message in str(e.value)
    assert len(comp.tokenizers[0]) == before


def test_token_already_added_is_refused(model_dirs):
    comp = load(model_dirs["sd1"], image_side=False)
    R.prepare_rows(comp, TOKEN, ["toy"], 1)
    with pytest.raises(TextinvError, match="already in"):
        R.prepare_rows(comp, TOKEN, ["toy"], 1)


def test_unknown_family_is_refused():
    with pytest.raises(TextinvError, match="Unknown model family 'sd3'"):
        M.slots_for("sd3")
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
    with pytest.raises(TextinvError, match="Unsupported model family: StableDiffusion3Pipeline"):
        M.family_of_index(index)
    with pytest.raises(TextinvError, match="Unsupported model family"):
        M.family_of_index({"_class_name": "FluxPipeline"})


def test_family_and_prediction_type_come_from_the_model(model_dirs):
    for family, prediction in (("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")):
        comp = load(model_dirs[family])
        assert comp.family == family and comp.prediction_type == prediction
        assert comp.native_resolution == 64


def test_v_prediction_loss_uses_the_velocity_target(model_dirs):
    comp = load(model_dirs["sd2"])
    R.setup_rows(comp, TOKEN, ["toy"], 1)
    batch = fixed_batch(comp, ids_for(comp, f"a {TOKEN}", 1))
    with torch.no_grad():
        loss = forward_loss(comp, batch, torch.float32)
        cond, _ = encode_text(comp, batch.ids)
        noisy = comp.scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = comp.unet(noisy, batch.timesteps, cond).sample
        v = comp.scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, v))
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(pred, batch.noise))


def test_missing_model_names_the_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextinvError) as e:
        M.load_text_side("nobody-here/no-such-model-xyz")
    assert "--model" in str(e.value) and "--model tiny" in str(e.value)
