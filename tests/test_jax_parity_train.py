"""The JAX backend computes what the torch backend computes.

On the tiny SD 1.x model, from the same spec: the same BatchPlan draws give the same
training loss (within 1e-4) and the same gradient of the rows for a whole optimizer step
with gradient accumulation; three training steps end at the same rows; an embedding the
JAX backend trains loads in diffusers (`load_textual_inversion` of the file it wrote) and
samples through the torch backend; and the JAX sampler (DDIM, DPM-Solver++ 2M, guidance,
a multi-vector embedding) renders diffusers' picture from the same starting latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.training import TOKEN, train_spec
from textinv_cli.engine.captions import captions_for, find_images
from textinv_cli.engine.quiet_libraries import quiet
from textinv_cli.engine.spec import EmbeddingRef, SampleRequest, TrainSpec
from textinv_cli.families import FAMILY_SLOTS

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
jax = pytest.importorskip("jax")
pytest.importorskip("optax")

from textinv_jax import loading as jloading  # noqa: E402
from textinv_jax.clip import split_frozen  # noqa: E402
from textinv_jax.layers import split  # noqa: E402
from textinv_jax import sampling as jsampling  # noqa: E402
from textinv_jax import step as jstep  # noqa: E402
from textinv_jax import tokens as jtokens  # noqa: E402
from textinv_jax import trainer as jtrainer  # noqa: E402
from textinv_jax.backend import JaxBackend  # noqa: E402
from textinv_torch import data as tdata  # noqa: E402
from textinv_torch import loading as tloading  # noqa: E402
from textinv_torch import tokens as ttokens  # noqa: E402
from textinv_torch import sampling as tsampling  # noqa: E402
from textinv_torch import step as ttrainer  # noqa: E402
from textinv_torch.backend import TorchBackend  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def settings():
    """One torch thread (tiny kernels, busy 2-core machine) and quick XLA compiles."""
    threads, fast = torch.get_num_threads(), jax.config.values["jax_disable_most_optimizations"]
    torch.set_num_threads(1)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    torch.set_num_threads(threads)
    jax.config.update("jax_disable_most_optimizations", fast)


@pytest.fixture(scope="module")
def tiny(tiny_model, demo_images):
    return {"data": demo_images, "sd1": tiny_model("sd1"), "sdxl": tiny_model("sdxl")}


def make_spec(tiny, root: Path, name: str, **kw) -> TrainSpec:
    # batch 1 x 2 micro-steps: the accumulation path, with the shapes test_jax_train compiles
    return train_spec(tiny["data"], tiny["sd1"], root / name, **{"steps": 3, "grad_accum": 2, "deterministic": True,
                                                                "device": "cpu", **kw})


def torch_first_step(spec: TrainSpec) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and rows' gradient of optimizer step 0, built the way the torch trainer builds it."""
    cpu = torch.device("cpu")
    images, _ = find_images(Path(spec.data_dir))
    captions = captions_for(images, spec.token, spec.property, spec.captions)
    with quiet():
        comp = tloading.load_text_side(spec.model)
        comp.prepared = ttokens.prepare_rows(comp, spec.token, spec.init, spec.vectors)
        tloading.load_image_side(comp)
        rows = ttokens.install_rows(comp, comp.prepared, cpu)
        tables, choices, _ = ttokens.tokenize_captions(comp, captions, spec.token, spec.vectors)
        cache = tdata.latent_cache(images, comp.vae, 64, spec.center_crop, spec.flip_p, cpu)
    sampler = ttrainer.Sampler(spec, cache, tables, choices, comp.scaling_factor,
                               comp.scheduler.config.num_train_timesteps, cpu)
    total = 0.0
    for micro in range(spec.grad_accum):
        loss = ttrainer.forward_loss(comp, sampler.batch(0, micro), torch.float32) / spec.grad_accum
        loss.backward()
        total += loss.item()
    return total, {slot: r.grad.numpy().copy() for slot, r in rows.items()}


def jax_first_step(spec: TrainSpec) -> tuple[float, dict[str, np.ndarray]]:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    s = jtrainer.prepare(spec)
    repl, sharded = NamedSharding(s.mesh, P()), NamedSharding(s.mesh, P(None, "data"))
    rows = dict(s.inits)
    st = jtrainer.put((rows, jstep.opt_state(spec, rows)), repl)
    texts = {slot: split_frozen(t.model)[1] for slot, t in zip(s.slots, s.texts)}
    frozen = jtrainer.put(s.frozen(texts, split(s.image.unet)[1]), repl)
    batch = jtrainer.put(jtrainer.step_batch(s, jtrainer.batch_plan(s), 0), sharded)
    _, metrics = jstep.train_step(st, frozen, batch, np.float32(spec.lr), np.float32(np.inf), cfg=s.config())
    return float(metrics["loss"]), {slot: np.asarray(g) for slot, g in metrics["grads"].items()}


