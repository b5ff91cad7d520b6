"""How every command shows its options and its usage errors (app.py applies it to each command).

One metavar style: a value is an UPPERCASE word (`--steps N`, `--lr NUMBER`, `--token TOKEN`),
a choice lists its choices (`--precision [fp32|fp16|bf16]`), an argument is its NAME in the
usage line. Choices are read from where each rule lives (formats.WRITERS, engine/checks.py,
families.py, the installed backends), at help time only: a command's start imports nothing more.

Usage errors (exit 2) are printed as every other error: `Error: what`, then one line saying
what to do, no usage block and no blank line, and never the wording of the library that
parsed the value (typer coerces through pydantic: "Input should be a valid integer...").
"""

from __future__ import annotations

import re

from typer.core import TyperArgument, TyperOption

# Choices by option name: (module, attribute) read lazily; command-specific ones first.
_CHOICES = {
    ("convert", "--to"): ("textinv_cli.formats", "WRITERS"),
    ("tiny-model", "--family"): ("textinv_cli.families", "TRAINABLE_FAMILIES"),
    ("push", "--format"): ("textinv_cli.cli.usage", "PUSH_FORMATS"),
    "--family": ("textinv_cli.families", "FAMILIES"),
    "--scheduler": ("textinv_cli.engine.checks", "SCHEDULERS"),
    "--precision": ("textinv_cli.engine.checks", "PRECISIONS"),
    "--attention": ("textinv_cli.engine.checks", "ATTENTION"),
    "--captions": ("textinv_cli.engine.captions", "MODES"),
    "--property": ("textinv_cli.engine.captions", "PROPERTIES"),
    "--backend": ("textinv_cli.cli.usage", "BACKENDS"),
    "--report-to": ("textinv_cli.engine.report_to", "REPORT_TO"),
}
PUSH_FORMATS = ("a1111", "kohya")  # what push --format adds (hub_cmd's help says the same)

# Metavars by option name where the type alone says too little.
_WORDS = {"--token": "TOKEN", "--init": "WORDS", "--model": "MODEL", "--name": "NAME", "--key": "KEY",
          "--lr-schedule": "SCHEDULE", "--size": "SIZE", "--negative": "PROMPT", "--validate": "PROMPT",
          "--tag": "TAG", "--max-size": "MIB", "--use": "NAME"}
_BY_TYPE = {int: "N", float: "NUMBER", bool: "BOOL"}


def choices_for(command: str, param) -> tuple[str, ...] | None:
    """The values an option takes, when they are a fixed list; None otherwise."""
    import importlib

    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_choice:
        return tuple(str(getattr(c, "value", c)) for c in desc.choices or ())
    for name in param.opts:
        where = _CHOICES.get((command, name)) or _CHOICES.get(name)
        if where is not None:
            if where == ("textinv_cli.cli.usage", "BACKENDS"):
                return _backend_names()
            found = getattr(importlib.import_module(where[0]), where[1])
            return tuple(found)
    return None


def _backend_names() -> tuple[str, ...]:
    """The installed backends' names, from the entry points alone (nothing is imported)."""
    from importlib.metadata import entry_points

    names = tuple(dict.fromkeys(ep.name for ep in entry_points(group="textinv.backends")))
    return names or ("torch", "jax")


def metavar(command: str, param) -> str:
    choices = choices_for(command, param)
    if choices:
        return "[" + "|".join(choices) + "]"
    if param.metavar is not None:
        return param.metavar
    for name in param.opts:
        if name in _WORDS:
            return _WORDS[name]
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", str)
    if getattr(param.type_descriptor, "is_path", False):
        return "PATH"
    return _BY_TYPE.get(annotation, "TEXT")


class Option(TyperOption):
    """An option shown in our metavar style (set on the instances typer built: app.polish)."""

    command_name = ""

    def display_type_rich(self, ctx):
        return metavar(self.command_name, self) + ("..." if self.nargs != 1 else "")


class Argument(TyperArgument):
    """NAME (or its choices a|b) once: a metavar given as "[KEY]" or "TAG..." is not wrapped twice."""

    def display_type_rich(self, ctx):
        return None  # the NAME says it; typer would add "<str>"

    @property
    def display_name_raw(self) -> str:
        name = (self.metavar or self.name.upper()).strip("[]")
        return name[:-3] if name.endswith("...") else name

    def _rich_display_name(self) -> str:
        name = self.display_name_raw
        name = f"[{name}]" if "|" in name else name
        return name + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


