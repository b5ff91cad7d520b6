"""`inspect --model` on a single-file checkpoint: the nearest vocabulary tokens are read straight
from the file (one tensor, by seeking; no conversion), and equal what the diffusers folder the
file was written from gives, for the tiny SD 1.x, SDXL (two encoders) and a bf16 file."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
from tests.support.ldm_writer import write_ldm_checkpoint  # noqa: E402

from textinv_cli.embedding import Embedding  # noqa: E402
from textinv_cli.formats import write_embedding  # noqa: E402
from textinv_cli.models.tiny import widths  # noqa: E402


@pytest.mark.parametrize("family, suffix, dtype", [("sd1", ".safetensors", "fp32"), ("sdxl", ".ckpt", "fp16"),
                                                   ("sd1", ".safetensors", "bf16")])
def test_nearest_tokens_from_a_checkpoint_equal_its_folders(cli, tiny_model, tmp_path, textinv_home,
                                                             family, suffix, dtype):
    folder = tiny_model(family)
    checkpoint = write_ldm_checkpoint(folder, tmp_path / f"model{suffix}", dtype=dtype)
    rng = np.random.default_rng(0)
    emb = Embedding(token="<n>", vectors={s: rng.normal(size=(2, w)).astype(np.float32)
                                          for s, w in widths(family).items()})
    write_embedding(emb, tmp_path / "e.safetensors", "kohya")
    by_folder = cli("inspect", tmp_path / "e.safetensors", "--model", folder, "--json")
    by_file = cli("inspect", tmp_path / "e.safetensors", "--model", checkpoint, "--json")
    assert by_folder.exit_code == 0 and by_file.exit_code == 0, by_file.output
    ours, theirs = json.loads(by_file.stdout)["nearest"], json.loads(by_folder.stdout)["nearest"]
    assert sorted(ours) == sorted(widths(family))
    for slot in ours:
        assert [[t["id"] for t in row] for row in ours[slot]] == [[t["id"] for t in row] for row in theirs[slot]]
        assert [[t["token"] for t in row] for row in ours[slot]] == [[t["token"] for t in row] for row in theirs[slot]]
        tolerance = 0 if dtype == "fp32" else 2e-2  # the file's matrix is rounded to fp16/bf16
        assert np.allclose([[t["similarity"] for t in row] for row in ours[slot]],
                           [[t["similarity"] for t in row] for row in theirs[slot]], atol=tolerance)
    assert not (textinv_home / "models" / "checkpoints").exists()  # nothing was converted


def test_a_model_not_on_disk_is_said_not_built(cli, tmp_path, textinv_home):
    emb = Embedding(token="<n>", vectors={"clip_l": np.ones((1, 32), np.float32)})
    write_embedding(emb, tmp_path / "e.safetensors", "kohya")
    r = cli("inspect", tmp_path / "e.safetensors", "--model", "tiny")
    assert r.exit_code == 1 and "is not on disk yet" in r.output
