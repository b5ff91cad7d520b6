"""Base models named on the command line: built-in tiny models, local folders, Hub ids.

The family of a local diffusers folder is read from its JSON configs (no torch):
an XL pipeline class -> sdxl; a text encoder with plain gelu (OpenCLIP) -> sd2; else sd1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import NotFoundError, TextinvError

# `--model tiny` (the default) and friends: random-weight models built on first use, offline.
TINY = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
DEFAULT_MODEL = "tiny"


def models_dir() -> Path:
    from .registry import home

    return home() / "models"


def resolve_model(name: str | None) -> str:
    """A local folder path (tiny models are built here on first use) or a Hub id, unchanged."""
    name = name or DEFAULT_MODEL
    if name in TINY:
        family = TINY[name]
        try:
            from textinv_torch.tiny import write_tiny_model
        except ImportError as e:
            raise TextinvError("Building the built-in tiny model needs the torch extra.",
                               'Install it: pip install "textinv[torch]"') from e
        return str(write_tiny_model(models_dir() / f"tiny-{family}", family=family))
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
