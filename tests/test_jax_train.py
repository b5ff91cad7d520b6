"""The JAX backend trains, resumes and samples on the tiny models, on the CPU, offline:
events, run folder and files as the torch backend writes them; bit-identical resume (plain,
with gradient accumulation; Ctrl-C is in test_backend_contract); stray checkpoints ignored; SD 2.x (v-prediction,
clip_h); DDIM and DPM-Solver++ 2M sampling with a multi-vector embedding; bad input refused
before a run folder exists; and `textinv train/sample --backend jax` through the CLI.

Compiling dominates (each distinct step shape is one XLA compile), so the runs share shapes
(batch 1, one vector) wherever a test allows, and XLA's optimisation passes are switched off
for the module: they would double every compile to speed up steps these tests barely run.
"""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from tests.support.training import (TOKEN, assert_same, crash_after, final_vectors,
                                    run_all as run_on, train_spec)
from textinv_cli.engine import plugins
from textinv_cli.engine import runs
from textinv_cli.engine.loop import is_log_step
from textinv_cli.engine.spec import EmbeddingRef, SampleRequest, TrainSpec
from textinv_cli.engine.stop import StopFlag
from textinv_cli.errors import TextinvError
from textinv_cli.formats import read_embedding
from textinv_cli.formats.safetensors_io import load_safetensors
from textinv_cli.registry.store import Registry

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("transformers")

from textinv_jax.backend import JaxBackend  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def tiny(tiny_model, demo_images):
    return {"data": demo_images, "sd1": tiny_model("sd1"), "sd2": tiny_model("sd2")}


def make_spec(tiny, tmp_path, family="sd1", name="run", **kw) -> TrainSpec:
    return train_spec(tiny["data"], tiny[family], tmp_path / name, **{"backend": "jax", **kw})


def run_all(spec, resume=None):
    return run_on(JaxBackend(), spec, resume)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """Uninterrupted runs (6 steps, checkpoints every 3) that the resumed runs must equal."""
    return {accum: run_all(make_spec(tiny, tmp_path_factory.mktemp("ref"), grad_accum=accum, checkpoint_every=3))
            for accum in (1, 2)}


