"""Drive a backend's training generator from the CLI: render events, register the result.

The backend yields events and never prints; this module turns them into a rich progress
bar (or JSON lines with --json), and when the run finishes registers the embedding
(source=trained, origin = the run and its config). Nothing is registered unless the run
finished: an interrupted or failed run leaves only its run folder and checkpoints.

Data-parallel runs: a launcher (torchrun, `accelerate launch --multi_gpu`, or
engine/launch.py for `textinv train --num-processes N`) starts one copy of the
command per process with RANK / WORLD_SIZE set. Rank 0 renders and registers; the other
ranks train in step silently (the backend keeps them in step and lets only rank 0 write).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from .console import console, err_console, print_json_line
from ..errors import Interrupted
from ..engine.launch import process_rank
from ..engine.run_log import duration, summary_lines, text_line
from ..engine.spec import Event, TrainSpec


def _jsonable(data: dict) -> dict:
    """Events may carry numpy vectors (finished); JSON lines carry their shapes instead."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and any(isinstance(x, np.ndarray) for x in v.values()):
            out[k] = {s: list(a.shape) for s, a in v.items()}
        elif isinstance(v, np.ndarray):
            out[k] = list(v.shape)
        else:
            out[k] = v
    return out


def run_training(backend, spec: TrainSpec, *, resume: Path | None, name: str, json_out: bool) -> dict:
    """Iterate the backend's events to the end; return the registry entry as JSON."""
    events = backend.train(spec, resume)
    if process_rank() != 0:
        return _follow(events)
    if json_out:
        finished = None
        out = _Stdout(spec)
        for ev in events:
            out.line(_jsonable(ev.to_json()))
            if ev.kind == "finished":
                finished = ev
            elif ev.kind == "interrupted":
                raise _interrupted(ev, spec)
        return _register(finished, spec, name, json_out=True, out=out)
    return _render(events, spec, name)


class _Stdout:
    """JSON lines on stdout that survive their reader leaving.

    `textinv train --json | tee log` and Ctrl-C: the whole pipeline gets SIGINT, tee dies
    first, and the next line would raise BrokenPipeError; a `jq` that quits does the same.
    Elsewhere BrokenPipeError means "the reader left, stop quietly" (app.report), but here
    stopping would drop the run without a checkpoint. So the training goes on: stdout goes to
    /dev/null, stderr says so once, and the run ends as it would have (registered when it
    finishes; on Ctrl-C, its checkpoint and the resume command on stderr). Every event is
    still in the run folder's events.jsonl."""

    def __init__(self, spec: TrainSpec):
        self.spec, self.gone = spec, False

    def line(self, obj: dict) -> None:
        if self.gone:
            return
        try:
            print_json_line(obj)
        except (BrokenPipeError, ValueError):  # ValueError: stdout already closed
            self.gone = True
            _silence_stdout()
            err_console.print(f"Warning: standard output was closed (its reader left); training goes on. "
                              f"Every event is in {Path(self.spec.run_dir) / 'events.jsonl'}.",
                              markup=False, style="yellow")


def _silence_stdout() -> None:
    """stdout's descriptor and Python's stream at /dev/null (console.silence_stdout does the
    descriptor): training prints on, to nowhere, without raising again at exit."""
    import os
    import sys

    from .console import silence_stdout

    silence_stdout()
    try:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    except OSError:
        pass


def _follow(events) -> dict:
    """Ranks other than 0: train in step, print nothing, register nothing. Rank 0 owns the
    outcome; on Ctrl-C the others leave with 0 once everyone agreed to stop, so a launcher
    that kills the group when one process fails (torchrun does) never kills rank 0 while it
    writes the checkpoint."""
    for ev in events:
        if ev.kind == "interrupted":
            break
    return {}


