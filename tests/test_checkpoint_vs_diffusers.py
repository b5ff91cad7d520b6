"""The independent check of the LDM -> diffusers mapping: diffusers' own single-file loader.

1. Tiny files: `StableDiffusion(XL)Pipeline.from_single_file(file, config=<tiny folder>,
   local_files_only=True)` (offline: the configs come from the folder) loads the same LDM
   file; every tensor of every component must equal textinv's conversion, which diffusers
   also loads as a folder (from_pretrained).
2. Real architectures (no real weights here): the plan for SD 1.x, SD 2.x and SDXL base,
   fed to diffusers' converters as meta tensors under the LDM names, comes out under the
   same diffusers names and shapes; and the shipped configs build models (on the meta
   device) holding exactly the planned tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from tests.support.ldm_writer import write_ldm_checkpoint  # noqa: E402
from textinv_cli.models.checkpoints import convert  # noqa: E402
from textinv_cli.models.checkpoints.architectures import ARCHITECTURES, with_prediction  # noqa: E402
from textinv_cli.models.checkpoints.plan import WEIGHT_FILES, model_plan  # noqa: E402

HF_NAMES = ["cond_stage_model.transformer.text_model.x", "conditioner.embedders.0.transformer.text_model.x"]


def _saved_names(module, component: str) -> dict:
    """A module's state dict under the names its files use (transformers 5's CLIPTextModel
    drops the `text_model.` level in memory, not on disk)."""
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    if component.startswith("text_encoder") and not any(k.startswith("text_model.") for k in sd):
        sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("family,dtype,suffix", [("sd1", "fp32", ".safetensors"), ("sd2", "fp32", ".ckpt"),
                                                 ("sdxl", "fp16", ".safetensors")])
def test_diffusers_single_file_loader_agrees(tiny_model, tmp_path, family, dtype, suffix):
    folder = tiny_model(family)
    src = write_ldm_checkpoint(folder, tmp_path / f"m{suffix}", dtype, ema=True)
    ours = convert.prepare(src).folder
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    theirs = cls.from_single_file(str(src), config=str(folder), local_files_only=True)
    loaded = cls.from_pretrained(str(ours), local_files_only=True)  # our configs load as they are
    assert loaded.scheduler.config.prediction_type == theirs.scheduler.config.prediction_type
    for component, rel in WEIGHT_FILES.items():
        module = getattr(theirs, component, None)
        if module is None:
            assert not (ours / component).exists()
            continue
        expected = _saved_names(module, component)
        got = load_file(str(ours / rel))
        assert set(got) == set(expected), (component, sorted(set(got) ^ set(expected))[:5])
        assert {k: str(v.dtype) for k, v in got.items()} == {k: f"torch.{dict(fp32='float32', fp16='float16')[dtype]}"
                                                             for k in got}  # the file's dtype kept
        for key, t in got.items():
            assert torch.equal(t.to(expected[key].dtype), expected[key]), (component, key)
        from_folder = _saved_names(getattr(loaded, component), component)
        assert all(torch.equal(from_folder[k].to(t.dtype), t) for k, t in got.items()), component


def _natural_source_shape(move) -> tuple:
    # What a real file stores: proj_in/proj_out as its UNet config says (diffusers' converter
    # renames them, the model reshapes on load), the VAE's attention as 1x1 convs.
    return tuple(move.shape) if ".proj_" in move.src else move.source_shapes()[0]


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if not a.tiny], ids=lambda a: a.name)
def test_real_architectures_match_diffusers_converters(arch):
    from diffusers.loaders import single_file_utils as sfu

    comps = with_prediction(arch, "v" if arch.family == "sd2" else "epsilon")
    plan = model_plan(arch, HF_NAMES)
    for component, moves in plan.components.items():
        ckpt = {m.src: torch.empty(_natural_source_shape(m), device="meta") for m in moves}
        config = comps[component][2]
        if component == "unet":
            out = sfu.convert_ldm_unet_checkpoint(ckpt, config)
        elif component == "vae":
            out = sfu.convert_ldm_vae_checkpoint(ckpt, config)
        else:
            text = next(t for t in arch.texts if t.component == component)
            if text.layout == "hf":
                out = sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix=text.prefix)
            else:
                model = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
                out = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=text.prefix)
        theirs = {k: tuple(v.shape) for k, v in out.items()}
        ours = {m.dst: _natural_source_shape(m) if ".proj_" in m.src else tuple(m.shape) for m in moves}
        assert theirs == ours, (arch.name, component, sorted(set(theirs) ^ set(ours))[:5])


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_shipped_configs_build_models_holding_exactly_the_plan(arch):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    comps = with_prediction(arch, "epsilon")
    plan = model_plan(arch, HF_NAMES)
    for component, moves in plan.components.items():
        library, cls, config = comps[component]
        with init_empty_weights():
            if library == "diffusers":
                model = getattr(diffusers, cls).from_config(config)
            else:
                text_config = CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
                model = (CLIPTextModelWithProjection if cls.endswith("Projection") else CLIPTextModel)(text_config)
        held = {k: tuple(v.shape) for k, v in _saved_names(model, component).items()}
        assert held == {m.dst: tuple(m.shape) for m in moves}, (arch.name, component)
