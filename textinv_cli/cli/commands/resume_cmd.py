"""textinv resume RUN: continue a training run from its newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer


def resume(
    run: Path = typer.Argument(..., help="The run folder printed when training started."),
    json_out: bool = typer.Option(False, "--json", help="One JSON event per line instead of a progress bar."),
    num_processes: int = typer.Option(None, "--num-processes", min=1,
                                      help="Continue as N data-parallel processes (any N dividing the global batch)."),
    mesh: str = typer.Option(None, "--mesh", metavar="GRID",
                             help="jax: continue on another DATAxMODEL device grid, e.g. 4x2 (a checkpoint fits any; "
                                  "default: the run's)."),
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
    if mesh is not None:
        from ...engine.checks import parse_mesh

        parse_mesh(mesh)  # the form, before anything loads; whether it fits the devices, the backend says
        spec.mesh = mesh
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

    backend = require_backend(spec.backend)
    reprepare_model(spec, run, backend)
    run_training(backend, spec, resume=run, name=name, json_out=json_out)


def reprepare_model(spec, run: Path, backend) -> None:
    """A run on a single-file checkpoint or with --vae trains on a folder made from them:
    made again from spec.json's record (the cache answers at once, unless `textinv models
    --prune` freed it), so spec.model is a folder that exists. A checkpoint that changed
    since the run started is said: the result can no longer match an uninterrupted run."""
    from ...errors import NotFoundError
    from ...models.model_views import view_info
    from ...models.resolve import resolve_model
    from ...untrusted import shown
    from ..base_model import ChosenModel, add_vae, choose_model
    from ..console import err_console

    if not spec.model_file and not spec.vae:
        return
    if spec.model_file:
        chosen = choose_model(spec.model_file, prediction=spec.prediction, vae_given=bool(spec.vae),
                              command="resume", args=[str(run)])
        if spec.model_sha256 and chosen.sha256 != spec.model_sha256:
            err_console.print(f"Warning: {shown(spec.model_file, 200)} changed since the run started (sha256 "
                              f"{chosen.sha256[:10]}, was {spec.model_sha256[:10]}); the result will not match an "
                              "uninterrupted run.", markup=False, style="yellow")
        base = chosen.model
    else:  # a diffusers folder or tiny model with --vae: the folder the view joined, else the model as typed
        joined = view_info(Path(spec.model))
        base = joined["model"] if joined and Path(joined["model"]).is_dir() else None
        if base is None:
            if not spec.model_name or spec.model_name.startswith((".", "~")):
                raise NotFoundError(f"The model of {run} ({shown(spec.model, 200)}) is gone.",
                                    "Start the run again with textinv train (its options are in spec.json).")
            base = resolve_model(spec.model_name, backend=getattr(backend, "name", None))
        chosen = ChosenModel(spec.model_name, base)
    chosen = add_vae(chosen, Path(spec.vae) if spec.vae else None, base)
    if spec.vae and spec.vae_sha256 and chosen.vae_sha256 != spec.vae_sha256:
        err_console.print(f"Warning: {shown(spec.vae, 200)} changed since the run started; the result will not match "
                          "an uninterrupted run.", markup=False, style="yellow")
    spec.model = chosen.model