def _render(events, spec: TrainSpec, name: str) -> dict:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    from ..untrusted import escape

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "- it/s")

    evals = [TextColumn("eval {task.fields[eval]}", markup=False)] if spec.eval_every else []
    # Not a terminal (a log file, CI, nohup): rich never redraws the bar there, so nothing
    # would show until the end; one line per loss reading instead (_Lines), as in train.log.
    lines = None if err_console.is_terminal else _Lines()
    progress = Progress(
        # markup=False: the description is the token, which `resume` reads back from a run folder
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}", markup=False), *evals, TextColumn("lr {task.fields[lr]}", markup=False),
        Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False, disable=lines is not None,
    )
    finished = None
    with progress:
        task = None
        for ev in events:
            d = ev.data
            if ev.kind == "started":
                progress.console.print(f"Run folder: {d.get('run_dir')}", markup=False)
                resumed = f", resumed from step {d['start_step']}" if d.get("start_step") else ""
                procs = f" x {d['processes']} processes" if d.get("processes", 1) > 1 else ""
                model = d.get("model", spec.model)  # as given: a checkpoint's file, not its conversion
                progress.console.print(f"Training {spec.token} on {model} ({d.get('family', '?')}) "
                                       f"on {d.get('device', '?')}{procs}: {d.get('images', '?')} images{resumed}",
                                       markup=False)
                # escaped here, not only by the console: the column is sized before it renders
                task = progress.add_task(escape(spec.token), total=d.get("total_steps", spec.steps),
                                         completed=d.get("start_step", 0), loss="-", lr="-", eval="-")
                if lines is not None:
                    lines.start(d.get("start_step", 0))
            elif ev.kind == "progress" and task is not None:
                fields = {"lr": f"{d['lr']:.2e}"} if "lr" in d else {}
                if "loss" in d:
                    fields["loss"] = f"{d['loss']:.4f}"
                progress.update(task, completed=d["step"], **fields)
                if lines is not None and ("loss" in d or lines.due()):
                    progress.console.print(lines.progress(ev.to_json()), markup=False)
            elif ev.kind == "eval" and task is not None:
                progress.update(task, eval=f"{d['loss']:.4f}")
                if lines is not None:
                    progress.console.print(text_line(ev.to_json()), markup=False)
            elif ev.kind == "warning":
                progress.console.print(f"Warning: {d.get('message')}", markup=False, style="yellow")
            elif ev.kind == "checkpoint":
                progress.console.print(f"Checkpoint at step {d['step']}: {d['path']}", markup=False, style="dim")
            elif ev.kind == "snapshot":
                progress.console.print(f"Embedding snapshot at step {d['step']}: {d['path']}", markup=False, style="dim")
            elif ev.kind == "validation":
                progress.console.print(f"Validation images at step {d['step']}: " + ", ".join(map(str, d.get("paths", []))),
                                       markup=False, style="dim")
            elif ev.kind == "interrupted":
                progress.stop()
                raise _interrupted(ev, spec)
            elif ev.kind == "finished":
                finished = ev
    if finished is not None and isinstance(finished.data.get("summary"), dict):
        for line in summary_lines(finished.data["summary"]):
            console.print(line, markup=False)
    return _register(finished, spec, name, json_out=False)


class _Lines:
    """Progress as lines of text, for a stderr that is not a terminal: the step, loss and lr
    (as train.log has them), the speed and the time left; at each loss reading, and between
    them at least every EVERY_S seconds (slow steps: a log that shows the run is alive)."""

    EVERY_S = 30.0

    def start(self, step: int) -> None:
        import time

        self.t0 = self.last = time.monotonic()
        self.step0 = step

    def due(self) -> bool:
        import time

        return time.monotonic() - self.last >= self.EVERY_S

    def progress(self, ev: dict) -> str:
        import time

        self.last = time.monotonic()
        line = text_line(ev) or f"step {ev['step']}/{ev['total']}"  # between readings: no loss to show
        elapsed, done = self.last - self.t0, ev["step"] - self.step0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            line += f"  {rate:.2f} it/s  {duration(elapsed)} elapsed, {duration((ev['total'] - ev['step']) / rate)} left"
        return line


def _interrupted(ev: Event, spec: TrainSpec) -> Interrupted:
    d = ev.data
    saved = f"checkpoint saved in {d['checkpoint']}" if d.get("checkpoint") else "no checkpoint was written"
    return Interrupted(f"Interrupted at step {d.get('step')}; {saved}.",
                       f"Resume with: textinv resume {shlex.quote(str(spec.run_dir))}")


def _register(finished: Event | None, spec: TrainSpec, name: str, *, json_out: bool,
              out: _Stdout | None = None) -> dict:
    from ..embedding import Embedding
    from ..errors import BackendError
    from .registered import register_run
    from ..engine.runs import crash_point

    if finished is None:
        raise BackendError("The backend stopped without finishing the run; nothing was registered.",
                           f"Look at {spec.run_dir}/events.jsonl, then `textinv resume {spec.run_dir}`.")
    d = finished.data
    from ..engine.run_files import base_model_meta

    meta = {"learnable_property": spec.property, **base_model_meta(spec), "step": str(d.get("step", spec.steps)),
            "backend": spec.backend, **{k: str(v) for k, v in (d.get("meta") or {}).items()}}
    emb = Embedding(d.get("token", spec.token), d["vectors"], meta)
    crash_point("before-register")  # test hook (runs.CRASH_ENV): the final file is written, not yet registered
    origin = {"run": str(Path(spec.run_dir).resolve()), "config": spec.to_json(),
              "embedding_path": str(d.get("embedding_path", ""))}
    # a name taken meanwhile gives the next version; what is said is registered.py's
    entry, created, said = register_run(emb, run_dir=str(spec.run_dir), name=name, origin=origin,
                                        embedding_path=str(d.get("embedding_path", "")))
    if json_out:
        out = out or _Stdout(spec)
        out.line({"event": "registered", "created": created, "entry": entry.to_json(), "message": " ".join(said)})
        if out.gone:  # the reader never saw the outcome: say it where someone may
            first = f"Registered as {entry.name} ({entry.token})." if created else said[0]
            for line in [first, *said[1:]]:
                err_console.print(line, markup=False)
    else:
        console.print(f"Embedding: {d.get('embedding_path')}", markup=False)
        for line in said:
            console.print(line, markup=False)
    return entry.to_json()


# -- `--num-processes N`: start N copies of the command, as torchrun would --------------------
