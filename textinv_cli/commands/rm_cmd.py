"""textinv rm NAME (owned by the registry work)."""
import typer

def rm(name: str = typer.Argument(...)):
    raise NotImplementedError
