"""textinv completion SHELL: the shell's completion script, printed (typer's completion machinery).

The script calls textinv back with _TEXTINV_COMPLETE set; app.py answers those calls. Only
our own option names are completed (the other tools' aliases stay hidden, cli/aliases.py).
"""

from __future__ import annotations

import typer

SHELLS = ("bash", "zsh", "fish", "powershell")
INSTALL = {"bash": 'eval "$(textinv completion bash)"  # in ~/.bashrc',
           "zsh": 'eval "$(textinv completion zsh)"  # in ~/.zshrc',
           "fish": "textinv completion fish > ~/.config/fish/completions/textinv.fish",
           "powershell": "textinv completion powershell | Out-String | Invoke-Expression  # in $PROFILE"}


def _shell(value: str) -> str:
    if value not in SHELLS:
        raise typer.BadParameter(f"must be one of {', '.join(SHELLS)}")
    return value


def completion(
    shell: str = typer.Argument(..., metavar="SHELL", callback=_shell, help=f"One of {', '.join(SHELLS)}."),
) -> None:
    """Print the shell completion script (bash, zsh, fish or powershell).

    Install it with e.g. eval "$(textinv completion bash)" in ~/.bashrc."""
    from typer._completion_shared import get_completion_script

    from ..console import err_console

    script = get_completion_script(prog_name="textinv", complete_var="_TEXTINV_COMPLETE", shell=shell)
    typer.echo(script)
    if err_console.is_terminal:
        err_console.print(f"To install: {INSTALL[shell]}", markup=False, style="dim")
