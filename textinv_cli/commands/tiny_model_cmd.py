"""textinv tiny-model OUT: write a small random-weight diffusers model, with no download.

For smoke-testing an install, for the demo and the tests; `--model tiny` builds one
automatically. The weights are random: images from it are noise-like by design.
"""

from __future__ import annotations

from pathlib import Path

import typer


def tiny_model(
    out: Path = typer.Argument(..., help="Folder to write the model into."),
    family: str = typer.Option("sd1", "--family", help="sd1, sd2 or sdxl."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    images: Path = typer.Option(None, "--images", help="Also write a small synthetic training image set here."),
) -> None:
    """Write a tiny Stable Diffusion model (real diffusers layout, random weights)."""
    from ..console import console
    from ..errors import TextinvError
    from ..fsutil import errors_name

    if family not in ("sd1", "sd2", "sdxl"):
        raise TextinvError(f"--family must be sd1, sd2 or sdxl, not {family!r}.")
    try:
        from textinv_torch.tiny import write_demo_images, write_tiny_model
    except ImportError as e:
        raise TextinvError("The tiny-model factory needs the torch extra.", 'Install it: pip install "textinv[torch]"') from e
    with errors_name(out):  # a failed write names OUT, not the temp folder the model is built in
        path = write_tiny_model(out, family=family, seed=seed)
    console.print(f"Tiny {family} model: {path}", markup=False)
    if images is not None:
        with errors_name(images):
            console.print(f"Training images: {write_demo_images(images, seed=seed)}", markup=False)
