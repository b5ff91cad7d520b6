"""User settings: set once, used by every command that would otherwise need an option.

Each setting is read, first to last, from: its command-line option, its environment
variable, the config file ($TEXTINV_HOME/config.toml, written by `textinv config set`),
then the built-in default. `textinv config list` shows every setting and where its value
comes from. The file is TOML (`model = "..."`), one string per key, read with the standard
library's tomllib; textinv writes it atomically, a person may edit it too.

Only what a user would otherwise repeat on every command belongs here: the base model
(`--model` of train and sample) and the folders its name is looked up in (`model-dirs`,
models/model_files.py has the rule that splits and searches them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionError, TextinvError

FILE_NAME = "config.toml"
FILE_MAX_BYTES = 64 * 1024  # a few settings; anything larger is not a file textinv wrote


@dataclass(frozen=True)
class Setting:
    key: str
    env: str
    default: str
    description: str


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("model", "TEXTINV_MODEL", "tiny",
            "base model of train and sample without --model: a .safetensors/.ckpt checkpoint, a name found in "
            "model-dirs, a diffusers folder, a Hub id, or tiny / tiny-sd2 / tiny-sdxl (random weights, for trying "
            "textinv out)"),
    Setting("model-dirs", "TEXTINV_MODEL_DIRS", "",
            f"folders of single-file checkpoints, separated by {os.pathsep!r} (A1111's models/Stable-diffusion, "
            "ComfyUI's models/checkpoints): --model NAME finds NAME.safetensors there; textinv models lists them"),
)}


def config_path() -> Path:
    from .registry.store import home

    return home() / FILE_NAME


def _setting(key: str) -> Setting:
    if key not in SETTINGS:
        from .untrusted import quoted

        raise OptionError(f"Unknown setting {quoted(key)}.", "Settings: " + ", ".join(SETTINGS) + " (textinv config list).")
    return SETTINGS[key]


def read_file() -> dict[str, str]:
    """The config file's settings ({} without a file). A damaged file is an error that names it."""
    import tomllib

    from .fsutil import read_capped

    path = config_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(read_capped(path, FILE_MAX_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TextinvError(f"The config file {path} cannot be read: {e}.",
                           f"Fix or delete it (it holds only settings: {', '.join(SETTINGS)}).") from None
    return {k: v for k, v in data.items() if k in SETTINGS and isinstance(v, str)}


def lookup(key: str) -> tuple[str, str]:
    """(value, where it came from: the variable's name, the file's path or "default")."""
    setting = _setting(key)
    env = os.environ.get(setting.env, "").strip()
    if env:
        return env, setting.env
    value = read_file().get(key, "").strip()
    if value:
        return value, str(config_path())
    return setting.default, "default"


def get(key: str) -> str:
    return lookup(key)[0]


def write(key: str, value: str | None) -> Path:
    """Set `key` in the config file (None removes it), atomically; returns the file's path."""
    from .writes import atomic_write_bytes

    _setting(key)
    values = read_file()
    if value is None:
        values.pop(key, None)
    else:
        values[key] = value
    # A JSON string is a valid TOML basic string (the same escapes), so json.dumps quotes it.
    text = "# textinv settings (textinv config list shows them; textinv config set KEY VALUE changes them)\n"
    text += "".join(f"{k} = {json.dumps(v, ensure_ascii=False)}\n" for k, v in sorted(values.items()))
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"), force=True)
    return path
