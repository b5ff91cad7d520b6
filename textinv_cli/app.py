"""The textinv command line: wiring only. Each command lives in textinv_cli/commands/.

main() is the one place that maps known errors to messages and exit codes:
TextinvError -> its message and hint on stderr, exit 1 (130 for Ctrl-C);
usage errors -> exit 2 (click's own handling); anything else is a bug: a one-line
report, and the traceback only with TEXTINV_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from .commands import (backends_cmd, convert_cmd, hub_cmd, import_cmd, inspect_cmd, list_cmd,
                       resume_cmd, rm_cmd, sample_cmd, tiny_model_cmd, train_cmd)

class _ErrorMappingGroup(TyperGroup):
    """Turns known errors into messages + exit codes inside click, so CliRunner sees them too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place errors become exit codes
            if _is_framework(e) or _debug():
                raise
            raise typer.Exit(report(e)) from None


def _is_framework(e: BaseException) -> bool:
    """Exit/Abort/usage errors belong to typer (which vendors click): let it handle them (exit 2)."""
    return type(e).__module__.split(".")[0] in ("typer", "click")


app = typer.Typer(
    cls=_ErrorMappingGroup,
    name="textinv",
    help="Train, convert, inspect, share and keep Textual Inversion embeddings.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

app.command("train")(train_cmd.train)
app.command("resume")(resume_cmd.resume)
app.command("sample")(sample_cmd.sample)
app.command("convert")(convert_cmd.convert)
app.command("inspect")(inspect_cmd.inspect)
app.command("pull")(hub_cmd.pull)
app.command("push")(hub_cmd.push)
app.command("list")(list_cmd.list_embeddings)
app.command("rm")(rm_cmd.rm)
app.command("import")(import_cmd.import_embedding)
app.command("backends")(backends_cmd.backends)
app.command("tiny-model")(tiny_model_cmd.tiny_model)


def _debug() -> bool:
    return os.environ.get("TEXTINV_DEBUG", "") not in ("", "0")


def report(exc: BaseException) -> int:
    """Print a known error for a person; return the exit code. Used by main() and tests."""
    from .console import err_console
    from .errors import TextinvError

    if isinstance(exc, TextinvError):
        err_console.print(f"Error: {exc.message}", markup=False)
        if exc.hint:
            err_console.print(exc.hint, markup=False)
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):  # `textinv list --json | head`: the reader left; stop quietly
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    if isinstance(exc, KeyboardInterrupt):
        err_console.print("Interrupted.")
        return 130
    if isinstance(exc, PermissionError):
        err_console.print(f"Error: permission denied: {exc.filename or exc}", markup=False)
        err_console.print("Check the folder's permissions or pick another location.")
        return 1
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        err_console.print("Error: no space left on the device; nothing was written.")
        return 1
    err_console.print(f"Internal error: {type(exc).__name__}: {exc}", markup=False)
    err_console.print("This is a bug in textinv; rerun with TEXTINV_DEBUG=1 for the traceback and report it.")
    return 1


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="textinv")


if __name__ == "__main__":
    main()