@pytest.mark.slow
def test_sd1_end_to_end(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    (data / "notes.md").write_text("not an image")
    # one vector, batch 1: the step compiled here serves the resume and CLI tests too
    spec = make_spec(tiny, tmp_path, data_dir=str(data), steps=4, save_every=2, checkpoint_every=2,
                     keep_checkpoints=1, validate=[f"a photo of {TOKEN}"], validate_every=4, validate_steps=3)
    events = run_all(spec)
    kinds = [e.kind for e in events]
    assert kinds == ["started", "warning",
                     "progress", "progress", "snapshot", "checkpoint",
                     "progress", "progress", "snapshot", "checkpoint", "validation", "finished"]
    run = tmp_path / "run"
    assert events[0].data == {"run_dir": str(run), "device": "cpu", "family": "sd1", "model": spec.model,
                              "images": 4, "ignored": ["notes.md"], "total_steps": 4, "start_step": 0,
                              "resumed_from": None}
    assert "notes.md" in events[1].data["message"]
    progress = [e.data for e in events if e.kind == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["total"] == 4 and p["lr"] == pytest.approx(5e-2) and np.isfinite(p["loss"]) for p in progress)

    fin = events[-1].data
    assert fin["step"] == 4 and fin["token"] == TOKEN and fin["embedding_path"] == str(run / runs.FINAL)
    assert set(fin["vectors"]) == {"clip_l"} and fin["vectors"]["clip_l"].shape == (1, 32)
    assert fin["meta"]["step"] == "4" and fin["meta"]["trained_with"] == "textinv jax"
    emb = read_embedding(run / runs.FINAL)
    assert emb.token == TOKEN and np.array_equal(emb.vectors["clip_l"], fin["vectors"]["clip_l"])
    raw, _ = load_safetensors((run / runs.FINAL).read_bytes())
    assert list(raw) == [TOKEN] and raw[TOKEN].shape == (1, 32)  # diffusers' learned_embeds layout
    snap = read_embedding(run / "snapshots" / "step-000002.safetensors")
    assert not np.array_equal(snap.vectors["clip_l"], emb.vectors["clip_l"])  # training moved the rows
    assert [s for s, _ in runs.complete_checkpoints(run)] == [4]  # keep_checkpoints=1
    state, _ = load_safetensors((runs.checkpoint_dir(run, 4) / "state.safetensors").read_bytes())
    assert sorted(state) == ["adam.clip_l.exp_avg", "adam.clip_l.exp_avg_sq", "adam.clip_l.step",
                             "rows.clip_l"]  # the torch backend's keys
    assert state["adam.clip_l.step"].reshape(-1).tolist() == [4]
    assert np.array_equal(state["rows.clip_l"], emb.vectors["clip_l"])
    (png,) = events[-2].data["paths"]
    assert png == str(run / "samples" / "step-000004-0.png")
    with Image.open(png) as im:
        assert im.size == (64, 64) and np.asarray(im).std() > 0
    assert TrainSpec.load(run) == spec
    lines = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == kinds
    assert lines[-1]["vectors"] == {"clip_l": [1, 32]}


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_bit_identical(tiny, tmp_path, reference, accum):
    spec = make_spec(tiny, tmp_path, grad_accum=accum, checkpoint_every=3)
    crash_after(JaxBackend(), spec, 3)
    run = tmp_path / "run"
    assert not (run / runs.FINAL).exists()
    if accum == 1:  # things resume must never pick
        ck = run / runs.CHECKPOINTS
        (ck / "checkpoint-foo").mkdir()
        (ck / "checkpoint-foo" / runs.COMPLETE).write_text("{}")
        (ck / ".step-000005.tmp").mkdir()
        (ck / "step-000004").mkdir()  # renamed but never marked complete
    events = run_all(spec, resume=run)
    assert events[0].data["start_step"] == 3
    assert events[0].data["resumed_from"] == str(runs.checkpoint_dir(run, 3))
    assert [e.data["step"] for e in events if e.kind == "progress"] == [4, 5, 6]
    assert_same(final_vectors(events), final_vectors(reference[accum]))
    # the test can fail: training moves the rows, and accumulation changes where they go
    state, _ = load_safetensors((runs.checkpoint_dir(run, 3) / "state.safetensors").read_bytes())
    assert not np.array_equal(state["rows.clip_l"], final_vectors(events)["clip_l"])
    assert not np.array_equal(final_vectors(reference[1])["clip_l"], final_vectors(reference[2])["clip_l"])


def test_sd2_trains_two_clip_h_vectors_with_v_prediction(tiny, tmp_path):
    events = run_all(make_spec(tiny, tmp_path, "sd2", steps=2, vectors=2, init=["red", "toy"]))
    assert events[0].data["family"] == "sd2"
    vec = final_vectors(events)
    assert set(vec) == {"clip_h"} and vec["clip_h"].shape == (2, 48)
    emb = read_embedding(tmp_path / "run" / runs.FINAL)
    assert emb.family == "sd2" and np.array_equal(emb.vectors["clip_h"], vec["clip_h"])


def test_resume_without_checkpoint_starts_over_with_a_warning(tiny, tmp_path):
    spec = make_spec(tiny, tmp_path, steps=1)
    run = tmp_path / "run"
    run.mkdir()
    spec.save(run)
    (run / runs.CHECKPOINTS / "step-000001").mkdir(parents=True)  # incomplete: no marker
    events = run_all(spec, resume=run)
    assert events[0].data["start_step"] == 0 and events[0].data["resumed_from"] is None
    assert events[1].kind == "warning" and "no complete checkpoint" in events[1].data["message"]
    assert events[-1].kind == "finished"


def _bad(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    return [
        ({"data_dir": str(tmp_path / "missing")}, "is not a folder"),
        ({"data_dir": str(empty)}, "holds no images"),
        ({"token": "toy"}, "already in the clip_l tokenizer's vocabulary"),
        ({"token": "<cat toy>"}, "without spaces"),
        ({"init": ["cats"]}, "init word 'cats' is 3 tokens; with --vectors 1"),
        ({"precision": "fp16"}, "--precision fp16 needs a GPU"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"lr": -1.0}, "--lr must be a positive learning rate"),
        ({"flip_p": 2.0}, "--flip-p must be a probability"),
        ({"resolution": 60}, "--resolution must be a positive multiple of 8"),
        ({"lr_schedule": "sometimes"}, "Unknown --lr-schedule"),
        ({"attention": "xformers"}, "xformers is a PyTorch library"),
        ({"num_processes": 2}, "--num-processes 2 is for --backend torch"),
        ({"extra": {"devices": 9}}, "this machine has 1 JAX device"),
        ({"model": str(tmp_path / "nowhere")}, "nowhere"),
    ]


def test_bad_input_is_refused_before_a_run_folder_exists(tiny, tmp_path):
    for i, (change, message) in enumerate(_bad(tiny, tmp_path)):
        spec = make_spec(tiny, tmp_path, name=f"run{i}", **change)
        with pytest.raises(TextinvError) as e:
            run_all(spec)
        assert message in str(e.value), (change, str(e.value))
        assert not (tmp_path / f"run{i}").exists(), change
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("x")
    with pytest.raises(TextinvError, match="already exists"):
        run_all(make_spec(tiny, tmp_path, name="taken"))


def parameters(path) -> str:
    with Image.open(path) as im:
        return im.info["parameters"]


def test_sample_ddim_and_dpm_with_a_multi_vector_embedding(tiny, tmp_path):
    rng = np.random.default_rng(0)
    ref = EmbeddingRef(token="<x>", vectors={"clip_l": rng.standard_normal((2, 32)).astype(np.float32)},
                       short_hash="0123456789ab", name="x")
    images = {}
    # a direct caller may name the sampler as A1111 does ("DPM++ 2M") or by its key ("ddim")
    for scheduler, sampler, given in (("ddim", "DDIM", "ddim"), ("dpm++", "DPM++ 2M", "DPM++ 2M")):
        request = SampleRequest(prompt="a photo of <x>", model=str(tiny["sd1"]), out_dir=str(tmp_path / scheduler),
                                embeddings=[ref], negative="blurry", n=2, steps=3, scheduler=given, seed=7)
        events = list(JaxBackend().sample(request))
        kinds = [e.kind for e in events]
        assert kinds == ["started"] + ["progress"] * 3 + ["sample"] * 2 + ["finished"]  # one batch of 2
        started = events[0].data
        assert started["sampler"] == sampler and started["total"] == 6 and started["device"] == "cpu"
        assert started["embeddings"] == [{"name": "x", "token": "<x>", "vectors": 2}]
        assert [e.data["done"] for e in events if e.kind == "progress"] == [2, 4, 6]  # image-steps
        samples = [e.data for e in events if e.kind == "sample"]
        assert [s["seed"] for s in samples] == [7, 8] and all(s["width"] == s["height"] == 64 for s in samples)
        text = parameters(samples[0]["path"])
        assert text.startswith("a photo of <x>\nNegative prompt: blurry\n")
        assert f"Sampler: {sampler}" in text and "Seed: 7" in text and "TI hashes: \"x: 0123456789ab\"" in text
        pics = [np.asarray(Image.open(s["path"])) for s in samples]
        assert pics[0].shape == (64, 64, 3) and not np.array_equal(pics[0], pics[1])  # seed + i
        images[scheduler] = pics[0]
    assert not np.array_equal(images["ddim"], images["dpm++"])
    # image 0 (seed 7) rendered alone matches it rendered in a batch of 2, up to float noise
    again = SampleRequest(prompt="a photo of <x>", model=str(tiny["sd1"]), out_dir=str(tmp_path / "again"),
                          embeddings=[ref], negative="blurry", n=1, steps=3, scheduler="ddim", seed=7)
    path = [e.data["path"] for e in JaxBackend().sample(again) if e.kind == "sample"][0]
    diff = np.abs(np.asarray(Image.open(path)).astype(int) - images["ddim"].astype(int))
    assert diff.max() <= 3


def test_sample_refusals(tiny, tmp_path):
    def request(**kw):
        base = dict(prompt="a photo of <x>", model=str(tiny["sd1"]), out_dir=str(tmp_path / "out"), steps=2)
        return SampleRequest(**{**base, **kw})

    with pytest.raises(TextinvError, match=r"DPM\+\+ 2M Karras or DDIM, not 'Heun'"):
        list(JaxBackend().sample(request(scheduler="heun")))
    wide = EmbeddingRef(token="<x>", vectors={"clip_h": np.zeros((1, 48), np.float32)})
    with pytest.raises(TextinvError, match="Stable Diffusion 2.x embedding"):
        list(JaxBackend().sample(request(embeddings=[wide])))
    with pytest.raises(TextinvError, match="fp16 needs a GPU"):
        list(JaxBackend().sample(request(precision="fp16")))
    assert not (tmp_path / "out").exists()


def test_cli_train_and_sample_with_the_jax_backend(cli, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with plugins.registered("jax", JaxBackend):
        listing = cli("backends", "--json")
        (info,) = [b for b in json.loads(listing.stdout) if b["name"] == "jax"]
        assert info["available"] and info["devices"] == ["cpu:0 cpu"]
        result = cli("train", tiny["data"], "--token", "<x>", "--init", "toy", "--backend", "jax",
                     "--model", tiny["sd1"], "--steps", "3", "--seed", "1")
        assert result.exit_code == 0, result.output
        entry = Registry().get("x")
        assert entry is not None and entry.token == "<x>" and entry.source == "trained" and entry.family == "sd1"
        assert entry.origin["config"]["backend"] == "jax"
        result = cli("sample", "a photo of <x>", "--backend", "jax", "--model", tiny["sd1"], "--steps", "3",
                     "--scheduler", "dpm++", "-o", tmp_path / "pics")
        assert result.exit_code == 0, result.output
        (png,) = (tmp_path / "pics").iterdir()
        assert "Sampler: DPM++ 2M" in parameters(png)


def test_stop_flag_and_log_steps():
    flag = StopFlag()
    flag.checkpointing = True
    for _ in range(5):
        flag(signal.SIGINT, None)  # never raises while a checkpoint is being written
    assert flag.requested
    flag.checkpointing = False
    flag(signal.SIGINT, None)
    flag(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        flag(signal.SIGINT, None)
    assert [s for s in range(1, 201) if is_log_step(s, 200)] == list(range(4, 201, 4))
