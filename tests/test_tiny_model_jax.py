"""Tiny models through the plugin hook: the JAX backend builds them with numpy alone.

The JAX-written folder has the torch-written one's configs, tensor names and shapes; both
backends' loaders read it; the core finds a builder through the plugins (the torch backend
hidden, the JAX one builds); and in a process where torch and diffusers cannot be imported
`textinv tiny-model --family sdxl` and `textinv train --backend jax` on the default
`--model tiny` work (a jax-only install runs the demo's path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from textinv_cli.engine import plugins
from textinv_cli.formats.safetensors_io import load_file
from textinv_cli.models.resolve import make_tiny_model
from textinv_cli.models.tiny import FAMILIES, read_tiny_info

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("transformers")

from textinv_jax.clip import load_clip, read_clip_config  # noqa: E402
from textinv_jax.tiny import write_tiny_model  # noqa: E402
from textinv_jax.unet import load_unet, read_unet_config  # noqa: E402
from textinv_jax.vae import load_vae, read_vae_config  # noqa: E402

# What a process without torch sees: `import torch` fails, as it would on a jax-only install.
NO_TORCH = "import sys; sys.modules.update(torch=None, diffusers=None)\n"


@pytest.fixture(scope="module")
def jax_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("jax-tiny")
    return {f: write_tiny_model(base / f, f, seed=0) for f in FAMILIES}


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_jax_backend_loads_its_own_tiny_model(jax_models, family):
    path = jax_models[family]
    assert read_tiny_info(path)["backend"] == "jax"
    encoders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    for sub in encoders:
        model = load_clip(path, read_clip_config(path, sub), sub)
        assert np.isfinite(model.token_table).all()
    load_unet(path, read_unet_config(path))
    load_vae(path, read_vae_config(path))


def test_same_seed_same_files_other_seed_other_weights(jax_models, tmp_path):
    again = write_tiny_model(tmp_path / "again", "sd1", seed=0)
    assert _files(again) == _files(jax_models["sd1"])
    other = write_tiny_model(tmp_path / "other", "sd1", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != (again / unet).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_layout_names_and_shapes_as_the_torch_tiny_model(jax_models, tiny_model, family):
    torch_made = tiny_model(family)
    if read_tiny_info(torch_made)["backend"] != "torch":
        pytest.skip("the torch backend is not installed")
    jax_made = jax_models[family]
    assert sorted(_files(jax_made)) == sorted(_files(torch_made))
    for rel in _files(torch_made):
        if rel.endswith(".safetensors"):
            a, b = load_file(torch_made / rel), load_file(jax_made / rel)
            assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, rel
        elif "tokenizer" in rel:
            assert (torch_made / rel).read_bytes() == (jax_made / rel).read_bytes(), rel


def test_the_torch_backend_loads_a_jax_written_tiny_model(jax_models):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(jax_models["sdxl"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a toy", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_the_core_asks_the_backends_in_order(monkeypatch, tmp_path):
    everyone = plugins.candidates()
    monkeypatch.setattr(plugins, "candidates", lambda: [c for c in everyone if c.name != "torch"])
    built = make_tiny_model(tmp_path / "m", "sd1", seed=3)
    assert read_tiny_info(built) == {**read_tiny_info(built), "backend": "jax", "seed": 3}

    class NoTiny:  # a backend without the capability is passed over, and so is one that refuses
        def probe(self):
            return None

    class Refuses(NoTiny):
        def make_tiny_model(self, out, family, seed):
            raise NotImplementedError

    with plugins.registered("plain", NoTiny), plugins.registered("refuses", Refuses):
        first = make_tiny_model(tmp_path / "n", "sd2", backend="refuses")
        assert read_tiny_info(first)["backend"] == "jax"
    monkeypatch.setattr(plugins, "candidates", lambda: [])
    with pytest.raises(plugins.BackendError, match="needs a backend that can build one"):
        make_tiny_model(tmp_path / "o", "sd1")


@pytest.mark.slow
def test_jax_only_tiny_model_and_training_in_a_process_without_torch(tmp_path, demo_images):
    """The demo's path on a jax-only install: tiny-model, then train on the default tiny model
    (one process for both commands: importing jax twice would double the cost)."""
    env = {**os.environ, "TEXTINV_HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu"}
    commands = [["tiny-model", str(tmp_path / "xl"), "--family", "sdxl"],
                ["train", str(demo_images), "--token", "<x>", "--init", "toy", "--backend", "jax", "--steps", "2",
                 "--run-dir", str(tmp_path / "run"), "--json"]]
    script = NO_TORCH + textwrap.dedent(f"""
        import jax
        jax.config.update("jax_disable_most_optimizations", True)  # compiling dominates; steps are few
        from textinv_cli.cli.app import main
        for argv in {commands!r}:
            try:
                main(argv)
            except SystemExit as e:  # main() always exits
                if e.code:
                    raise
        assert not [m for m in sys.modules if m.startswith("torch") and sys.modules[m] is not None]
    """)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_tiny_info(tmp_path / "xl") == {**read_tiny_info(tmp_path / "xl"), "family": "sdxl", "backend": "jax"}
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events][-2:] == ["finished", "registered"], events[-1]
    assert read_tiny_info(tmp_path / "home" / "models" / "tiny-sd1")["backend"] == "jax"
