"""The textinv command line: wiring only. Each command lives in textinv_cli/cli/commands/.

report() is the one place that maps known errors to messages and exit codes:
TextinvError -> its message and hint on stderr, exit 1 (130 for Ctrl-C); a full,
read-only or forbidden disk -> what and where, and the way out, exit 1;
usage errors -> exit 2, two lines in our words (_ErrorMappingGroup.main, cli/usage.py: no usage
block, no blank line, no parser wording); anything else is a bug: a one-line
report, and the traceback only with TEXTINV_DEBUG=1. Whatever is printed, tracebacks
included, has access tokens masked (redact.py).
"""

from __future__ import annotations

import errno
import os
import sys

import typer
from typer.core import TyperGroup

from . import usage

from .commands import completion_cmd
from .commands import mv_cmd, tag_cmd, use_cmd
from .commands import runs_cmd
from .commands import config_cmd
from .commands import models_cmd
from .commands import (backends_cmd, convert_cmd, export_cmd, hub_cmd, import_cmd, inspect_cmd, list_cmd,
                       resume_cmd, rm_cmd, sample_cmd, tiny_model_cmd, train_cmd)

class _ErrorMappingGroup(TyperGroup):
    """Turns known errors into messages + exit codes inside click, so CliRunner sees them too.

    It also speaks the other tools' option names (cli/aliases.py: rewritten before a command
    parses), shows every command in one help style (cli/usage.py), and prints click's usage
    errors in our words (main below)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, cmd in self.commands.items():  # help, completion and errors all see one style
            usage.polish(name, cmd)

    def resolve_command(self, ctx, args):
        from . import aliases

        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            usage.polish(name, cmd)
            try:
                rest = aliases.rewrite(name, rest, usage.option_names(cmd))
            except aliases.AliasUsageError as e:
                from typer._click.exceptions import UsageError

                error = UsageError(str(e), ctx)
                error.textinv_usage = (f"{ctx.command_path} {name}", None)
                raise error from None
            ctx.meta["textinv.args"] = list(rest)  # a bad value is quoted from here (usage.usage_lines)
        return name, cmd, rest

    def invoke(self, ctx):
        from ..redact import install

        install()  # warnings and log records show no token either
        try:
            super().invoke(ctx)
            return None  # a command's return value is not an exit code (main: exit 0)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place errors become exit codes
            if _is_framework(e) or _debug():
                _suggest_ours(e)
                if ctx.invoked_subcommand and not hasattr(e, "textinv_usage"):  # the command's help to name,
                    # and the arguments a bad value is quoted from
                    e.textinv_usage = (f"{ctx.command_path} {ctx.invoked_subcommand}", ctx.meta.get("textinv.args"))
                raise
            raise typer.Exit(report(e)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, except that a usage error is two lines in our words (usage.usage_lines):
        no usage block, no blank line, exit 2."""
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort

        if os.environ.get("_TEXTINV_COMPLETE"):  # a shell asks for completions (textinv completion SHELL)
            from typer.completion import completion_init

            completion_init()
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except ClickException as e:
            if not standalone_mode:
                raise
            sys.exit(_show_usage_error(e))
        except Abort:
            if not standalone_mode:
                raise
            from .console import err_console

            err_console.print("Aborted.", markup=False)
            sys.exit(1)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _show_usage_error(e) -> int:
    from typer._click.exceptions import UsageError

    from .console import err_console
    from ..redact import redact
    from ..untrusted import escape

    if type(e).__name__ == "NoArgsIsHelpError":  # `textinv` alone: the help, as click shows it
        e.show()
        return e.exit_code
    if not isinstance(e, UsageError):
        err_console.print(escape(redact(f"Error: {e.format_message()}")), markup=False)
        return e.exit_code
    path, args = getattr(e, "textinv_usage", (None, None))
    for line in usage.usage_lines(e, args, path):
        err_console.print(escape(redact(line)), markup=False)
    return e.exit_code


def _suggest_ours(e: BaseException) -> None:
    """click's "did you mean" for an unknown option of a command, computed over our names and
    the aliases (aliases.suggest), so it never names an alias nor a wrong neighbour."""
    from typer._click.exceptions import NoSuchOption

    if isinstance(e, NoSuchOption) and e.ctx is not None and e.ctx.parent is not None:
        from . import aliases

        names = [n for p in e.ctx.command.params if not getattr(p, "hidden", False)
                 for n in getattr(p, "opts", []) if p.param_type_name == "option"]
        e.possibilities = aliases.suggest(e.ctx.info_name, e.option_name, names)


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
    context_settings={"help_option_names": ["-h", "--help"]},  # every command inherits -h
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
app.command("mv")(mv_cmd.mv)
app.command("rename", hidden=True)(mv_cmd.mv)  # mv's other name
app.command("use")(use_cmd.use)
app.command("tag")(tag_cmd.tag)
app.command("import")(import_cmd.import_embedding)
app.command("export")(export_cmd.export)
app.command("backends")(backends_cmd.backends)
app.command("tiny-model")(tiny_model_cmd.tiny_model)
app.command("config")(config_cmd.config)
app.command("models")(models_cmd.models)
app.command("completion")(completion_cmd.completion)
app.add_typer(runs_cmd.app, name="runs")


