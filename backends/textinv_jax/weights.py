"""Weights from a diffusers model folder, as numpy, without torch.

A diffusers folder keeps one component per subfolder (`text_encoder/`, `vae/`, `unet/`),
each with a `config.json` and its weights in safetensors. We read those with the core's
strict, numpy-only safetensors reader and never unpickle a `.bin` (a pickle can run code).

Torch layouts differ from JAX's, so the converters here are shared by every JAX port:
  conv    torch OIHW            -> HWIO   (lax.conv_general_dilated with NHWC inputs)
  linear  torch [out, in]       -> [in, out]  (x @ kernel)
`to_params` applies them to a whole state dict, turning dotted names into nested dicts,
and `load_into` puts those arrays into a flax.nnx model (built without allocating) by each
weight's path, which is its torch name: the one place where files meet modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from textinv_cli.errors import NotFoundError, TextinvError
from textinv_cli.formats.safetensors_io import load_file

__all__ = ["conv_weight", "linear_weight", "load_into", "read_config", "read_state", "require_keys", "to_params"]

# In the order diffusers/transformers prefer them: full precision first, then the fp16 variant.
_STEMS = ("diffusion_pytorch_model", "model")
_VARIANTS = ("", ".fp16")
_PICKLED = ("*.bin", "*.ckpt", "*.pt", "*.pth")


def component_dir(folder: Path, component: str) -> Path:
    """`<folder>/<component>`, with an error that says what is missing."""
    path = Path(folder).expanduser() / component
    if not path.is_dir():
        raise NotFoundError(f"{Path(folder)} has no {component!r} folder.",
                            "Pass a diffusers model folder (saved with save_pretrained).")
    return path


def read_config(folder: Path, component: str) -> dict:
    """The component's config.json as a dict."""
    path = component_dir(folder, component) / "config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist.", "The model folder is incomplete.") from None
    except (OSError, ValueError) as e:
        raise TextinvError(f"Cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise TextinvError(f"{path} is not a JSON object.")
    return config


def read_state(folder: Path, component: str) -> dict[str, np.ndarray]:
    """All tensors of `<folder>/<component>` as {torch name: numpy array}.

    Floating tensors come back as float32 whatever they were stored as (fp16/bf16
    variants included); integer buffers keep their dtype. Sharded checkpoints (an
    `*.safetensors.index.json` beside the shards) are read shard by shard.
    """
    path = component_dir(folder, component)
    for variant in _VARIANTS:
        for stem in _STEMS:
            single = path / f"{stem}{variant}.safetensors"
            if single.is_file():
                return _read_files([single])
            index = path / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                return _read_files(_shards(index))
    pickled = sorted(p.name for pattern in _PICKLED for p in path.glob(pattern))
    if pickled:
        raise TextinvError(
            f"{path} has only pickled weights ({', '.join(pickled)}); the JAX backend reads safetensors only, "
            "because loading a pickle can run arbitrary code.",
            "Re-save the model with save_pretrained(..., safe_serialization=True), or use --backend torch.")
    raise NotFoundError(f"{path} holds no model weights (no *.safetensors).", "The model folder is incomplete.")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TextinvError(f"Cannot read the shard index {index}: {e}") from None
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file() or f.parent != index.parent]
    if missing:
        raise NotFoundError(f"{index} names shards that are not there: {', '.join(missing)}.")
    return files


