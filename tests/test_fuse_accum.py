"""--fuse-accum: a step's grad_accum micro-steps run as one batch, on both backends.

The mean over the fused batch is the mean of the micro-steps' means (equal sizes), so the
loss and the gradient are those of the accumulated step up to float rounding, while each
step makes one UNet pass instead of grad_accum (larger batches, with gradient
accumulation semantics kept).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.training import train_spec
from textinv_cli.engine.spec import TrainSpec


@pytest.fixture(scope="module")
def tiny(tiny_model, demo_images):
    return {"data": demo_images, "sd1": tiny_model("sd1")}


def spec(tiny, tmp_path, name, backend, **kw) -> TrainSpec:
    on_cpu = {"device": "cpu", "threads": 1} if backend == "torch" else {}
    return train_spec(tiny["data"], tiny["sd1"], tmp_path / name, **{"backend": backend, "steps": 4, "grad_accum": 2,
                                                                    **on_cpu, **kw})


def train(backend_name, s):
    if backend_name == "torch":
        from textinv_torch.backend import TorchBackend as Backend
    else:
        jax = pytest.importorskip("jax")
        from textinv_jax.backend import JaxBackend as Backend
    if backend_name == "jax":  # three shapes, three compiles: the fast ones (as tests/test_jax_train.py)
        before = jax.config.values["jax_disable_most_optimizations"]
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            events = list(Backend().train(s, None))
        finally:
            jax.config.update("jax_disable_most_optimizations", before)
    else:
        events = list(Backend().train(s, None))
    assert events[-1].kind == "finished", [e.kind for e in events]
    losses = [e.data["loss"] for e in events if e.kind == "progress" and "loss" in e.data]
    return losses, events[-1].data["vectors"]["clip_l"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_fused_micro_steps_train_what_accumulation_trains(tiny, tmp_path, backend):
    loss_acc, rows_acc = train(backend, spec(tiny, tmp_path, "acc", backend))
    loss_fused, rows_fused = train(backend, spec(tiny, tmp_path, "fused", backend, fuse_accum=True))
    assert len(loss_acc) >= 2
    np.testing.assert_allclose(loss_fused, loss_acc, rtol=1e-4)
    np.testing.assert_allclose(rows_fused, rows_acc, rtol=1e-4, atol=1e-5)
