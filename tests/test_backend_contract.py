"""The contract every training backend keeps through the run engine, checked once for all:
the event sequence and each event's JSON shape; the run folder (spec.json, events.jsonl,
checkpoints/step-N/, snapshots, learned_embeds.safetensors); resume from a checkpoint gives
the uninterrupted run's rows bit for bit, whatever a kill left half-written; Ctrl-C (the
engine's stop flag) writes a checkpoint, stops, and the run resumes from it.

The backends are the plugin registry's (entry points of `textinv.backends`, plus any in-process
`plugins.register`), so an installed third backend is tested with no change here; one that is
listed but cannot load or run here is skipped with the reason. Everything runs on the CPU with
--deterministic on the session's tiny SD 1.x model, 4 steps of batch 1 at 32 px: one shape, so
a compiling backend (JAX) compiles its step once for the whole module.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.support.training import TOKEN, assert_same, crash_after, ctrl_c_at, final_vectors, run_all, train_spec
from textinv_cli.engine import plugins, runs
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.errors import BackendError
from textinv_cli.formats import read_embedding

STEPS = 4
EVENT_KEYS = {  # the JSON keys of each event a plain one-process run reports, "event" and "time" aside
    "started": {"run_dir", "device", "family", "model", "images", "ignored", "total_steps", "start_step",
                "resumed_from"},
    "progress": {"step", "total", "lr", "loss"},  # a 4-step run reads the loss at every step
    "snapshot": {"step", "path"},
    "checkpoint": {"step", "path"},
    "interrupted": {"step", "checkpoint"},
    "finished": {"step", "embedding_path", "token", "vectors", "meta", "summary"},
}


def _fast(name: str):
    """Settings that only make a backend's tiny runs cheaper, restored after the module."""
    if name == "torch":  # tiny kernels gain nothing from threads on a busy machine
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        return lambda: torch.set_num_threads(before)
    if name == "jax":  # XLA's optimisation passes double each compile for steps barely run
        import jax

        before = jax.config.values["jax_disable_most_optimizations"]
        jax.config.update("jax_disable_most_optimizations", True)
        return lambda: jax.config.update("jax_disable_most_optimizations", before)
    return lambda: None


@pytest.fixture(scope="module", params=[c.name for c in plugins.candidates()])
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend(name):
    try:
        loaded = next(c for c in plugins.candidates() if c.name == name).load()
        info = loaded.probe()
    except BackendError as e:
        pytest.skip(f"{name}: {e}")
    if not info.available:
        pytest.skip(f"{name}: {info.reason}")
    undo = _fast(name)
    yield loaded
    undo()


@pytest.fixture(scope="module")
def make(name, backend, tiny_model, demo_images):
    """make(run_dir, **kw) -> the contract's spec for this backend."""
    model = tiny_model("sd1")
    return lambda run_dir, **kw: train_spec(demo_images, model, run_dir, backend=name,
                                            steps=STEPS, resolution=32, device="cpu", deterministic=True, **kw)


@pytest.fixture(scope="module")
def reference(name, backend, make, tmp_path_factory):
    """One uninterrupted run with snapshots and checkpoints every 2 steps: its events and folder."""
    spec = make(tmp_path_factory.mktemp(f"contract-{name}") / "run", save_every=2,
                checkpoint_every=2, keep_checkpoints=2)
    return spec, run_all(backend, spec)


def test_events_come_in_order_with_their_json_shape(reference):
    spec, events = reference
    kinds = [e.kind for e in events]
    assert kinds == ["started", "progress", "progress", "snapshot", "checkpoint",
                     "progress", "progress", "snapshot", "checkpoint", "finished"]
    for ev in events:
        assert set(ev.data) == EVENT_KEYS[ev.kind], ev.kind
        assert ev.to_json() == {"event": ev.kind, **ev.data}
    run = Path(spec.run_dir)
    assert events[0].data == {"run_dir": str(run), "device": "cpu", "family": "sd1", "model": spec.model, "images": 4,
                              "ignored": [], "total_steps": STEPS, "start_step": 0, "resumed_from": None}
    progress = [e.data for e in events if e.kind == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["total"] == STEPS and p["lr"] == pytest.approx(5e-2) and np.isfinite(p["loss"]) for p in progress)
    assert [(e.kind, e.data["step"]) for e in events if e.kind in ("snapshot", "checkpoint")] == [
        ("snapshot", 2), ("checkpoint", 2), ("snapshot", 4), ("checkpoint", 4)]
    fin = events[-1].data
    assert fin["step"] == STEPS and fin["token"] == TOKEN and fin["embedding_path"] == str(run / runs.FINAL)
    assert set(fin["vectors"]) == {"clip_l"} and fin["vectors"]["clip_l"].dtype == np.float32
    assert fin["vectors"]["clip_l"].shape[0] == 1
    assert fin["meta"]["step"] == str(STEPS) and fin["meta"]["trained_with"] == f"textinv {spec.backend}"
    # events.jsonl: the same events, one JSON object a line, arrays as their shapes
    lines = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [line.pop("event") for line in lines] == kinds
    assert all(isinstance(line.pop("time"), float) for line in lines)
    assert lines[-1]["vectors"] == {"clip_l": list(fin["vectors"]["clip_l"].shape)}
    assert lines[:-1] == [e.data for e in events[:-1]]


