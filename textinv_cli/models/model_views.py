"""A base model with another VAE (`--vae FILE`), as a folder both backends load unchanged.

A "view" is a diffusers folder under $TEXTINV_HOME/models/views/ whose entries are links:
each part of the model (model_index.json, unet/, text_encoder/, ...) links to the model's
own, and vae/ links to the VAE converted from the user's file (checkpoints.prepare_vae).
Nothing is copied, so a view costs a few links, and the backends, which load any diffusers
folder, need no option for it. It is keyed by the two folders it joins, made once, in a
temporary folder renamed into place (two processes making the same view both end with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

VIEWS = "views"
MARKER = "textinv-view.json"    # what the view joins, for `textinv models` and for people


def views_dir() -> Path:
    from .resolve import models_dir

    return models_dir() / VIEWS


def vae_view(model_folder: Path, vae_folder: Path, *, label: str) -> Path:
    """The folder that is `model_folder` with `vae_folder` as its vae/ (made on first use).
    `label`: a readable start of the folder's name (the model's and VAE's file stems)."""
    model_real, vae_real = Path(os.path.realpath(model_folder)), Path(os.path.realpath(vae_folder))
    key = hashlib.sha256(f"{model_real}\0{vae_real}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_+-]+", "_", label).strip("_")[:80] or "model"  # one plain name
    view = views_dir() / f"{readable}-{key}"
    if _complete(view, model_real, vae_real):
        return view
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = view.with_name(f".{view.name}.tmp-{os.getpid()}")
    _remove_view(tmp)
    tmp.mkdir()
    try:
        for part in sorted(model_real.iterdir()):  # linked by name (a Hub snapshot's files are links to blobs)
            if part.name != "vae" and not part.name.startswith("."):
                os.symlink(model_real / part.name, tmp / part.name)
        os.symlink(vae_real, tmp / "vae")
        marker = {"model": str(model_real), "vae": str(vae_real), "label": label}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        if view.exists() or view.is_symlink():  # an older or broken one (its model changed): replaced
            _remove_view(view)
        os.rename(tmp, view)
    except OSError:
        _remove_view(tmp)
        if _complete(view, model_real, vae_real):  # another process made it meanwhile
            return view
        raise
    return view


def _complete(view: Path, model_real: Path, vae_real: Path) -> bool:
    """A view that joins these two folders and whose links all lead somewhere."""
    try:
        marker = json.loads((view / MARKER).read_text("utf-8"))
        parts = [p for p in model_real.iterdir() if p.name != "vae" and not p.name.startswith(".")]
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("model") == str(model_real) and marker.get("vae") == str(vae_real)
            and (view / "vae").resolve() == vae_real and all((view / p.name).exists() for p in parts))


def view_info(folder: Path) -> dict | None:
    """What a view joins ({"model", "vae", "label"}), or None when `folder` is no view."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prune_views() -> int:
    """Remove every view (each is remade in milliseconds when used again); returns how many."""
    root = views_dir()
    if not root.is_dir():
        return 0
    count = 0
    for view in root.iterdir():
        if view.is_dir() and not view.is_symlink():
            _remove_view(view)
            count += 1
    return count


def _remove_view(view: Path) -> None:
    """A view's links and marker, then the folder: links are unlinked, never followed, so the
    model and the VAE they point at are never touched."""
    if view.is_symlink() or view.is_file():
        view.unlink()
        return
    if not view.is_dir():
        return
    for entry in view.iterdir():
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:  # not something a view holds; left to rmtree, which does not follow links either
            shutil.rmtree(entry)
    view.rmdir()
