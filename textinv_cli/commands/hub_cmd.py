"""textinv pull / push: the Hugging Face Hub."""

from __future__ import annotations

import typer


def pull(repo_id: str = typer.Argument(..., help="e.g. sd-concepts-library/cat-toy")) -> None:
    """Download an embedding from the Hugging Face Hub into the registry."""
    from ..errors import HubError

    raise HubError("pull is not available in this build yet.", "Download the file and use `textinv import`.")


def push(name: str = typer.Argument(..., help="Registry name of the embedding."),
         repo: str = typer.Option(..., "--repo", help="OWNER/NAME on the Hub.")) -> None:
    """Upload an embedding to the Hugging Face Hub with a model card."""
    from ..errors import HubError

    raise HubError("push is not available in this build yet.", "Export with `textinv convert` and upload it.")
