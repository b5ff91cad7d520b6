"""Base models named on the command line: built-in tiny models, local folders, single-file
checkpoints (.safetensors / .ckpt, or a name found in the model folders), Hub ids.

A single file becomes a diffusers folder before any backend sees it (checkpoints.prepare,
converted once and cached), so every backend loads a folder; `--vae FILE` becomes a view
folder (model_views.py). The family of a local diffusers folder is read from its JSON
configs (no torch): an XL pipeline class -> sdxl; a text encoder with plain gelu (OpenCLIP)
-> sd2; else sd1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BackendError, NotFoundError

# `--model tiny` (the built-in default) and friends: random-weight models built on first use, offline.
TINY = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
DEFAULT_MODEL = "tiny"


def default_model() -> str:
    """The model without --model: TEXTINV_MODEL, else `textinv config set model`, else tiny
    (config.py has the order)."""
    from ..config import get

    return get("model") or DEFAULT_MODEL


def configured_model(name: str | None) -> str | None:
    """--model as given, else the user's configured default; None when neither is set (the
    built-in tiny model, which model_notes calls "the default")."""
    if name:
        return name
    from ..config import lookup

    value, source = lookup("model")
    return None if source == "default" else value


def canonical_model(name: str) -> str:
    """What `textinv config set model NAME` stores: a tiny name, a model-folder name or a Hub
    id as given, a local folder or file as its absolute path (a relative one would change
    meaning with the directory). Refused here, not at the next train: a name that is none."""
    name = name.strip()
    located = locate_model(name)
    if located != name:  # a name found in the model folders: kept as typed, so it follows them
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if name not in TINY and path.exists() else name  # a Hub id as given


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def locate_model(name: str) -> str:
    """--model as typed -> a tiny name, a local folder or checkpoint file (as given), a file
    found in the model folders (its path), or a Hub id. Order: tiny, an existing path, a
    model-folder name, a Hub id; anything else is an error that says what was searched."""
    from ..untrusted import quoted
    from .model_files import MODEL_DIRS_EXAMPLE, find_model_file, is_checkpoint_name, missing_model_message

    name = name.strip()
    if name in TINY:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise NotFoundError(f"{path} is not a diffusers model folder (no model_index.json).",
                                "Pass a folder saved with save_pretrained, a .safetensors/.ckpt checkpoint, "
                                "a Hub id (owner/name), or tiny.")
        return name
    if path.exists():
        if not is_checkpoint_name(path.name):
            raise NotFoundError(f"{path} is not a model: textinv loads .safetensors and .ckpt checkpoints, "
                                "diffusers folders and Hub ids.",
                                "Pass a .safetensors/.ckpt checkpoint or a diffusers folder to --model.")
        return name
    if not name.startswith((".", "/", "~")):
        found = find_model_file(name)
        if found is not None:
            return str(found)
        if _looks_like_hub_id(name) and not is_checkpoint_name(name):
            return name  # a Hub id; the backend loads it through the Hugging Face cache
    missing = missing_model_message(name) if not name.startswith((".", "/", "~")) else None
    if missing is not None:
        raise NotFoundError(*missing)
    if is_checkpoint_name(name) or name.startswith((".", "/", "~")):
        raise NotFoundError(f"{path} does not exist.",
                            f"Check the path, or name your model folder once ({MODEL_DIRS_EXAMPLE}): then "
                            "--model NAME finds NAME.safetensors there.")
    raise NotFoundError(f"Model {quoted(name)} is neither a local folder nor a Hub id (owner/name), nor a checkpoint "
                        "file.", "Pass --model with a .safetensors/.ckpt file, a diffusers folder or a Hub id (or "
                        f"tiny), or name your model folder once: {MODEL_DIRS_EXAMPLE}")


def models_dir() -> Path:
    from ..registry.store import home

    return home() / "models"


def make_tiny_model(out: Path, family: str = "sd1", seed: int = 0, backend: str | None = None) -> Path:
    """Write the built-in tiny model of `family` into `out` (or find it there) and return it.

    Built by a backend (Backend.make_tiny_model), found through the plugins like every
    backend, never imported by name: the one named `backend` (--backend) first, else the
    first installed one that offers it, so a torch-only or a jax-only install builds it.
    """
    from ..engine import plugins
    from .tiny import check_family, check_seed

    check_family(family)
    check_seed(seed)
    tried = []
    for cand in plugins.preferring(backend):
        try:
            make = getattr(cand.load(), "make_tiny_model", None)
            if make is not None:
                return Path(make(Path(out), family, seed))
            tried.append(f"{cand.name}: does not build tiny models")
        except NotImplementedError:
            tried.append(f"{cand.name}: does not build tiny models")
        except ImportError as e:  # a library it builds with is missing (it writes nothing then)
            tried.append(f"{cand.name}: {e.name or e} is not installed")
        except BackendError as e:
            tried.append(str(e).splitlines()[0])
    hints = "; ".join(f"{n}: {h}" for n, h in plugins.INSTALL_HINTS.items())
    raise BackendError("Building the built-in tiny model needs a backend that can build one"
                       + (f" ({'; '.join(tried)})." if tried else " (none is installed)."), f"Install one — {hints}.")


def model_notes(name: str | None) -> list[str]:
    """What to tell the user about the model before a run or a sample starts: the default tiny
    model has random weights (its images are noise-like, its embeddings useless elsewhere)."""
    if (name or DEFAULT_MODEL) not in TINY:
        return []
    shown = name or f"{DEFAULT_MODEL} (the default)"
    return [f"Model: {shown}, a built-in tiny {TINY[name or DEFAULT_MODEL].upper()} model with random weights: "
            "for trying textinv out, not for real images. Pass --model with a .safetensors/.ckpt checkpoint, a "
            "diffusers folder or a Hub id (or name yours once for every run: textinv config set model, then "
            "the file, folder or Hub id)."]


def resolve_model(name: str | None, backend: str | None = None, prediction: str | None = None) -> str:
    """A local folder path (tiny models are built here on first use, by `backend` where it
    can; a single-file checkpoint is converted once into a cached diffusers folder, with
    `prediction` where the file does not say it) or a Hub id, unchanged. Without a name: the
    configured default (default_model). Idempotent: a folder it returned resolves to itself."""
    located = locate_model(name or default_model())
    if located in TINY:
        family = TINY[located]
        return str(make_tiny_model(models_dir() / f"tiny-{family}", family, backend=backend))
    path = Path(located).expanduser()
    if path.is_file():
        from .checkpoints.convert import prepare

        return str(prepare(path.resolve(), prediction=prediction).folder)
    if path.exists():
        return str(path.resolve())
    return located  # a Hub id; the backend loads it through the Hugging Face cache


def model_family(model: str) -> str | None:
    """sd1 / sd2 / sdxl for a local diffusers folder; None when it cannot be told here (Hub id)."""
    path = Path(model)
    index = path / "model_index.json"
    if not index.exists():
        return None
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in cls:
            return "sdxl"
        te = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return "sd2" if te.get("hidden_act") == "gelu" else "sd1"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def model_geometry(model: str) -> tuple[int, int] | None:
    """(native size in pixels, channels of the VAE's full-resolution layers) of a local
    diffusers folder, or of a Hub id whose configs are in the Hugging Face cache; None when
    they cannot be read without loading or downloading anything.

    native = unet sample_size x the VAE's downscale (2 ** (VAE blocks - 1)): 512 for SD 1.5,
    768 for SD 2.1, 1024 for SDXL, 64 for the tiny models (what diffusers' pipelines default to).
    """
    def config(sub: str) -> dict | None:
        path = Path(model) / sub / "config.json"
        if not path.is_file():
            if Path(model).exists() or model.count("/") != 1:
                return None
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(model, f"{sub}/config.json")
            except Exception:  # noqa: BLE001 - an odd id or cache: the size is just not known here
                return None
            if not isinstance(cached, str):
                return None
            path = Path(cached)
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    unet, vae = config("unet"), config("vae")
    if not unet or not vae:
        return None
    size, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if isinstance(size, list) and size:  # some configs give [h, w]
        size = max(size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or not isinstance(blocks, list) or not blocks:
        return None
    channels = blocks[0]
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        return None
    return size * 2 ** (len(blocks) - 1), channels


def folder_on_disk(name: str | None) -> Path | None:
    """The folder `name` resolves to when it is already on disk (a local folder, a tiny model
    built before, a Hub id whose model_index.json is in the Hugging Face cache), else None;
    nothing is built or downloaded: for checks that read only its JSON and tokenizer files."""
    name = name or default_model()
    if name in TINY:
        from .tiny import RECIPE, read_tiny_info

        folder = models_dir() / f"tiny-{TINY[name]}"
        info = read_tiny_info(folder)  # complete, and of today's recipe (an older one is rebuilt on use)
        return folder if info is not None and info.get("recipe") == RECIPE else None
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(name, "model_index.json")
        except Exception:  # noqa: BLE001 - an odd id or cache: just not known here
            return None
        return Path(index).parent if isinstance(index, str) else None
    return None


def tokenizer_folders(name: str | None) -> list[tuple[str, Path]]:
    """("clip_l", folder) per text encoder of the model `name` would resolve to, when its
    tokenizer files are already on disk (folder_on_disk); [] when they are not."""
    from ..families import FAMILY_SLOTS

    folder = folder_on_disk(name)
    family = model_family(str(folder)) if folder is not None else None
    if family not in FAMILY_SLOTS:
        return []
    subs = ("tokenizer", "tokenizer_2")
    found = [(slot, folder / sub) for slot, sub in zip(FAMILY_SLOTS[family], subs)]
    if not all((f / "vocab.json").is_file() and (f / "merges.txt").is_file() for _, f in found):
        return []
    return found


def loading_line(name: str | None, backend: str | None) -> str:
    """What train and sample say (stderr) while the backend imports and the model loads,
    seconds in which the screen would otherwise stay blank."""
    from ..untrusted import shown

    model = shown(name, 200) if name else f"{default_model()} (the default)"
    return f"Loading {model} with the {shown(backend, 40) if backend else 'first usable'} backend…"


def trained_on_model(meta: dict, family: str) -> tuple[str, str] | None:
    """(--model value, what it is) for the base model an embedding's metadata records
    (textinv's `base_model`, A1111's `sd_checkpoint_name`), when that value works as printed:
    a tiny model's name, a folder or checkpoint file that still exists, a Hub id, or an A1111
    checkpoint name found in the model folders. None otherwise."""
    import shlex

    base = str(meta.get("base_model") or "").strip()
    if base:
        tiny = next((n for n, f in TINY.items() if f == family and Path(base) == models_dir() / f"tiny-{f}"), None)
        if tiny is not None or base in TINY:
            return tiny or base, "the tiny model it was trained on"
        if Path(base).exists() or (base.count("/") == 1 and not base.startswith((".", "/", "~"))):
            return shlex.quote(base), "the model it was trained on"
    name = str(meta.get("sd_checkpoint_name") or "").strip()
    if name:
        from .model_files import find_model_file

        try:
            found = find_model_file(name)
        except NotFoundError:  # several files have that name
            found = None
        if found is not None:
            return shlex.quote(name), "the model it was trained on, in your model folders"
    return None


def is_default_model(value: str) -> bool:
    """Whether --model `value` (as trained_on_model prints it) is what runs without --model."""
    import shlex

    default = default_model()
    try:
        (value,) = shlex.split(value)
    except ValueError:
        return False
    if value in TINY or default in TINY:
        return TINY.get(value, value) == TINY.get(default, default)
    try:
        return value == default or Path(value).expanduser().resolve() == Path(default).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def base_model_hint(meta: dict, family: str) -> str | None:
    """What to pass when an embedding of `family` meets a model of another family: the base
    model its metadata records (trained_on_model), or None. An A1111 checkpoint name that is
    not in the model folders is only a name, so it is said as what to look for."""
    from ..untrusted import shown
    from .model_files import MODEL_DIRS_EXAMPLE

    found = trained_on_model(meta, family)
    if found is not None:
        return f"Pass --model {found[0]} ({found[1]})."
    name = str(meta.get("sd_checkpoint_name") or "").strip()
    if name:
        return (f"It was trained on {shown(name, 120)} (A1111's checkpoint name): pass --model with that "
                f"checkpoint's file, or its name once its folder is set ({MODEL_DIRS_EXAMPLE}).")
    return None
