"""textinv resume RUN: continue a training run from its newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer


def resume(
    run: Path = typer.Argument(..., help="The run folder printed when training started."),
    json_out: bool = typer.Option(False, "--json", help="One JSON event per line instead of a progress bar."),
    num_processes: int = typer.Option(None, "--num-processes", min=1,
                                      help="Continue as N data-parallel processes (any N dividing the global batch)."),
) -> None:
    """Resume an interrupted training run; the result is the same as an uninterrupted run."""
    from ...errors import NotFoundError, TextinvError
    from ...engine.plugins import require_backend
    from ...registry.store import Registry
    from ...engine.runs import FINAL
    from ...engine.spec import SPEC_FILE, TrainSpec

    if not (run / SPEC_FILE).is_file():
        raise NotFoundError(f"{run} is not a training run (no {SPEC_FILE}).",
                            "Pass the run folder that `textinv train` printed (runs/<name>-<time>).")
    try:
        spec = TrainSpec.load(run)
    except (ValueError, TypeError) as e:
        raise TextinvError(f"{run / SPEC_FILE} is damaged: {e}.") from None
    name = spec.name or spec.token.strip("<>")
    if (run / FINAL).exists():
        # "registered as" only of the entry this run produced; a finished run that is not
        # registered yet (its name taken meanwhile, a crash) is registered below, as a new version
        from ..registered import produced_by, try_line
        from ...registry.names import display_name

        mine = [e for e in Registry().entries() if produced_by(e, str(run))]
        if mine:
            raise TextinvError(f"This run already finished and is registered as {display_name(mine[0].name)}.",
                               try_line(mine[0]))
    import os

    if num_processes and num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from ...engine.launch import launch_processes

        code = launch_processes(["resume", str(run)] + (["--json"] if json_out else []), num_processes)
        raise typer.Exit(code)
    from ..training import run_training

    run_training(require_backend(spec.backend), spec, resume=run, name=name, json_out=json_out)
