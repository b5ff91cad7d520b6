"""The torch backend trains end to end on the tiny models: events, run folder, final file;
SD 2.x (v-prediction, clip_h) and SDXL (clip_l + clip_g, the diffusers pair); exact resume
(plain, with gradient accumulation; Ctrl-C is in test_backend_contract); stray checkpoints ignored; bad input
refused before a run folder exists. Everything runs on the CPU, offline, in seconds.
"""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from tests.support.training import (TOKEN, assert_same, crash_after, final_vectors,
                                    run_all as run_on, train_spec)
from textinv_cli.engine import runs
from textinv_cli.engine.loop import is_log_step
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.engine.stop import StopFlag
from textinv_cli.errors import TextinvError
from textinv_cli.formats import read_embedding

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from textinv_torch.backend import TorchBackend  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny kernels gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    # spinning makes them several times slower. Bit-exactness only needs the same count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model, demo_images):
    return {"data": demo_images, **{f: tiny_model(f) for f in ("sd1", "sd2", "sdxl")}}


def make_spec(tiny, tmp_path, family="sd1", name="run", **kw) -> TrainSpec:
    # bit-exact resume is promised on the CPU, also where a GPU is
    return train_spec(tiny["data"], tiny[family], tmp_path / name, **{"deterministic": True, "device": "cpu", **kw})


def run_all(spec, resume=None):
    return run_on(TorchBackend(), spec, resume)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """Uninterrupted runs (6 steps, checkpoints every 3) that the resumed runs must equal."""
    out = {}
    for accum in (1, 2):
        spec = make_spec(tiny, tmp_path_factory.mktemp("ref"), grad_accum=accum, checkpoint_every=3)
        out[accum] = run_all(spec)
    return out


