"""--model FILE, --prediction and --vae FILE as train, sample and resume take them: a
single-file checkpoint (or a name found in the model folders) converted once into a cached
diffusers folder, a VAE file joined to the model as a view folder, each step said on
stderr with a progress bar while it takes time. The backends then load a folder, as always.

What is learnt on the way is kept in a ChosenModel for the records: spec.json, the
embedding's metadata (A1111's sd_checkpoint / sd_checkpoint_name) and the PNG parameters
(A1111's Model hash / Model / VAE hash / VAE).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import OptionError, TextinvError
from ..families import FAMILY_NAMES
from ..untrusted import shown
from .console import err_console

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")  # A1111's VAE folder also holds torch.save .pt files


@dataclass
class ChosenModel:
    """The base model of a command, as far as the core prepared it."""

    given: str | None               # --model as typed (None: the configured default)
    model: str                      # what to load: a folder, a tiny name or a Hub id (resolve_model takes it)
    family: str | None = None       # known for a single file (from its keys) and a local folder
    file: Path | None = None        # the single-file checkpoint
    sha256: str | None = None       # its sha256 (A1111's short hash is the first 10 hex)
    prediction: str | None = None   # what the conversion used (the file's, a sidecar's, or --prediction)
    vae_file: Path | None = None
    vae_sha256: str | None = None

    @property
    def label(self) -> str | None:
        """The name messages and the PNG parameters give a single file (its stem, as A1111)."""
        return self.file.stem if self.file is not None else None


def choose_model(given: str | None, *, prediction: str | None, command: str, args: list[str] | None,
                 vae_given: bool = False, before_convert: Callable[[str, str], None] | None = None) -> ChosenModel:
    """`given` (--model, or the configured default) located; a single file scanned (family,
    refusals), checked by `before_convert(family, file name)` (e.g. --from's family), then converted once
    (said, with a progress bar) or found in the cache (said nothing). `command`/`args`: the
    command line, for a hint that reruns it with --prediction. `vae_given`: --vae comes too, so
    a checkpoint without a VAE of its own is fine."""
    from ..models.resolve import default_model, locate_model

    located = locate_model(given or default_model())
    path = Path(located).expanduser()
    if not path.is_file():
        if prediction is not None:
            raise OptionError(f"--prediction is for single-file checkpoints; {shown(located, 120)} says its own "
                              "(its scheduler config).", "Leave --prediction out.")
        return ChosenModel(given, located)
    from ..models.checkpoints.convert import prepare
    from ..models.checkpoints.reader import scan

    path = path.resolve()
    info = scan(path)
    if before_convert is not None:
        before_convert(info.family, path.name)
    if info.family == "sd2" and prediction is None and info.prediction is None:
        raise TextinvError(f"{shown(path.name, 120)} is an SD 2.x model that does not say whether it predicts noise "
                           "(epsilon, the 512 px base models) or velocity (v, the 768 px models).",
                           f"For a 768 px model run: {rerun_with(command, args, '--prediction', 'v')} "
                           "(--prediction epsilon for a 512 px one; an A1111 .yaml beside the file says it too).")
    bar = _Bar(f"Converting {path.name} ({FAMILY_NAMES.get(info.family, info.family)}) to a diffusers folder once, "
               f"cached under {_cache_root()}", hashing=f"Hashing {path.name} (new to textinv, or changed since)")
    with bar:
        prepared = prepare(path, prediction=prediction, progress=bar, vae_given=vae_given)
    return ChosenModel(given, str(prepared.folder), prepared.family or info.family, path, prepared.sha256,
                       prepared.prediction)


def add_vae(chosen: ChosenModel, vae: Path | None, folder: str) -> ChosenModel:
    """`chosen` with `vae` (a VAE file) as its VAE: converted once, joined to `folder` (the
    model's diffusers folder, resolved) as a view folder. No `vae`: `chosen` as it is."""
    if vae is None:
        chosen.model = folder
        return chosen
    from ..models.checkpoints.convert import prepare_vae
    from ..models.model_views import vae_view
    from ..models.resolve import model_family

    path = Path(vae).expanduser()
    if not path.is_file() or not path.name.lower().endswith(VAE_SUFFIXES):
        raise OptionError(f"--vae {shown(str(vae), 160)} is not a .safetensors, .ckpt or .pt file.",
                          "Pass the VAE file itself, e.g. --vae ~/stable-diffusion-webui/models/VAE/"
                          "vae-ft-mse-840000-ema-pruned.safetensors")
    if not Path(folder).is_dir():
        raise TextinvError(f"--vae needs the model on disk; {shown(folder, 120)} is not in the Hugging Face cache.",
                           "Download it first (textinv sample without --vae), or pass a local folder or checkpoint.")
    family = chosen.family or model_family(folder)
    path = path.resolve()
    with _Bar(f"Converting the VAE {path.name} once",
              hashing=f"Hashing the VAE {path.name} (new to textinv, or changed since)") as bar:
        prepared = prepare_vae(path, family, progress=bar)
    label = f"{chosen.label or Path(folder).name}+{path.stem}"
    chosen.model = str(vae_view(Path(folder), Path(prepared.folder), label=label))
    chosen.vae_file, chosen.vae_sha256 = path, prepared.sha256
    chosen.family = family
    return chosen


def choose_with_vae(given: str | None, vae: Path | None, *, prediction: str | None, command: str,
                    args: list[str] | None, before_convert: Callable[[str, str], None] | None = None
                    ) -> tuple[ChosenModel, str | None]:
    """(chosen, target) for train and sample: `given` chosen (choose_model) and, when the model
    is on disk already, `vae` joined to it; `target` is what the early checks read and
    resolve_model takes (the folder made or joined, else `given` as typed)."""
    from ..models.resolve import folder_on_disk

    chosen = choose_model(given, prediction=prediction, vae_given=vae is not None, command=command, args=args,
                          before_convert=before_convert)
    target = chosen.model if chosen.file is not None else given
    on_disk = folder_on_disk(target) if vae is not None else None
    if on_disk is not None:
        target = add_vae(chosen, vae, str(on_disk)).model
    return chosen, target


def with_late_vae(chosen: ChosenModel, vae: Path | None, resolved: str) -> str:
    """`resolved` (resolve_model's folder) with `vae` joined when choose_with_vae could not yet
    (a tiny model built only by resolve_model)."""
    if vae is not None and chosen.vae_file is None:
        return add_vae(chosen, vae, resolved).model
    return resolved


def rerun_with(command: str, args: list[str] | None, *more: str) -> str:
    """The command line that was typed (as click received it, aliases translated), with
    `more` options added before a `--`, quoted to run as printed in a POSIX shell."""
    words = list(args or [])
    at = words.index("--") if "--" in words else len(words)
    words[at:at] = list(more)
    return shlex.join(["textinv", command, *words])


def _cache_root() -> str:
    from ..models.checkpoints.cache import root

    return str(root())


def progress_bar(line: str) -> "_Bar":
    """A progress callback for a step that may take a while (see _Bar), used as a context."""
    return _Bar(line)


class _Bar:
    """A progress callback that shows nothing until it is first called: a conversion or a
    hash that is already cached says nothing. Called as progress(done, total) in any unit
    (bytes, tensors); the line above the bar says what is happening."""

    def __init__(self, line: str, hashing: str | None = None):
        from ..engine.launch import process_rank

        self.line, self.progress, self.task = line, None, None
        # phase -> its line: a conversion found cached behind a file that only needs hashing again
        # (touched, copied) says "Hashing", not "Converting"
        self.lines = {"hashing": hashing or line, "converting": line}
        self.phase = None
        self.quiet = process_rank() != 0  # under a launcher every process prepares; one of them says so

    def __enter__(self):
        return self

    def __call__(self, done=None, total=None, phase=None, *_rest, **_kw) -> None:
        if self.quiet:
            return
        line = self.lines.get(phase, self.line)
        if self.progress is not None and line != self.lines.get(self.phase, self.line):
            self.progress.console.print(line + "…", markup=False)
        self.phase = phase
        if self.progress is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            err_console.print(line + "…", markup=False)
            # a bar only on a terminal: elsewhere (a log, a pipe) the line above says it all
            self.progress = Progress(TextColumn("  "), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                     TimeRemainingColumn(), console=err_console, transient=True,
                                     disable=not err_console.is_terminal)
            self.progress.start()
            self.task = self.progress.add_task("", total=None)
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
