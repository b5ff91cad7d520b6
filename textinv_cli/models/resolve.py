"""Base models named on the command line: built-in tiny models, local folders, Hub ids.

The family of a local diffusers folder is read from its JSON configs (no torch):
an XL pipeline class -> sdxl; a text encoder with plain gelu (OpenCLIP) -> sd2; else sd1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BackendError, NotFoundError

# `--model tiny` (the default) and friends: random-weight models built on first use, offline.
TINY = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
DEFAULT_MODEL = "tiny"


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
            "for trying textinv out, not for real images. Pass --model with a diffusers folder or a Hub id."]


def resolve_model(name: str | None, backend: str | None = None) -> str:
    """A local folder path (tiny models are built here on first use, by `backend` where it
    can) or a Hub id, unchanged."""
    name = name or DEFAULT_MODEL
    if name in TINY:
        family = TINY[name]
        return str(make_tiny_model(models_dir() / f"tiny-{family}", family, backend=backend))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists() and path.is_dir():
            raise NotFoundError(f"{path} is not a diffusers model folder (no model_index.json).",
                                "Pass a folder saved with save_pretrained, a Hub id, or --model tiny.")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hub id; the backend loads it through the Hugging Face cache
    raise NotFoundError(f"Model {name!r} is neither a local folder nor a Hub id (owner/name).",
                        "Pass --model with a diffusers folder or a Hub id, or --model tiny for the built-in demo model.")


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