@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_loss_and_gradient_match_torch(tiny, tmp_path, family):
    # SDXL: both encoders' rows, penultimate states concatenated, pooled text and size/crop ids
    spec = make_spec(tiny, tmp_path, "unused", model=str(tiny[family]))
    t_loss, t_grads = torch_first_step(spec)
    j_loss, j_grads = jax_first_step(spec)
    assert sorted(j_grads) == sorted(t_grads) == sorted(FAMILY_SLOTS[family])  # jax sorts dict keys
    for slot, t_grad in t_grads.items():
        j_grad = j_grads[slot]
        print(f"\n{family} loss torch {t_loss:.7f} jax {j_loss:.7f} |diff| {abs(t_loss - j_loss):.2e}; {slot} "
              f"gradient max |diff| {np.abs(t_grad - j_grad).max():.2e} of max |g| {np.abs(t_grad).max():.2e}")
        assert np.abs(t_grad).max() > 0  # the rows get a gradient at all
        np.testing.assert_allclose(j_grad, t_grad, rtol=0, atol=1e-3 * np.abs(t_grad).max())
    assert abs(t_loss - j_loss) < 1e-4


@pytest.fixture(scope="module")
def three_steps(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    return {"torch": list(TorchBackend().train(make_spec(tiny, root, "torch"))),
            "jax": list(JaxBackend().train(make_spec(tiny, root, "jax", backend="jax")))}


def test_three_steps_match_torch(three_steps, tiny):
    losses = {k: [e.data["loss"] for e in ev if e.kind == "progress"] for k, ev in three_steps.items()}
    rows = {k: ev[-1].data["vectors"]["clip_l"] for k, ev in three_steps.items()}
    text = jloading.load_text_side(Path(tiny["sd1"]))
    init = jtokens.init_rows(text.tokenizer, text.model.token_table, ["toy"], 1)
    diff = np.abs(rows["torch"] - rows["jax"]).max()
    print(f"\nlosses torch {losses['torch']} jax {losses['jax']}; final rows max |diff| {diff:.2e}")
    np.testing.assert_allclose(losses["jax"], losses["torch"], rtol=0, atol=1e-4)
    assert diff < 1e-4
    assert np.abs(rows["jax"] - init).max() > 100 * diff  # the rows moved much further than they disagree


def test_a_jax_embedding_loads_in_diffusers_and_samples_in_torch(three_steps, tiny, tmp_path):
    fin = three_steps["jax"][-1].data
    pipe, _ = tsampling.load_pipeline(str(tiny["sd1"]))
    with quiet(future_warnings=False):
        pipe.load_textual_inversion(fin["embedding_path"])  # the file the JAX run wrote
    token_id = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    row = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().numpy()
    np.testing.assert_array_equal(row, fin["vectors"]["clip_l"][0])
    request = SampleRequest(prompt=f"a photo of {TOKEN}", model=str(tiny["sd1"]), out_dir=str(tmp_path / "out"),
                            embeddings=[EmbeddingRef(token=TOKEN, vectors=fin["vectors"], name="cat-toy")], steps=2)
    events = list(tsampling.sample(request))
    assert events[-1].kind == "finished" and Path(events[-1].data["paths"][0]).is_file()


@pytest.mark.parametrize("family, scheduler, negative", [("sd1", "ddim", "blurry"), ("sd1", "dpm++", "blurry"),
                                                      ("sdxl", "ddim", ""), ("sdxl", "dpm++", "blurry")])
def test_sampler_renders_diffusers_picture(tiny, family, scheduler, negative):
    # SDXL: both encoders' rows, pooled text, size ids; its empty negative is zeros
    # (force_zeros_for_empty_prompt), a written one goes through both encoders
    rng = np.random.default_rng(1)
    widths = {"clip_l": 32, "clip_g": 64} if family == "sdxl" else {"clip_l": 32}
    vectors = {slot: (rng.standard_normal((2, w)) * 0.5).astype(np.float32) for slot, w in widths.items()}
    ref = EmbeddingRef(token="<x>", vectors=vectors)
    noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)  # NCHW, as diffusers takes latents
    prompt, steps, guidance = "a photo of <x>", 3, 7.5

    pipe, info = tsampling.load_pipeline(str(tiny[family]))
    ttokens.add_embeddings(pipe, [ref], info)
    pipe.scheduler = tsampling.make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # as the torch backend calls it: an empty negative is None
        want = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                    latents=torch.from_numpy(noise), output_type="np").images[0]

    folder = Path(tiny[family])
    texts = jloading.load_text_sides(folder, family)
    rows, firsts = jtokens.add_embeddings(texts, FAMILY_SLOTS[family], [ref], family, family)
    image = jloading.load_image_side(folder)
    request = SampleRequest(prompt=prompt, negative=negative, model=str(folder), out_dir="", guidance=guidance,
                            embeddings=[ref])
    context, pooled = jsampling.prompt_states(folder, texts, rows, firsts, request, jax.numpy.float32, jax.device_put)
    nets = {name: (graph, jax.device_put(weights)) for name, (graph, weights) in (("unet", split(image.unet)),
                                                                                  ("vae", split(image.vae)))}
    gen = jsampling.denoise(nets, context,
                            plan=jsampling.make_plan(scheduler, image.scheduler_config, steps), guidance=guidance,
                            noise=noise.transpose(0, 2, 3, 1), dtype=jax.numpy.float32, pooled=pooled,
                            time_ids=jsampling.sdxl_time_ids(64, 64))
    done = []
    try:
        while True:
            done.append(next(gen))
    except StopIteration as stop:
        got = stop.value
    assert done == [0, 1, 2] and got.shape == want.shape == (64, 64, 3)
    diff = np.abs(got - want).max()
    print(f"\n{family} {scheduler}: max |pixel diff| {diff:.2e} (pixels in [0, 1]; spread {want.std():.3f})")
    assert diff < 2e-3 and want.std() > 0.01