def test_sd1_end_to_end(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    (data / "notes.md").write_text("not an image")
    Image.new("P", (40, 24), 3).save(data / "palette.gif")  # odd mode and size, still an image
    spec = make_spec(tiny, tmp_path, data_dir=str(data), steps=4, vectors=2, save_every=2, checkpoint_every=2,
                     keep_checkpoints=1, validate=[f"a photo of {TOKEN}"], validate_every=4, validate_steps=2)
    events = run_all(spec)
    kinds = [e.kind for e in events]
    assert kinds == ["started", "warning",
                     "progress", "progress", "snapshot", "checkpoint",
                     "progress", "progress", "snapshot", "checkpoint", "validation", "finished"]
    run = tmp_path / "run"
    started = events[0].data
    assert started == {"run_dir": str(run), "device": "cpu", "family": "sd1", "model": spec.model, "images": 5,
                       "ignored": ["notes.md"], "total_steps": 4, "start_step": 0, "resumed_from": None}
    assert "notes.md" in events[1].data["message"]
    progress = [e.data for e in events if e.kind == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["total"] == 4 and p["lr"] == pytest.approx(5e-2) and np.isfinite(p["loss"]) for p in progress)

    fin = events[-1].data
    assert fin["step"] == 4 and fin["token"] == TOKEN and fin["embedding_path"] == str(run / runs.FINAL)
    assert set(fin["vectors"]) == {"clip_l"} and fin["vectors"]["clip_l"].shape == (2, 32)
    assert fin["meta"]["step"] == "4" and fin["meta"]["learnable_property"] == "object"
    assert fin["meta"]["base_model"] == spec.model

    emb = read_embedding(run / runs.FINAL)
    assert emb.token == TOKEN and np.array_equal(emb.vectors["clip_l"], fin["vectors"]["clip_l"])
    assert emb.meta.get("step") == "4"
    snap = read_embedding(run / "snapshots" / "step-000002.safetensors")
    assert snap.token == TOKEN and not np.array_equal(snap.vectors["clip_l"], emb.vectors["clip_l"])
    assert (run / "snapshots" / "step-000004.safetensors").is_file()
    assert [s for s, _ in runs.complete_checkpoints(run)] == [4]  # keep_checkpoints=1
    (png,) = events[-2].data["paths"]
    assert png == str(run / "samples" / "step-000004-0.png")
    with Image.open(png) as im:
        assert im.size == (64, 64)
    assert TrainSpec.load(run) == spec
    lines = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == kinds
    assert lines[-1]["vectors"] == {"clip_l": [2, 32]}  # shapes only, no arrays in the log


def test_sd2_trains_clip_h_with_v_prediction(tiny, tmp_path):
    events = run_all(make_spec(tiny, tmp_path, "sd2", steps=2))
    assert events[0].data["family"] == "sd2"
    vec = final_vectors(events)
    assert set(vec) == {"clip_h"} and vec["clip_h"].shape == (1, 48)
    emb = read_embedding(tmp_path / "run" / runs.FINAL)
    assert emb.token == TOKEN and emb.family == "sd2" and np.array_equal(emb.vectors["clip_h"], vec["clip_h"])


def test_sdxl_trains_both_encoders_and_writes_the_pair(tiny, tmp_path):
    events = run_all(make_spec(tiny, tmp_path, "sdxl", steps=2, vectors=2, init=["red", "toy"], save_every=2))
    vec = final_vectors(events)
    assert {k: v.shape for k, v in vec.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    run = tmp_path / "run"
    first, second = load_file(run / "learned_embeds.safetensors"), load_file(run / "learned_embeds_2.safetensors")
    assert list(first) == [TOKEN] and list(second) == [TOKEN]
    assert np.array_equal(first[TOKEN], vec["clip_l"]) and np.array_equal(second[TOKEN], vec["clip_g"])
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["step-000002.safetensors", "step-000002_2.safetensors"]  # the same pair, per snapshot


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_bit_identical(tiny, tmp_path, reference, accum):
    spec = make_spec(tiny, tmp_path, grad_accum=accum, checkpoint_every=3)
    crash_after(TorchBackend(), spec, 3)
    run = tmp_path / "run"
    assert not (run / runs.FINAL).exists()
    if accum == 1:  # things resume must never pick
        ck = run / runs.CHECKPOINTS
        (ck / "checkpoint-foo").mkdir()
        (ck / "checkpoint-foo" / runs.COMPLETE).write_text("{}")
        (ck / ".step-000005.tmp").mkdir()
        (ck / "step-000004").mkdir()  # renamed but never marked complete
        (ck / "step-000005.json").write_text("{}")
        (run / ".learned_embeds.safetensors.k2x9_a.tmp").write_bytes(b"half")  # the final write, killed
        (run / ".notes.tmp").write_text("a user's")
    events = run_all(spec, resume=run)
    started = events[0].data
    assert started["start_step"] == 3 and started["resumed_from"] == str(runs.checkpoint_dir(run, 3))
    assert [e.data["step"] for e in events if e.kind == "progress"] == [4, 5, 6]
    assert_same(final_vectors(events), final_vectors(reference[accum]))
    if accum == 1:  # what a killed write leaves is swept on resume; what is not ours stays
        left = sorted(p.name for p in ck.iterdir())
        assert left == ["checkpoint-foo", "step-000003", "step-000005.json", "step-000006"], left
        assert not (run / ".learned_embeds.safetensors.k2x9_a.tmp").exists() and (run / ".notes.tmp").exists()
    # the test can fail: training moves the rows, and accumulation changes where they go
    at_3 = load_file(runs.checkpoint_dir(run, 3) / "state.safetensors")["rows.clip_l"]
    assert not np.array_equal(at_3, final_vectors(events)["clip_l"])
    assert not np.array_equal(final_vectors(reference[1])["clip_l"], final_vectors(reference[2])["clip_l"])


@pytest.mark.parametrize("change", [{"gradient_checkpointing": True}, {"precision": "bf16"}])
def test_memory_and_precision_options_train_the_same_rows(tiny, tmp_path, change):
    events = run_all(make_spec(tiny, tmp_path, steps=3, **change))
    plain = run_all(make_spec(tiny, tmp_path, name="plain", steps=3))
    got, want = final_vectors(events)["clip_l"], final_vectors(plain)["clip_l"]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    if "precision" in change:
        # bf16 weights: the same loss to bf16's precision; Adam's sign-like first steps may
        # still take a near-zero gradient component another way, so compare losses, not rows
        first = [next(e.data["loss"] for e in ev if e.kind == "progress") for ev in (events, plain)]
        assert first[0] == pytest.approx(first[1], rel=2e-2) and first[0] != first[1]
    else:  # recomputing activations changes nothing
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_probe_and_a_torch_free_import():
    import subprocess
    import sys

    info = TorchBackend().probe()
    assert info.name == "torch" and info.available and info.version == torch.__version__
    assert info.devices[-1] == "cpu"
    code = "import sys, textinv_torch.backend; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stop_flag_ignores_presses_while_checkpointing():
    flag = StopFlag()
    flag.checkpointing = True
    for _ in range(5):
        flag(signal.SIGINT, None)  # never raises while a checkpoint is being written
    assert flag.requested
    flag.checkpointing = False
    flag(signal.SIGINT, None)
    flag(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):  # a third press outside checkpointing aborts
        flag(signal.SIGINT, None)


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


def test_log_steps():
    assert [s for s in range(1, 201) if is_log_step(s, 200)] == list(range(4, 201, 4))
    assert [s for s in range(1, 8) if is_log_step(s, 7)] == list(range(1, 8))
    assert is_log_step(103, 103) and not is_log_step(101, 103)


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
        ({"precision": "fp16"}, "--precision bf16 or --precision fp32"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"lr": -1.0}, "--lr must be a positive learning rate"),
        ({"flip_p": 2.0}, "--flip-p must be a probability"),
        ({"resolution": 60}, "--resolution must be a positive multiple of 8"),
        ({"lr_schedule": "sometimes"}, "Unknown --lr-schedule"),
        ({"attention": "xformers"}, "xformers"),
        ({"model": str(tmp_path / "nowhere")}, "--model"),
    ]


def test_bad_input_is_refused_before_a_run_folder_exists(tiny, tmp_path):
    for i, (change, message) in enumerate(_bad(tiny, tmp_path)):
        spec = make_spec(tiny, tmp_path, name=f"run{i}", **change)
        with pytest.raises(TextinvError) as e:
            run_all(spec)
        assert message in str(e.value), (change, str(e.value))
        assert not (tmp_path / f"run{i}").exists(), change


def test_occupied_run_folder_is_refused(tiny, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(TextinvError, match="already exists"):
        run_all(make_spec(tiny, tmp_path))
