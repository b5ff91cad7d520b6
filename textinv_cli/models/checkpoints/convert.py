"""A single-file checkpoint -> a diffusers folder both backends load, converted once and cached.

prepare(path) identifies the architecture from the file's shapes, checks the whole plan
(ldm_keys, plan.py) against the header before reading a byte of weights, then streams each
component into a temp folder beside the cache entry and renames it into place (cache.py).
No torch, no jax: renames, reshapes, row slices and one transpose on bytes.

Why not diffusers' from_single_file: it needs torch (the JAX backend and the core must not),
it fetches the model configs from the Hub (textinv ships its own, architectures.py), and it
loads the whole checkpoint into memory; here one tensor is in memory at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import FormatError, OptionError, TextinvError
from ...untrusted import shown
from .. import tiny, tiny_tokenizer
from . import cache, clip_vocab
from .architectures import ARCHITECTURES, Architecture, identify, with_prediction
from .plan import WEIGHT_FILES, Plan, check, model_plan, nbytes, vae_plan, write

Progress = Callable[[int, int, str], None]  # (done, total, phase: hashing | converting)
PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v", "v-prediction": "v"}
_TORCH_DTYPE = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class Prepared:
    folder: Path             # a diffusers folder (prepare) or a diffusers `vae/` folder (prepare_vae)
    family: str              # sd1 | sd2 | sdxl
    sha256: str              # of the source file
    name: str                # the file's stem, as A1111 lists it
    prediction: str | None   # epsilon | v (None for a VAE)
    has_vae: bool = True     # False: the file had none; the caller passes one (--vae)
    architecture: str = ""   # "SD 1.x", "tiny sd2", ...


def normalize_prediction(prediction: str | None) -> str | None:
    if prediction is None:
        return None
    key = str(prediction).strip().lower()
    if key not in PREDICTIONS:
        raise OptionError(f"--prediction must be epsilon or v, not {shown(prediction, 20)}.",
                          "Pass --prediction v (768-v models) or --prediction epsilon.")
    return PREDICTIONS[key]


def prepare(path, *, prediction: str | None = None, progress: Progress | None = None,
            vae_given: bool = False) -> Prepared:
    """The cached diffusers folder of the checkpoint at `path`, converting it on first use.

    prediction: an explicit choice beats what the file (or its sidecar .yaml) says, which beats
    the family's default (SD 1.x and SDXL: epsilon; SD 2.x must be told). vae_given: the caller
    supplies a VAE (--vae), so a file without one is accepted; its folder then has no vae/.
    progress(done, total, phase): bytes hashed (phase "hashing"), then bytes converted
    ("converting"), on one scale; not called at all when both are cached.
    """
    from .hashes import sha256_of
    from .reader import open_checkpoint, scan

    path = Path(path).expanduser()
    prediction = normalize_prediction(prediction)
    info = scan(path)  # refuses what no architecture here can be (inpainting, refiner, legacy pickles, ...)
    what = shown(path)
    with open_checkpoint(path) as ck:
        arch = identify(ck.tensors, what)
        chosen = prediction or info.prediction or arch.default_prediction
        if chosen is None:
            raise TextinvError(f"{what} is an {arch.name} model and does not say whether it predicts v or epsilon.",
                               "Pass --prediction v for 768-v models (such as v2-1_768-ema-pruned), or "
                               "--prediction epsilon for 512 base models (such as v2-1_512-ema-pruned).")
        plan = model_plan(arch, list(ck.tensors))
        present = check(plan, ck.tensors, what, arch.name)
        has_vae = "vae" in present
        if not has_vae and not vae_given:
            raise FormatError(f"{what} has no VAE baked in (no first_stage_model.* tensors).",
                              "Pass the VAE to use with it: --vae FILE (such as vae-ft-mse-840000-ema-pruned."
                              "safetensors, or sdxl_vae.safetensors for SDXL).")
        total_convert = sum(nbytes(plan.components[c], ck.tensors) for c in present)
        size = info.size
        sha = sha256_of(path, progress=(lambda done, _total: progress(done, size + total_convert, "hashing"))
                        if progress else None)
        _check_unchanged(ck, path)  # the hash read the file by name: it must be the one being converted
        out = cache.model_folder(sha, chosen)
        prepared = Prepared(out, arch.family, sha, path.stem, chosen, has_vae, arch.name)
        if cache.usable(out, sha):
            cache.touch(out, path)
            return prepared
        marker = {"kind": "model", "source": str(path.absolute()), "sha256": sha, "family": arch.family,
                  "architecture": arch.name, "prediction": chosen, "has_vae": has_vae,
                  "source_size": size}
        step = _counter(progress, size, size + total_convert)
        def build(tmp: Path) -> None:
            _convert_model(ck, arch, plan, present, chosen, tmp, step)
            _check_unchanged(ck, path)  # before the folder is published under the hash

        cache.build(out, sha, marker, build)
    return prepared


def _check_unchanged(ck, path: Path) -> None:
    if not ck.same_file_as(path):
        raise TextinvError(f"{shown(path)} changed while textinv was reading it.",
                           "Run the command again once the file is complete (is a download or copy still writing it?).")


def _counter(progress: Progress | None, start: int, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = [start]

    def step(n: int) -> None:
        done[0] += n
        progress(done[0], total, "converting")

    return step


def _convert_model(ck, arch: Architecture, plan: Plan, present: list[str], prediction: str, tmp: Path,
                   step) -> None:
    comps = with_prediction(arch, prediction)
    for comp in present:
        out = tmp / WEIGHT_FILES[comp]
        out.parent.mkdir(parents=True, exist_ok=True)
        write(ck, plan.components[comp], out, step)
        library, _cls, cfg = comps[comp]
        if library == "transformers":  # what transformers' dtype="auto" picks: the weights' own
            cfg["dtype"] = _TORCH_DTYPE[ck.tensors[plan.components[comp][0].src].dtype]
    absent = {c for c in plan.components if c not in present}  # no VAE: the caller brings one (--vae)
    for name, data in pipeline_files(arch, comps, absent).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)


def pipeline_files(arch: Architecture, comps: dict, absent=frozenset()) -> dict[str, bytes]:
    """model_index.json, the configs and the tokenizers: as tiny.recipe_files writes them (the
    same keys, order and formatting), so a tiny model converts back to its own files. An
    `absent` component stays in model_index.json (the pipeline has one, passed in by the
    caller) but gets no folder: a config without weights would not load."""
    sdxl = arch.family == "sdxl"
    index: dict = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
                   "_diffusers_version": tiny.DIFFUSERS_VERSION, "feature_extractor": [None, None],
                   "image_encoder": [None, None]}
    index.update({"force_zeros_for_empty_prompt": True} if sdxl else
                 {"requires_safety_checker": False, "safety_checker": [None, None]})
    files: dict[str, dict] = {}
    for name, (library, cls, cfg) in comps.items():
        index[name] = [library, cls]
        if name in absent:
            continue
        if library == "transformers":
            files[f"{name}/config.json"] = cfg
        else:
            sub = "/scheduler_config.json" if name == "scheduler" else "/config.json"
            files[name + sub] = {"_class_name": cls, "_diffusers_version": tiny.DIFFUSERS_VERSION, **cfg}
    out = {p: (json.dumps(o, indent=2, sort_keys=True) + "\n").encode() for p, o in files.items()}
    pads = tiny.TOKENIZER_PADS[arch.family]
    make = tiny_tokenizer.tokenizer_files if arch.tiny else clip_vocab.tokenizer_files
    for sub, pad in pads.items():
        index[sub] = ["transformers", "CLIPTokenizer"]
        out.update({f"{sub}/{k}": v for k, v in make(pad).items()})
    out["model_index.json"] = (json.dumps(dict(sorted(index.items())), indent=2, sort_keys=True) + "\n").encode()
    return out


# -- a standalone VAE ------------------------------------------------------------------------

def _vae_layout(names) -> str:
    if any(n.startswith("first_stage_model.") for n in names):
        return "ldm"
    if any(n.startswith(("encoder.down.", "decoder.up.")) for n in names):
        return "ldm-bare"
    if any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for n in names):
        return "diffusers"
    return ""


def prepare_vae(path, family: str, progress: Progress | None = None) -> Prepared:
    """The cached diffusers `vae/` folder (config.json + weights) of a VAE file, in `family`'s
    config (its scaling factor). Accepts A1111's VAE files (LDM keys, with or without
    `first_stage_model.`; `loss.*` and `model_ema.*` leftovers ignored) and diffusers' layout."""
    from .hashes import sha256_of
    from .reader import open_checkpoint

    path = Path(path).expanduser()
    what = shown(path)
    candidates = [a for a in ARCHITECTURES if a.family == family]
    if not candidates:
        raise OptionError(f"Unknown model family {shown(family, 20)} for a VAE.", "Pick one of: sd1, sd2, sdxl.")
    with open_checkpoint(path) as ck:
        layout = _vae_layout(ck.tensors)
        if not layout:
            raise FormatError(f"{what} holds no VAE (no encoder/decoder tensors in the LDM or diffusers layout).",
                              "Pass a VAE file such as vae-ft-mse-840000-ema-pruned.safetensors to --vae.")
        def fit(cand: Architecture) -> int:  # how many planned tensors the file has, with a planned shape
            return sum(m.src in ck.tensors and tuple(ck.tensors[m.src].shape) in m.source_shapes()
                       for m in vae_plan(cand.config("vae"), layout).components["vae"])

        arch = max(candidates, key=fit)  # the real VAE or the tiny one (same layout, other widths)
        plan = vae_plan(arch.config("vae"), layout)
        check(plan, ck.tensors, what, arch.name, optional=())
        total = nbytes(plan.components["vae"], ck.tensors)
        size = ck.size
        sha = sha256_of(path, progress=(lambda done, _t: progress(done, size + total, "hashing")) if progress else None)
        _check_unchanged(ck, path)
        out = cache.vae_folder(sha, family)
        prepared = Prepared(out, family, sha, path.stem, None, True, arch.name)
        if cache.usable(out, sha):
            cache.touch(out, path)
            return prepared
        marker = {"kind": "vae", "source": str(path.absolute()), "sha256": sha, "family": family,
                  "architecture": arch.name, "prediction": None, "layout": layout, "source_size": size}
        cfg = with_prediction(arch, arch.default_prediction or "epsilon")["vae"][2]
        config = {"_class_name": "AutoencoderKL", "_diffusers_version": tiny.DIFFUSERS_VERSION, **cfg}

        def build(tmp: Path) -> None:
            write(ck, plan.components["vae"], tmp / "diffusion_pytorch_model.safetensors",
                  _counter(progress, size, size + total))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            _check_unchanged(ck, path)

        cache.build(out, sha, marker, build)
    return prepared

