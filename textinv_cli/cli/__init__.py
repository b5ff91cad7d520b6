"""The command line: the Typer app, one module per command, and what people and programs see."""
