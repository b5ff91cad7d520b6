"""Training runs as the tests build and drive them: one spec builder with the tiny-run
defaults every training test shares, and the few ways a test ends a run (to the end, a
crash right after a checkpoint, Ctrl-C) with the checks on what comes out."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

TOKEN = "<cat-toy>"


def train_spec(data, model, run_dir, /, **kw):
    """A TrainSpec for a tiny run of `model` on the images in `data`, written to `run_dir`:
    6 steps at a learning rate high enough to move the rows visibly, a fixed seed and no
    checkpoints unless asked. Keywords override any field (model and data_dir too)."""
    from textinv_cli.engine.spec import TrainSpec

    base = dict(data_dir=str(data), token=TOKEN, init=["toy"], model=str(model), run_dir=str(run_dir),
                steps=6, checkpoint_every=0, seed=3, lr=5e-2)
    return TrainSpec(**{**base, **kw})


def run_all(backend, spec, resume: Path | None = None) -> list:
    """Every event of the run (or of its resumption from the run folder `resume`)."""
    return list(backend.train(spec, resume))


def crash_after(backend, spec, step: int) -> None:
    """Run until the checkpoint at `step` is written, then drop the generator: what a crash
    (or a kill) right after that checkpoint leaves on disk."""
    gen = backend.train(spec)
    for ev in gen:
        if ev.kind == "checkpoint" and ev.data["step"] == step:
            break
    gen.close()


def ctrl_c_at(backend, spec, step: int) -> list:
    """The run's events with SIGINT (Ctrl-C) sent to this process once `step` is reported."""
    events = []
    for ev in backend.train(spec):
        events.append(ev)
        if ev.kind == "progress" and ev.data["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return events


def final_vectors(events) -> dict:
    assert events[-1].kind == "finished", [e.kind for e in events]
    return events[-1].data["vectors"]


def assert_same(a: dict, b: dict) -> None:
    """Bit-identical float32 rows, slot by slot."""
    assert a.keys() == b.keys()
    for slot in a:
        assert a[slot].dtype == np.float32 and np.array_equal(a[slot], b[slot]), slot
