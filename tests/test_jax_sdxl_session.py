"""An SDXL training session on the JAX backend at --precision bf16 with --clip-skip 2 (the
numbers, and sampling, are test_jax_parity_train's; the conditioning test_clip_skip's): the
frozen weights (both text encoders and the UNet) are held in bf16 on the devices, as the
torch backend moves its frozen modules to the compute dtype, while the trainable rows of
both encoders and AdamW's moments stay fp32 through a step; a validation image records the
Clip skip; the checkpoint is state.py's format with both slots, which the torch backend
restores. One session, one SDXL compile: about 18 s on a busy 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.training import train_spec
from textinv_cli.engine.captions import captions_for, find_images
from textinv_cli.engine.stop import StopFlag

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
pytestmark = pytest.mark.slow  # one SDXL session's compiles: ~14 s

import jax.numpy as jnp  # noqa: E402

from textinv_jax.backend import JaxBackend  # noqa: E402


def float_dtypes(tree) -> set[str]:
    return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def test_sdxl_session_bf16_weights_fp32_rows_validation_and_checkpoint(tiny_model, demo_images, tmp_path):
    fast = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        run = tmp_path / "run"
        spec = train_spec(demo_images, tiny_model("sdxl"), run, backend="jax", precision="bf16", steps=1,
                          device="cpu", clip_skip=2, validate=["a photo of <cat-toy>"], validate_steps=2)
        session = JaxBackend().open_session(spec)
        images, _ = find_images(Path(spec.data_dir))
        session.load(images, captions_for(images, spec.token, spec.property, spec.captions))
        frozen = session.frozen
        assert float_dtypes(frozen["unet"]) == {"bfloat16"}
        assert set(frozen["text_encoders"]) == {"clip_l", "clip_g"}
        assert float_dtypes(frozen["text_encoders"]) == {"bfloat16"}
        # the latent cache, size ids and noise schedule are data, not weights: full precision
        assert float_dtypes([frozen[k] for k in ("mean", "std", "time_ids", "ac")]) == {"float32"}
        before = session.vectors()
        loss = session.step(0, 1e-2, StopFlag(), log=True)
        rows, opt = session.st
        adam = opt.inner_state[0]
        assert float_dtypes(rows) == float_dtypes(adam.mu) == float_dtypes(adam.nu) == {"float32"}
        after = session.vectors()
        assert np.isfinite(loss) and all(np.abs(after[s] - before[s]).max() > 0 for s in ("clip_l", "clip_g"))
        assert after["clip_l"].shape == (1, 32) and after["clip_g"].shape == (1, 64)

        run.mkdir()
        spec.save(run)  # what the engine writes first; the validation PNG's parameters come from it
        (png,) = session.validate(run, 1)
        with Image.open(png) as im:
            assert "Clip skip: 2" in im.info["parameters"] and np.asarray(im).std() > 1  # a picture, not a fill

        # its checkpoint is state.py's format with both slots, in encoder order: the torch
        # backend restores it (rows and moments), and so does this backend
        folder = tmp_path / "checkpoint"
        folder.mkdir()
        for name, data in session.checkpoint_files(1, {"token": spec.token}).items():
            (folder / name).write_bytes(data)
        torch = pytest.importorskip("torch")
        from textinv_torch import state as torch_state

        info, tensors = torch_state.load_checkpoint(folder)
        assert info["slots"] == ["clip_l", "clip_g"]
        rows_t = {s: torch.zeros(after[s].shape, requires_grad=True) for s in info["slots"]}
        opt_t = torch.optim.AdamW(list(rows_t.values()))
        assert torch_state.restore(info, tensors, rows_t, opt_t, spec.token, folder) == 1
        for slot, r in rows_t.items():
            np.testing.assert_array_equal(r.detach().numpy(), after[slot])
            np.testing.assert_array_equal(opt_t.state[r]["exp_avg"].numpy(), np.asarray(adam.mu[slot]))
        assert session.restore(folder) == 1
        assert all(np.array_equal(session.vectors()[s], after[s]) for s in after)
    finally:
        jax.config.update("jax_disable_most_optimizations", fast)