_OPTION_CLASSES: dict[str, type] = {}


def polish(command_name: str, cmd) -> None:
    """Show `cmd`'s parameters in our style; idempotent."""
    if getattr(cmd, "_textinv_polished", False):
        return
    cmd._textinv_polished = True
    for sub_name, sub in getattr(cmd, "commands", {}).items():  # a command group (textinv runs ...)
        polish(sub_name, sub)
    option_class = _OPTION_CLASSES.setdefault(command_name, type("Option", (Option,), {"command_name": command_name}))
    for param in cmd.params:
        if type(param) is TyperOption:
            param.__class__ = option_class
        elif type(param) is TyperArgument:
            param.__class__ = Argument


def option_names(cmd) -> dict[str, bool]:
    """Each option name of `cmd` (short and long, help included) -> whether it takes a value."""
    names: dict[str, bool] = {"--help": False, "-h": False}
    for param in cmd.params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        takes = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
        for name in [*param.opts, *param.secondary_opts]:
            names[name] = takes
    return names


# typer's (pydantic's) words -> ours; the value is added where the command line shows it.
_REWORD = [
    (re.compile(r"^Input should be a valid integer.*", re.S), "must be a whole number"),
    (re.compile(r"^Input should be a valid number.*", re.S), "must be a number"),
    (re.compile(r"^Input should be a valid boolean.*", re.S), "must be true or false"),
    (re.compile(r"^Input should be greater than or equal to (\S+?)\.?$"), r"must be at least \1"),
    (re.compile(r"^Input should be less than or equal to (\S+?)\.?$"), r"must be at most \1"),
    (re.compile(r"^Input should be greater than (\S+?)\.?$"), r"must be above \1"),
    (re.compile(r"^Input should be less than (\S+?)\.?$"), r"must be below \1"),
    (re.compile(r"^(?:Value error, )?'.*' is not one of (.*?)\.?$", re.S),
     lambda m: "must be one of " + ", ".join(re.findall(r"'([^']*)'", m.group(1)))),
    (re.compile(r"^Value error, (.*)$", re.S), r"\1"),
    (re.compile(r"^Input should be (.*?)\.?$", re.S), r"must be \1"),
]


def usage_lines(exc, args: list[str] | None, path: str | None = None) -> tuple[str, str]:
    """A click/typer usage error of the command `path` ("textinv train"), given `args` -> (`Error: ...`
    line, what-to-do line)."""
    from typer._click.exceptions import BadParameter, MissingParameter, NoSuchOption

    ctx = getattr(exc, "ctx", None)
    path = path or (ctx.command_path if ctx is not None else "textinv")
    hint = f"Try: {path} --help"
    if isinstance(exc, BadParameter) and not isinstance(exc, MissingParameter) and exc.param is not None:
        param = exc.param
        names = [*getattr(param, "opts", [])]
        shown = names[-1] if names and param.param_type_name == "option" else param.name.upper()
        for n in names:  # the long name reads best
            if n.startswith("--"):
                shown = n
        text = str(exc.message).strip()
        if text.startswith(shown) or text.startswith("--"):
            return f"Error: {_sentence(text)}", hint
        for pattern, words in _REWORD:
            if pattern.match(text):
                text = pattern.sub(words, text)
                break
        value = _value_of(names, args or [])
        tail = f", not {value!r}" if value is not None and ", not " not in text else ""
        return f"Error: {shown} {text.rstrip('.')}{tail}.", hint
    if isinstance(exc, NoSuchOption):
        message = exc.message.rstrip(".")
        if exc.possibilities:
            message += f" (did you mean {' or '.join(exc.possibilities)}?)"
        return f"Error: {_sentence(message)}", hint
    return f"Error: {_sentence(exc.format_message())}", hint


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "?", "!", ")")) else text + "."


def _value_of(names: list[str], args: list[str]) -> str | None:
    """The value last given to an option named `names` in `args` (what click took)."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        head, eq, rest = arg.partition("=")
        if head in names:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value
