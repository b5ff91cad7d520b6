"""textinv train DATA_DIR: train a new embedding on a backend."""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    data_dir: Path = typer.Argument(..., help="Folder of training images (optional .txt captions beside them)."),
    token: str = typer.Option(..., "--token", help='The new placeholder token, e.g. "<cat-toy>".'),
    init: str = typer.Option(..., "--init", help="Word(s) to initialise the new vectors from."),
    backend: str = typer.Option(None, "--backend", help="torch or jax (default: the first usable one)."),
    model: str = typer.Option(None, "--model", help="Base model: a Hub id or a local diffusers folder."),
) -> None:
    """Train a Textual Inversion embedding."""
    from ..plugins import require_backend

    require_backend(backend)
    from ..errors import BackendError

    raise BackendError("Training is not wired to a backend in this build yet.",
                       "Update textinv; `textinv backends` shows what is installed.")
