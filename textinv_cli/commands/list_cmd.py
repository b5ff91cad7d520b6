"""textinv list (owned by the registry work)."""
import typer

def list_embeddings(json_out: bool = typer.Option(False, "--json")):
    raise NotImplementedError