def test_the_run_folder_holds_spec_events_checkpoints_snapshots_and_the_embedding(reference):
    spec, events = reference
    run = Path(spec.run_dir)
    assert sorted(p.name for p in run.iterdir()) == [runs.LOCK, "checkpoints", "data.json", "events.jsonl", runs.FINAL,
                                                     "snapshots", "spec.json", "train.log"]
    assert TrainSpec.load(run) == spec
    assert [(s, p.name) for s, p in runs.complete_checkpoints(run)] == [(2, "step-000002"), (4, "step-000004")]
    assert sorted(p.name for p in (run / runs.CHECKPOINTS).iterdir()) == ["step-000002", "step-000004"]
    for _, folder in runs.complete_checkpoints(run):
        assert (folder / runs.COMPLETE).is_file() and len(list(folder.iterdir())) > 1
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step-000002.safetensors",
                                                                     "step-000004.safetensors"]
    final = read_embedding(run / runs.FINAL)
    assert final.token == TOKEN and final.family == "sd1" and final.meta.get("step") == str(STEPS)
    assert_same(final.vectors, final_vectors(events))
    snap = read_embedding(run / "snapshots" / "step-000002.safetensors")
    assert not np.array_equal(snap.vectors["clip_l"], final.vectors["clip_l"])  # training moved the rows


def test_resume_after_a_crash_gives_the_uninterrupted_rows(backend, make, reference, tmp_path):
    _, reference_events = reference
    spec = make(tmp_path / "run", save_every=2, checkpoint_every=2, keep_checkpoints=2)
    crash_after(backend, spec, 2)
    run = tmp_path / "run"
    assert not (run / runs.FINAL).exists()
    ck = run / runs.CHECKPOINTS  # what a kill during the next writes leaves: never picked, swept
    (ck / ".step-000004.tmp").mkdir()
    (ck / "step-000004").mkdir()  # renamed but never marked complete
    (run / ".learned_embeds.safetensors.k2x9_a.tmp").write_bytes(b"half")
    events = run_all(backend, spec, resume=run)
    assert events[0].data["start_step"] == 2 and events[0].data["resumed_from"] == str(runs.checkpoint_dir(run, 2))
    assert [e.data["step"] for e in events if e.kind == "progress"] == [3, 4]
    assert_same(final_vectors(events), final_vectors(reference_events))
    assert not (run / ".learned_embeds.safetensors.k2x9_a.tmp").exists()
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004"]


def test_ctrl_c_writes_a_checkpoint_stops_and_resumes_to_the_same_rows(backend, make, reference, tmp_path):
    _, reference_events = reference
    spec = make(tmp_path / "run")  # checkpoint_every=0: the interrupt writes the only checkpoint
    before = signal.getsignal(signal.SIGINT)
    events = ctrl_c_at(backend, spec, 2)
    run = tmp_path / "run"
    assert [e.kind for e in events] == ["started", "progress", "progress", "interrupted"]
    assert events[-1].data == {"step": 2, "checkpoint": str(runs.checkpoint_dir(run, 2))}
    assert runs.latest_checkpoint(run) == (2, runs.checkpoint_dir(run, 2))
    assert signal.getsignal(signal.SIGINT) is before  # the engine's handler is gone
    assert not (run / runs.FINAL).exists()
    resumed = run_all(backend, spec, resume=run)
    assert resumed[0].data["start_step"] == 2
    assert_same(final_vectors(resumed), final_vectors(reference_events))
