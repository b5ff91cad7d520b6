"""What a finished training run's registration says: which entry it made, whether prompts now
use it, and commands that work as printed (`train` and `resume` both end here).

A run's result is always registered when it can be: a name taken meanwhile (another run,
an import) gives the next free version name (registry/versions.py). "Registered as X" is
said only of the entry this run produced (its origin's run folder is this run); identical
content registered from elsewhere is named as such. If registering fails anyway, the error
says the exact `textinv import` command that registers the run's file.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def register_run(emb, *, run_dir: str, name: str, origin: dict, embedding_path: str):
    """(entry, created, lines to print). Raises the registry's error with the import command."""
    from ..errors import TextinvError
    from ..registry.store import Registry

    registry = Registry()
    try:
        entry, created = registry.add(emb, name=name, source="trained", origin=origin, on_taken="version")
    except TextinvError as e:
        path = embedding_path or str(Path(run_dir) / "learned_embeds.safetensors")
        raise type(e)(f"{e.message} The run finished; its embedding is {path}, not registered.",
                      f"Register it with: {import_command(path, name)}") from None
    return entry, created, lines(registry, entry, created, run_dir=run_dir, name=name)


def import_command(path: str, name: str | None = None) -> str:
    return "textinv import " + shlex.quote(str(path)) + (f" --name {shlex.quote(name)}" if name else "")


def produced_by(entry, run_dir: str) -> bool:
    """Whether `entry` is the one the run in `run_dir` registered (its origin names that run)."""
    run = entry.origin.get("run") if isinstance(entry.origin, dict) else None
    try:
        return bool(run) and Path(str(run)).resolve() == Path(run_dir).resolve()
    except (OSError, ValueError):
        return False


def lines(registry, entry, created: bool, *, run_dir: str, name: str) -> list[str]:
    from ..registry.names import display_name
    from ..registry.versions import switch_note
    from ..untrusted import shown

    shown_name = display_name(entry.name)
    what = f"({shown(entry.token)}, {entry.family}, {entry.n_vectors} vector(s))"
    if created:
        out = [f"Registered as {shown_name} {what}."]
        if entry.name != name:
            out[0] = (f"Registered as {shown_name} {what}: the name {shown(name)} was taken by "
                      "the time the run finished.")
    elif produced_by(entry, run_dir):
        out = [f"Already registered as {shown_name} {what}."]
    else:
        out = [f"Nothing new registered: {shown_name} {what} already holds identical content "
               f"({shown(entry.source)} {shown(entry.created)})."]
    note = switch_note(entry, registry.versions(entry.token))
    if note and (created or not entry.active):
        out.append(note)
    out.append(try_line(entry))
    return out


def try_line(entry) -> str:
    """A sample command that uses this entry, as printed: its token, with --use when not active,
    and --model when it was trained on another model than the one sample uses by default."""
    from ..models.resolve import is_default_model, trained_on_model
    from ..registry.versions import sample_command

    command = sample_command(entry) if not entry.active else f"textinv sample {shlex.quote('a photo of ' + entry.token)}"
    model = trained_on_model(entry.meta or {}, entry.family)
    if model is not None and not is_default_model(model[0]):
        command += f" --model {model[0]}"
    return f"Try: {command}"
