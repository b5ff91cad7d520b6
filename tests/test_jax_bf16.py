"""--precision bf16 on the JAX backend: the frozen weights (both SDXL text encoders and the
UNet) are held in bf16 on the devices, as the torch backend moves its frozen modules to the
compute dtype, while the trainable rows and AdamW's moments stay fp32 through a step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.training import train_spec
from textinv_cli.engine.captions import captions_for, find_images
from textinv_cli.engine.stop import StopFlag

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from textinv_jax.backend import JaxBackend  # noqa: E402


def float_dtypes(tree) -> set[str]:
    return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def test_bf16_freezes_weights_in_bf16_and_trains_fp32_rows(tiny_model, demo_images, tmp_path):
    fast = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        spec = train_spec(demo_images, tiny_model("sdxl"), tmp_path / "run", backend="jax", precision="bf16",
                          steps=1, device="cpu")
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
