"""textinv tiny-model OUT: write a small random-weight diffusers model, with no download.

For smoke-testing an install, for the demo and the tests; `--model tiny` builds one
automatically. The weights are random: images from it are noise-like by design. Any
installed backend that offers it builds the model (models.make_tiny_model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def tiny_model(
    out: Path = typer.Argument(..., help="Folder to write the model into."),
    family: str = typer.Option("sd1", "--family", help="sd1, sd2 or sdxl."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    images: Path = typer.Option(None, "--images", help="Also write a small synthetic training image set here."),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="The backend that builds it (default: the first one that can)."),
) -> None:
    """Write a tiny Stable Diffusion model (real diffusers layout, random weights)."""
    from ..console import console
    from ...models.demo_images import write_demo_images
    from ...errors import OptionError
    from ...writes import errors_name
    from ...models.resolve import make_tiny_model
    from ...models.tiny import FAMILIES

    if family not in FAMILIES:
        raise OptionError(f"--family must be {', '.join(FAMILIES[:-1])} or {FAMILIES[-1]}, not {family!r}.")
    with errors_name(out):  # a failed write names OUT, not the temp folder the model is built in
        path = make_tiny_model(out, family, seed, backend=backend)
    console.print(f"Tiny {family} model: {path}", markup=False)
    if images is not None:
        with errors_name(images):
            console.print(f"Training images: {write_demo_images(images, seed=seed)}", markup=False)