def _print_version(value: bool) -> None:
    """--version: the package's own version string (textinv_cli/__init__.py), nothing imported."""
    if value:
        from .. import __version__

        typer.echo(f"textinv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, expose_value=False, callback=_print_version,
                                       help="Print textinv's version and exit.")) -> None:
    """Train, convert, inspect, share and keep Textual Inversion embeddings."""


MESSAGE_LIMIT = 2000  # characters of one printed message or hint line


def _debug() -> bool:
    return os.environ.get("TEXTINV_DEBUG", "") not in ("", "0")


def report(exc: BaseException) -> int:
    """Print a known error for a person; return the exit code. Used by main() and tests.

    Everything printed goes through redact(): a message may quote a server, a URL or a path,
    and an access token must never show (redact.py).
    """
    from .console import err_console, silence_stdout
    from ..errors import TextinvError
    from ..redact import redact
    from ..untrusted import escape

    def say(text: str) -> None:
        # A message may quote a file's bytes: nothing reaches the terminal raw (escape, newlines
        # included: one line), and it stays a line, not a page. Quotes are cut to 80 characters
        # where they are made (untrusted.shown); this is the net for one that was not (an
        # exception from a library quoting a 100 KB key). Redact first: a token cut in half
        # would no longer look like one.
        line = escape(redact(text))
        if len(line) > MESSAGE_LIMIT:
            line = f"{line[:MESSAGE_LIMIT]}... ({len(line)} characters; the rest is not shown)"
        err_console.print(line, markup=False)

    if isinstance(exc, TextinvError):
        say(f"Error: {exc.message}")
        if exc.hint:
            say(exc.hint)
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):  # `textinv list --json | head`: the reader left; stop quietly
        silence_stdout()
        return 0
    if isinstance(exc, KeyboardInterrupt):
        say("Interrupted.")
        return 130
    storage = _storage_problem(exc)
    if storage is not None:
        for line in storage:
            say(line)
        return 1
    say(f"Internal error: {type(exc).__name__}: {exc}")
    say("This is a bug in textinv; rerun with TEXTINV_DEBUG=1 for the traceback and report it.")
    return 1


def _storage_problem(exc: BaseException) -> tuple[str, str] | None:
    """A full, read-only or forbidden disk (OSError, or SQLite's words for it): what and what to do."""
    from ..errors import DISK_DENIED, DISK_FULL, DISK_PROBLEMS, DISK_READ_ONLY

    code, path = None, None
    if isinstance(exc, OSError):
        code, path = exc.errno, exc.filename
    elif type(exc).__module__ == "sqlite3":  # outside the registry's own translation: say the same thing
        text = str(exc).lower()
        code = (errno.ENOSPC if "full" in text else errno.EROFS if "readonly" in text or "read-only" in text
                else errno.EACCES if "unable to open" in text else errno.EIO if "i/o error" in text else None)
        path = "the registry's database"
    if code not in DISK_PROBLEMS:
        return None
    what = f"Error: {DISK_PROBLEMS[code]}" + (f" ({os.fsdecode(path)})." if path else ".")
    elsewhere = _elsewhere(path)
    if code in DISK_FULL:
        return what, f"Free some space, or {elsewhere}; then run the command again."
    if code in DISK_READ_ONLY:
        return what, f"{elsewhere[0].upper()}{elsewhere[1:]}; then run the command again."
    if code in DISK_DENIED:
        return what, f"Check the folder's permissions, or {elsewhere}."
    return what, "Check the disk (and its free space), then run the command again."


def _elsewhere(path) -> str:
    """Where else to write: the registry moves with TEXTINV_HOME, anything else with the output option."""
    registry = "set TEXTINV_HOME to a folder on another disk"
    if path == "the registry's database":
        return registry
    if path:
        from ..registry.store import home

        try:
            inside = os.path.realpath(os.fsdecode(path)).startswith(os.path.realpath(home()) + os.sep)
        except (OSError, ValueError):
            inside = False
        if inside:
            return registry
        return "write somewhere else (another output folder)"
    return "write somewhere else (another output folder; TEXTINV_HOME for the registry)"


def main(argv: list[str] | None = None) -> None:
    from ..redact import print_traceback

    try:
        app(args=argv, prog_name="textinv")
    except Exception as e:  # noqa: BLE001 - only TEXTINV_DEBUG=1 lets an error get here: show it, masked
        print_traceback(e)
        sys.exit(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    main()
