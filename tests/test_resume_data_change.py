"""resume says when the training data changed since the run started: the result can no longer
match an uninterrupted run (an image added, removed or edited, a caption rewritten)."""

from __future__ import annotations

import shutil

import pytest

from tests.support.training import run_all, train_spec
from textinv_cli.engine.run_files import DATA_FILE, data_change, data_listing


def test_listing_sees_added_removed_and_changed_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for n in ("a", "b"):
        (data / f"{n}.png").write_bytes(b"x" * 10)
    run = tmp_path / "run"
    run.mkdir()
    images = sorted(data.glob("*.png"))
    from textinv_cli.engine.run_files import save_data_listing

    save_data_listing(run, data_listing(images, data))
    assert data_change(run, data_listing(images, data)) is None
    (data / "a.txt").write_text("a <t> caption")  # a caption appears
    (data / "b.png").write_bytes(b"y" * 11)  # an image is edited
    note = data_change(run, data_listing(images, data))
    assert note.startswith("The training data changed since the run started (1 added, 1 changed, e.g. a.txt)")
    assert data_change(tmp_path / "no-run", data_listing(images, data)) is None  # an older run: nothing to compare


def test_resume_after_the_data_changed_warns(tiny_model, demo_images, tmp_path):
    pytest.importorskip("torch")
    from textinv_torch.backend import TorchBackend

    data = tmp_path / "data"
    shutil.copytree(demo_images, data)
    spec = train_spec(data, tiny_model("sd1"), tmp_path / "run", steps=2, checkpoint_every=1, device="cpu")
    first = run_all(TorchBackend(), spec)
    assert (tmp_path / "run" / DATA_FILE).is_file() and not [e for e in first if e.kind == "warning"]
    next(data.glob("*.png")).unlink()
    spec.steps = 3
    events = run_all(TorchBackend(), spec, resume=tmp_path / "run")
    warnings = [e.data["message"] for e in events if e.kind == "warning"]
    assert any("1 removed" in w and "can no longer match" in w for w in warnings), warnings
