"""Model folders: the single-file checkpoints a user keeps in folders such as A1111's
models/Stable-diffusion or ComfyUI's models/checkpoints (the `model-dirs` setting), listed
and found by name as A1111 names them.

A name is the file's path below its folder, "/"-separated, without the suffix: `sd15/anything`
for models/Stable-diffusion/sd15/anything.safetensors (A1111 shows subfolders that way). It is
also found by its suffixed form and, when only one file has it, by its last part alone.

The folders are the user's own, but still walked with bounds (depth, file count, links that
loop are followed once) so a link to / or a huge tree cannot hang a command.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFoundError

SETTING = "model-dirs"
SUFFIXES = (".safetensors", ".ckpt")
WALK_DEPTH = 8          # folders below a model folder (A1111 users nest by family, then by author)
WALK_FILES = 20_000     # directory entries looked at per model folder before the walk stops
# The command that sets them, as printed in hints (A1111's folder: it works as printed where A1111 is installed).
MODEL_DIRS_EXAMPLE = "textinv config set model-dirs ~/stable-diffusion-webui/models/Stable-diffusion"


@dataclass(frozen=True)
class ModelFile:
    name: str           # what --model takes: sub/stem
    path: Path
    root: Path          # the model folder it was found in
    size: int

    @property
    def file_name(self) -> str:
        """A1111's checkpoint name with its suffix, as its checkpoint menu shows it."""
        return self.name + self.path.suffix


def is_checkpoint_name(name: str) -> bool:
    """Whether `name` ends like a single-file checkpoint (.safetensors / .ckpt, any case)."""
    return name.lower().endswith(SUFFIXES)


def split_dirs(value: str) -> list[Path]:
    """The one rule for a model-dirs value (config file or TEXTINV_MODEL_DIRS): folders
    separated by os.pathsep (':' here, ';' on Windows), `~` expanded, empty parts dropped."""
    return [Path(part.strip()).expanduser() for part in value.split(os.pathsep) if part.strip()]


def model_dirs() -> list[Path]:
    """The configured model folders, in order (config.py: the variable, else the file)."""
    from ..config import get

    return split_dirs(get(SETTING))


def canonical_dirs(value: str) -> str:
    """What `textinv config set model-dirs VALUE` stores: each folder as an absolute path
    (a relative one would change meaning with the working directory). A folder that does
    not exist is refused now, not at the next --model NAME."""
    dirs = split_dirs(value)
    if not dirs:
        raise NotFoundError("model-dirs needs at least one folder.", f"For example: {MODEL_DIRS_EXAMPLE}")
    for folder in dirs:
        if not folder.is_dir():
            from ..untrusted import shown

            raise NotFoundError(f"{shown(folder, 200)} is not a folder.",
                                f"Pass the folders that hold your .safetensors/.ckpt models, separated by "
                                f"{os.pathsep!r} (A1111: stable-diffusion-webui/models/Stable-diffusion).")
    return os.pathsep.join(str(folder.resolve()) for folder in dirs)


def list_model_files(dirs: list[Path] | None = None) -> list[ModelFile]:
    """Every checkpoint file in the model folders, by folder then name. Hidden files and
    folders are skipped, as A1111 does; a folder that is missing is skipped too (the
    commands that name folders say which exist)."""
    found: list[ModelFile] = []
    for root in model_dirs() if dirs is None else dirs:
        if root.is_dir():
            found.extend(sorted(_walk(root), key=lambda f: f.name.lower()))
    return found


def _walk(root: Path):
    seen: set[str] = set()
    looked = 0
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree: once is enough
                continue
            seen.add(real)
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            looked += 1
            if looked > WALK_FILES:
                return
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if depth < WALK_DEPTH:
                        stack.append((Path(entry.path), depth + 1))
                elif entry.is_file() and is_checkpoint_name(entry.name):
                    path = Path(entry.path)
                    rel = path.relative_to(root).as_posix()
                    yield ModelFile(rel[: -len(path.suffix)], path, root, entry.stat().st_size)
            except OSError:
                continue


def matches(name: str, files: list[ModelFile]) -> list[ModelFile]:
    """The files `name` stands for: its full name (with or without the suffix), else, when
    `name` has no folder part, the files whose last part is `name`."""
    name = name.strip().replace("\\", "/")
    exact = [f for f in files if name in (f.name, f.file_name)]
    if exact or "/" in name:
        return exact
    return [f for f in files if name in (f.name.rsplit("/", 1)[-1], f.file_name.rsplit("/", 1)[-1])]


def find_model_file(name: str) -> Path | None:
    """The checkpoint file `name` names in the model folders; None when it names none (the
    caller then tries a Hub id). Several files answering is an error that lists them."""
    dirs = model_dirs()
    if not dirs:
        return None
    found = matches(name, list_model_files(dirs))
    if len(found) > 1:
        from ..untrusted import quoted, shown

        listed = ", ".join(shown(str(f.path), 160) for f in found[:4]) + (", ..." if len(found) > 4 else "")
        raise NotFoundError(f"{len(found)} models are named {quoted(name, 120)}: {listed}.",
                            "Pass its full name (textinv models lists them) or the file's path to --model.")
    return found[0].path if found else None


def missing_model_message(name: str) -> tuple[str, str] | None:
    """(what, what to do) when model folders are set but none holds `name`: the folders
    searched, close names (difflib), and `textinv models`; None without model folders."""
    from ..untrusted import quoted, shown

    dirs = model_dirs()
    if not dirs:
        return None
    files = list_model_files(dirs)
    names = [f.name for f in files]
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    close += [n for n in lowered if name.lower() in n and n not in close][: max(0, 3 - len(close))]
    where = ", ".join(shown(str(d), 160) + ("" if d.is_dir() else " (missing)") for d in dirs)
    what = f"No model named {quoted(name, 120)} in the model folders ({where})."
    if close:
        return what, "Did you mean " + " or ".join(shown(lowered[c], 120) for c in close) + "? All of them: textinv models"
    return what, "See the models there with: textinv models (or pass the file's path to --model)."
