"""textinv config [list | get KEY | set KEY VALUE | unset KEY]: the user's settings (config.py).

Light: reads and writes one small TOML file; imports no backend.
"""

from __future__ import annotations

from typing import Optional

import typer

from ...config import SETTINGS

ACTIONS = ("list", "get", "set", "unset")
EXAMPLES = {"model": "tiny-sd2", "model-dirs": "~/stable-diffusion-webui/models/Stable-diffusion"}  # what `set` shows


def config(
    action: str = typer.Argument("list", metavar="[list|get|set|unset]",
                                 help="list (the default): every setting and where it comes from; get KEY; "
                                      "set KEY VALUE; unset KEY."),
    key: Optional[str] = typer.Argument(None, metavar="[KEY]", help="Setting: " + ", ".join(SETTINGS) + "."),
    value: Optional[str] = typer.Argument(None, metavar="[VALUE]", help="The new value (set only)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show or change settings: model (the default base model; also TEXTINV_MODEL), model-dirs (folders of
    .safetensors/.ckpt models that --model NAME searches; also TEXTINV_MODEL_DIRS)."""
    from ... import config as settings
    from ...errors import OptionError
    from ...untrusted import escape
    from ..console import console, print_json

    if action not in ACTIONS:
        raise OptionError(f"Unknown action {action!r}.", "Use textinv config list, get KEY, set KEY VALUE or unset KEY.")
    needs_key, needs_value = action != "list", action == "set"
    if needs_key and key is None:
        raise OptionError(f"textinv config {action} needs a setting's name.",
                          f"For example: textinv config {action} model" + (" tiny-sd2" if needs_value else ""))
    if needs_value and value is None:
        raise OptionError(f"textinv config set {key} needs a value.", f"For example: textinv config set {key} "
                          + EXAMPLES.get(key, "tiny-sd2"))
    if (action in ("get", "unset") and value is not None) or (action == "list" and key is not None):
        raise OptionError(f"Too many arguments for textinv config {action}.", "See textinv config --help.")

    if action == "list":
        rows = [(k, *settings.lookup(k)) for k in SETTINGS]
        if json_out:
            print_json({k: {"value": v, "from": src, "env": SETTINGS[k].env} for k, v, src in rows})
            return
        for k, v, src in rows:
            console.print(f"{k} = {escape(v)}  ({_from(src)})", markup=False)
            console.print(f"  {SETTINGS[k].description}", markup=False, style="dim")
        console.print(f"File: {escape(settings.config_path())}", markup=False, style="dim")
        return
    if action == "get":
        v, src = settings.lookup(key)
        if json_out:
            print_json({"key": key, "value": v, "from": src})
        else:
            console.print(escape(v), markup=False)
        return
    stored = _canonical(key, value) if action == "set" else None
    path = settings.write(key, stored)
    v, src = settings.lookup(key)
    if json_out:
        print_json({"key": key, "value": v, "from": src, "file": str(path)})
        return
    console.print(f"{'Set' if stored is not None else 'Unset'} {key} in {escape(path)}.", markup=False)
    if src != str(path):  # an environment variable still wins, or unset falls back to the default
        console.print(f"{key} is now {escape(v)} ({_from(src)}).", markup=False)


def _canonical(key: str, value: str) -> str:
    """The value as stored: a model folder or file as its absolute path (models/resolve.canonical_model),
    model folders as absolute paths (models/model_files.canonical_dirs)."""
    if key == "model":
        from ...models.resolve import canonical_model

        return canonical_model(value)
    if key == "model-dirs":
        from ...models.model_files import canonical_dirs

        return canonical_dirs(value)
    return value


def _from(source: str) -> str:
    if source == "default":
        return "the built-in default"
    if source.isupper():
        return f"from the environment variable {source}, which wins over the file"
    return "from the config file"
