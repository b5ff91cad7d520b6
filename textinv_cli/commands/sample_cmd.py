"""textinv sample PROMPT: generate images, loading every registered token in the prompt."""

from __future__ import annotations

import typer


def sample(
    prompt: str = typer.Argument(..., help='e.g. "A <cat-toy> backpack".'),
    backend: str = typer.Option(None, "--backend", help="torch or jax (default: the first usable one)."),
) -> None:
    """Sample images with registered embeddings."""
    from ..plugins import require_backend

    require_backend(backend)
    from ..errors import BackendError

    raise BackendError("Sampling is not wired to a backend in this build yet.",
                       "Update textinv; `textinv backends` shows what is installed.")
