"""textinv runs: the training runs on this machine, and `runs show RUN`: one run's loss curve
(in the terminal and as run/loss.png), settings and validation images.

Where runs are: every run folder a registry entry came from (its origin), and the run
folders under ./runs (train's default, runs/<name>-<time>), plus any `--in FOLDER`. A run's
status and numbers come from its own files (engine/run_log.py): events.jsonl, and its lock
while a process trains it. Light: imports neither torch nor jax.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import List, Optional

import typer

from ...errors import TextinvError

app = typer.Typer(
    help="The training runs: status, step, loss, eval loss, time and registry entry. Lists the run folders "
         "registry entries came from and those under ./runs (train's default place), plus --in FOLDER.",
    invoke_without_command=True, no_args_is_help=False, add_completion=False, rich_markup_mode=None,
    pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def runs(
    ctx: typer.Context,
    folders: Optional[List[Path]] = typer.Option(None, "--in", metavar="FOLDER",
                                                 help="Also look here: a run folder or a folder of runs "
                                                      "(repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the runs as a JSON list."),
) -> None:
    """List training runs: finished, interrupted, running and failed, newest first.

    Runs are found where registry entries were trained (their run folder) and under ./runs
    (train's default place, runs/<name>-<time>); a run trained elsewhere with --run-dir and
    never registered is listed when its folder (or the folder above it) is given with --in.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..console import console, print_json
    from ...untrusted import shown

    found = find_runs(folders or [])
    if json_out:
        print_json([{**info.to_json(), "entry": entry} for info, entry in found])
        return
    if not found:
        console.print("No training runs found (looked in ./runs and the registry's trained entries). "
                      "Start one with `textinv train FOLDER --token \"<name>\" --init WORD`.", markup=False)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (("run", "left"), ("status", "left"), ("step", "right"), ("loss", "right"),
                         ("eval loss", "right"), ("time", "right"), ("updated", "left"), ("entry", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "run", overflow="fold")
    for info, entry in found:
        evals = f"{info.eval_first:.4f} -> {info.eval_last:.4f}" if info.eval_first is not None else "-"
        table.add_row(shown(_short(info.path), 120), _status(info), _step(info),
                      f"{info.last_loss:.4f}" if info.last_loss is not None else "-", evals,
                      _duration(info.seconds), _when(info.updated), shown(entry or "-", 60))
    console.print(table)
    console.print(f"{len(found)} run{'s' if len(found) != 1 else ''}. Details and the loss curve: "
                  "textinv runs show RUN", style="dim", markup=False)


@app.command("show")
def show(
    run: str = typer.Argument(..., metavar="RUN", help="A run folder, its name as `textinv runs` lists it, or the "
                                                       "registry name of the embedding it trained."),
    png: Optional[Path] = typer.Option(None, "--png", help="Where to write the loss curve (default: RUN/loss.png)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run (curve, settings, files) as JSON."),
) -> None:
    """One run: its loss curve (here and as a PNG beside the run), settings and validation images."""
    from ..console import console, print_json
    from ..loss_curve import can_draw_blocks, sparkline, write_png
    from ...untrusted import shown

    folder, entry = resolve_run(run)
    spec = _read_spec(folder)
    from ...engine.run_log import run_info

    info = run_info(folder, spec)
    c = info.curve
    out = png or folder / "loss.png"
    title = f"{info.token or '?'}  {folder.name}  ({info.status}, step {_step(info)})"
    try:
        png_path: Path | None = write_png(out, c.loss, c.eval, title)
    except OSError as e:
        if png is not None:
            raise
        from ..console import err_console

        png_path = None  # a run folder we may not write to (another user's, read-only): the rest still shows
        err_console.print(f"Warning: cannot write {shown(out, 200)} ({shown(e.strerror or e, 80)}); "
                          f"pass --png FILE to write the curve elsewhere.", markup=False, style="yellow")
    if json_out:
        print_json({**info.to_json(), "entry": entry, "loss": c.loss, "eval": c.eval,
                    "png": str(png_path) if png_path else None,
                    "settings": spec})
        return
    import sys

    ascii_only = not can_draw_blocks(getattr(sys.stdout, "encoding", None))
    console.print(f"Run {shown(folder, 200)}: {_status(info)}, step {_step(info)}, {_duration(info.seconds)} training",
                  markup=False)
    if entry:
        console.print(f"Registry entry: {shown(entry, 80)}", markup=False)
    for label, points in (("loss", c.loss), ("eval loss", c.eval)):
        if not points:
            continue
        values = [v for _, v in points]
        console.print(f"{label:<9} {sparkline(points, 48, ascii_only)}  {min(values):.4f} .. {max(values):.4f}, "
                      f"{values[0]:.4f} -> {values[-1]:.4f} (steps {points[0][0]}-{points[-1][0]}, "
                      f"{len(points)} readings)", markup=False)
    if not c.loss and not c.eval:
        console.print("No loss readings yet.", markup=False)
    if png_path is not None:
        console.print(f"Loss curve: {shown(png_path, 300)}", markup=False)
    console.print("Settings: " + _settings(spec), markup=False)
    if info.validation:
        console.print("Validation images:", markup=False)
        for p in info.validation:
            console.print(f"  {shown(p, 300)}", markup=False)
    else:
        console.print("Validation images: none (train with --validate PROMPT)", markup=False)
    if info.embedding:
        console.print(f"Embedding: {shown(info.embedding, 300)}", markup=False)
    if info.error:
        console.print(f"Failed: {shown(info.error, 300)}", markup=False)
    if info.status in ("interrupted", "failed"):
        console.print(f"Continue it: textinv resume {shlex.quote(str(folder))}", markup=False)


# -- finding runs ----------------------------------------------------------------------------

def _is_run(folder: Path) -> bool:
    from ...engine.spec import SPEC_FILE

    try:
        return (folder / SPEC_FILE).is_file()
    except OSError:
        return False


def candidate_folders(extra: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """Run folders: the registry's trained entries' runs, ./runs/*, and `extra` (a run, or a
    folder of runs); with the registry name of each run an entry came from."""
    from ...registry.store import Registry

    entries: dict[Path, str] = {}
    for e in Registry().entries(source="trained"):
        where = (e.origin or {}).get("run") if isinstance(e.origin, dict) else None
        if isinstance(where, str) and where:
            entries.setdefault(Path(where), e.name)
    folders: list[Path] = list(entries)
    for parent in [Path.cwd() / "runs", *extra]:
        parent = Path(parent)
        if _is_run(parent):
            folders.append(parent)
            continue
        try:
            children = sorted(p for p in parent.iterdir() if p.is_dir())
        except OSError:
            continue
        folders += [p for p in children if _is_run(p)]
    seen, unique = set(), []
    for f in folders:
        key = _key(f)
        if key not in seen and _is_run(f):
            seen.add(key)
            unique.append(f)
    return unique, {_key(k): v for k, v in entries.items()}


def _key(p: Path) -> str:
    try:
        return str(p.resolve())
    except OSError:
        return str(p)


def find_runs(extra: list[Path]):
    """[(RunInfo, registry name or None)], newest first."""
    from ...engine.run_log import run_info

    folders, entries = candidate_folders(extra)
    found = [(run_info(f, _read_spec(f)), entries.get(_key(f))) for f in folders]
    return sorted(found, key=lambda x: -(x[0].updated or x[0].started or 0))


def resolve_run(name: str) -> tuple[Path, str | None]:
    """RUN as a folder, a listed run's folder name, or the registry name its embedding got."""
    folders, entries = candidate_folders([])
    path = Path(name).expanduser()
    if _is_run(path):
        return path, entries.get(_key(path))
    matches = [f for f in folders if f.name == name or entries.get(_key(f)) == name]
    if not matches:
        matches = [f for f in folders if f.name.startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0], entries.get(_key(matches[0]))
    from ...untrusted import shown

    if matches:
        raise TextinvError(f"{shown(name)} matches {len(matches)} runs: "
                           + ", ".join(shown(m.name) for m in matches[:5]) + ("..." if len(matches) > 5 else "") + ".",
                           f"Pass one run folder: textinv runs show {shlex.quote(str(matches[0]))}")
    raise TextinvError(f"No run {shown(name)}: not a run folder (one holding spec.json), nor a run that "
                       "`textinv runs` lists.", "See the runs: textinv runs")


def _read_spec(folder: Path) -> dict:
    import json

    from ...engine.spec import SPEC_FILE
    from ...fsutil import read_capped

    try:
        data = json.loads(read_capped(folder / SPEC_FILE, 4 * 1024 * 1024))
    except Exception:  # noqa: BLE001 - a damaged spec.json still lists the run, with what its events say
        return {}
    return data if isinstance(data, dict) else {}


# -- cells ---------------------------------------------------------------------------------

def _short(path: Path) -> str:
    """./runs/x for the runs here, the full path elsewhere."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _status(info) -> str:
    if info.status == "running" and info.pid:
        return f"running (pid {info.pid})"
    return info.status


def _step(info) -> str:
    return f"{info.step}/{info.total}" if info.total else str(info.step)


def _duration(seconds) -> str:
    from ...engine.run_log import duration

    return duration(seconds)


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


SETTINGS = ("token", "init", "model", "vae", "prediction", "clip_skip", "mesh", "steps", "batch_size", "grad_accum",
            "lr", "lr_schedule", "seed", "resolution", "vectors", "property", "precision", "eval_every", "data_dir")
_UNSAID = {"clip_skip": 1}  # a default not worth a word


def _settings(spec: dict) -> str:
    from ...untrusted import shown

    if not spec:
        return "(spec.json is missing or damaged)"
    extra = spec.get("extra") if isinstance(spec.get("extra"), dict) else {}
    shownspec = {**spec, "model": extra.get("model_name") or spec.get("model")}
    parts = []
    for key in SETTINGS:
        v = shownspec.get(key)
        if v is None or v == [] or v == "" or _UNSAID.get(key, object()) == v:
            continue
        if isinstance(v, list):
            v = " ".join(map(str, v))
        parts.append(f"{key.replace('_', '-')} {shown(v, 120)}")
    return ", ".join(parts)
