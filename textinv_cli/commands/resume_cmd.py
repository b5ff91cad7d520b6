"""textinv resume RUN: continue a training run from its newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer


def resume(run: Path = typer.Argument(..., help="The run directory printed when training started.")) -> None:
    """Resume an interrupted training run."""
    from ..plugins import require_backend

    require_backend(None)
    from ..errors import BackendError

    raise BackendError("Resuming is not wired to a backend in this build yet.",
                       "Update textinv; `textinv backends` shows what is installed.")
