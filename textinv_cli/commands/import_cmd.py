"""textinv import FILE: register any readable embedding file (owned by the registry work)."""
from pathlib import Path
import typer

def import_embedding(path: Path = typer.Argument(..., help="Embedding file or folder.")):
    raise NotImplementedError