def _read_files(files: Iterable[Path]) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for file in files:
        for name, arr in _read_one(file).items():
            if name in state:
                raise TextinvError(f"Tensor {name!r} appears in more than one shard ({file.name}).")
            state[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    return state


def _read_one(file: Path) -> dict[str, np.ndarray]:
    # A UNet is GBs: the reader maps the file and copies one tensor out at a time.
    return load_file(file)


# -- layout converters ---------------------------------------------------------------------

def conv_weight(w: np.ndarray) -> np.ndarray:
    """A torch Conv2d weight [out, in, kh, kw] as a JAX HWIO kernel [kh, kw, in, out]."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight, got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def linear_weight(w: np.ndarray) -> np.ndarray:
    """A torch Linear weight [out, in] as a JAX kernel [in, out]; a 1x1 conv weight
    [out, in, 1, 1] (old checkpoints store some attention projections so) is accepted too."""
    w = np.asarray(w)
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {w.shape}")
    return np.ascontiguousarray(w.T)


def to_params(state: Mapping[str, np.ndarray], *, embeddings: Iterable[str] = ()) -> dict:
    """A flat torch state dict as a nested params dict, converting layouts by shape.

    "a.b.0.weight" becomes params["a"]["b"]["0"][leaf], where leaf is
      "kernel"     for a 4-D weight (conv, HWIO) or a 2-D weight (linear, [in, out]),
      "embedding"  for a 2-D weight of a module named in `embeddings` (an nn.Embedding
                   table [rows, width], not transposed),
      "scale"      for a 1-D weight (LayerNorm / GroupNorm),
      "bias"       for a bias; any other name is kept as it is.
    Numeric parts of names (ModuleList indices) stay strings: params["layers"]["0"].
    """
    embeddings = set(embeddings)
    out: dict = {}
    for name, value in state.items():
        *path, leaf = name.split(".")
        module = ".".join(path)
        value = np.asarray(value)
        if leaf == "weight":
            if module in embeddings:
                leaf = "embedding"
            elif value.ndim == 4:
                leaf, value = "kernel", conv_weight(value)
            elif value.ndim == 2:
                leaf, value = "kernel", linear_weight(value)
            elif value.ndim == 1:
                leaf = "scale"
            else:
                raise TextinvError(f"Cannot convert {name!r} of shape {value.shape}.")
        node = out
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TextinvError(f"{name!r} clashes with another tensor's name.")
        node[leaf] = value
    return out


def require_keys(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str) -> None:
    """Refuse a state dict whose names or shapes differ from what the config implies.

    `expected` maps torch names to torch shapes. Missing and unexpected tensors are both
    errors: silently ignoring either would give a model that runs but computes nonsense.
    """
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        def few(items):
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(extra)}" if extra else "",
                 f"wrong shape {few(wrong)}" if wrong else ""]
        raise TextinvError(f"The {what} weights do not match its config: " + "; ".join(p for p in parts if p) + ".",
                           "The folder's config.json and weights must come from the same model.")


def load_into(build: Callable[[], nnx.Module], params: Mapping, what: str) -> nnx.Module:
    """The model `build()` makes, filled from `params` (nested, as to_params gives them).

    The model is first built under nnx.eval_shape (shapes only, nothing allocated: an SDXL
    UNet is GBs), then every Frozen weight takes the array at its path (`down_blocks/0/
    resnets/1/conv1/kernel` reads params["down_blocks"]["0"]["resnets"]["1"]["conv1"]
    ["kernel"]); the arrays stay numpy in host memory until the caller places the model's
    state on its devices. Other state (TokenRows) starts as zeros of its declared shape.
    A weight the params lack, one left unused or a shape that differs is an error: the
    loaders check files against the config first (require_keys), so this one means the
    module and the config's expected shapes disagree.
    """
    from .layers import Frozen

    graphdef, frozen, rest = nnx.split(nnx.eval_shape(build), Frozen, ...)
    filled, used = [], 0
    for path, var in nnx.to_flat_state(frozen):
        node = params
        for part in path:
            node = node.get(str(part)) if isinstance(node, Mapping) else None
        name = ".".join(map(str, path))
        if node is None:
            raise TextinvError(f"The {what} model has a weight {name} that its files do not give.")
        if tuple(np.shape(node)) != tuple(var.shape):
            raise TextinvError(f"The {what} weight {name} is {tuple(np.shape(node))}, the model needs {var.shape}.")
        filled.append((path, var.replace(np.asarray(node, np.float32))))
        used += 1
    total = sum(1 for _ in _leaves(params))
    if used != total:
        raise TextinvError(f"The {what} files hold {total - used} tensor(s) that the model has no place for.")
    zeros = [(path, var.replace(np.zeros(var.shape, var.dtype))) for path, var in nnx.to_flat_state(rest)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled), nnx.from_flat_state(zeros))


def _leaves(tree: Mapping):
    for value in tree.values():
        if isinstance(value, Mapping):
            yield from _leaves(value)
        else:
            yield value
