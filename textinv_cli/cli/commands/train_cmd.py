"""textinv train DATA_DIR: train a new embedding on a backend.

Everything is validated before any work: the data folder, the options, and that the
registry name is free, so a bad invocation leaves no run folder and nothing registered.

Several processes (data parallel): `--num-processes N` validates here, plans the run
folder, then starts N copies of this same command with `--run-dir` set (engine/launch.py
launch_processes) and exits with rank 0's code. Started by a launcher instead (torchrun,
`accelerate launch --multi_gpu`), each copy finds WORLD_SIZE in its environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ...engine.checks import ATTENTION, PRECISIONS, RESOLUTION_STEP, VECTORS_MAX
from ..options import MODEL_HELP, PREDICTION_HELP, VAE_HELP, prediction_option

# The option rules are engine/checks.py's, checked on the TrainSpec before anything loads;
# the help below names the same limits and choices.


def train(
    ctx: typer.Context,
    data_dir: Path = typer.Argument(..., help="Folder of training images (optional IMAGE.txt captions beside them)."),
    token: Optional[str] = typer.Option(None, "--token", help='The new placeholder token, e.g. "<cat-toy>" '
                                                               "(with --from: default the entry's token)."),
    init: Optional[str] = typer.Option(None, "--init", help='Word(s) the new vectors start from, e.g. "toy" or "toy '
                                                            'figure"; a registered token ("<cat-toy>") starts from '
                                                            "its vectors."),
    from_name: Optional[str] = typer.Option(None, "--from", metavar="NAME",
                                            help="Continue a registered embedding: start from its vectors (and "
                                                 "vector count); the model must be of its family."),
    template: Optional[Path] = typer.Option(None, "--template", metavar="FILE",
                                            help="Caption template file as A1111's (one per line; [name] is the "
                                                 "token, [filewords] the image's .txt caption or file name)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch or jax (default: the first usable one)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    prediction: Optional[str] = typer.Option(None, "--prediction", metavar="[epsilon|v]", callback=prediction_option,
                                             help=PREDICTION_HELP),
    vae: Optional[Path] = typer.Option(None, "--vae", metavar="FILE", help=VAE_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the token without brackets; when "
                                                                     "taken, its next version: cat-toy-v2)."),
    vectors: int = typer.Option(1, "--vectors", help=f"Vectors per token, 1 to {VECTORS_MAX} (multi-vector embedding)."),
    prop: str = typer.Option("object", "--property", help="object or style: which caption templates to use."),
    captions: str = typer.Option("templates", "--captions", help="templates, files (IMAGE.txt sidecars) or both."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help=f"Training resolution, a multiple of {RESOLUTION_STEP} (default: the model's)."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Accept a size beyond the model's limit (4x its "
                                     "native size, or more than the memory available; also TEXTINV_ALLOW_LARGE=1)."),
    center_crop: bool = typer.Option(False, "--center-crop", help="Crop the central square instead of resizing the whole image."),
    flip_p: float = typer.Option(0.5, "--flip-p", help="Probability of a horizontal flip."),
    steps: int = typer.Option(3000, "--steps", help="Optimizer steps (at least 1)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples per micro-step and process (at least 1)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation steps (at least 1)."),
    fuse_accum: bool = typer.Option(False, "--fuse-accum",
                                    help="Run the --grad-accum micro-steps as one batch: the same loss and "
                                         "gradient, faster on a GPU, with the memory of the whole batch."),
    lr: float = typer.Option(5e-3, "--lr", help="Learning rate."),
    scale_lr: bool = typer.Option(False, "--scale-lr", help="Multiply lr by batch size x accumulation x processes."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help='constant, warmup, cosine, linear, or A1111 style "0.005:100, 1e-3:1000".'),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Warmup steps of the warmup schedule (0 or more)."),
    adam_beta1: float = typer.Option(0.9, "--adam-beta1", help="AdamW beta1 (first-moment decay)."),
    adam_beta2: float = typer.Option(0.999, "--adam-beta2", help="AdamW beta2 (second-moment decay)."),
    adam_eps: float = typer.Option(1e-8, "--adam-eps", help="AdamW epsilon."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay on the new rows."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the rows' gradient norm."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw (initial noise, timesteps, flips, captions)."),
    precision: str = typer.Option("fp32", "--precision", help=f"{', '.join(PRECISIONS)}: for the frozen weights."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    attention: str = typer.Option("sdpa", "--attention", help=f"{', '.join(ATTENTION)}: sdpa (PyTorch's) or xformers (if installed)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels (bit-exact resume on CPU)."),
    clip_skip: int = typer.Option(1, "--clip-skip", metavar="N", help="A1111's Clip skip: condition on the text "
                                  "encoder's N-th layer from the end (1: the last; train with what you sample with)."),
    save_every: int = typer.Option(0, "--save-every", help="Write an embedding snapshot every N steps (0: none)."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Resumable checkpoint every N steps (0: none)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Keep the newest K checkpoints (0: all)."),
    validate: Optional[List[str]] = typer.Option(None, "--validate", help="Prompt for validation images (repeatable)."),
    validate_every: int = typer.Option(0, "--validate-every", help="Validation images every N steps (0: at the end)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", metavar="N",
                                             help="Eval loss on a fixed batch (the same images, noise and timesteps "
                                                  "each time) every N steps: the number to watch (0: off; default: "
                                                  "steps/20 but at least 50, off for runs under 50 steps)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", metavar="N",
                                            help="Read the loss every N steps (default: every steps/50, at least every 10); "
                                                 "one line each in the run's train.log."),
    report_to: Optional[List[str]] = typer.Option(None, "--report-to", metavar="TARGET",
                                                  help="Also log loss, lr and eval loss to: tensorboard (needs "
                                                       "pip install tensorboard; run/tensorboard)."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes",
                                                help="Data-parallel processes, one per GPU (or CPU processes without one); "
                                                     "each takes --batch-size samples per micro-step."),
    mesh: Optional[str] = typer.Option(None, "--mesh", metavar="GRID",
                                       help="jax: the devices as a DATAxMODEL grid, e.g. 4x2 on 8: each frozen "
                                            "weight split over MODEL devices (FSDP), whole on each of the DATA "
                                            "groups; the batch over all (default: Nx1, data parallel)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default: runs/<name>-<time>)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON event per line instead of a progress bar."),
) -> None:
    """Train a Textual Inversion embedding."""
    from ...engine.captions import captions_for, find_images
    from ...embedding import safe_name
    from ...engine.checks import check_train_backend, check_train_spec, train_warnings
    from ...engine.launch import process_rank
    from ...models.resolve import configured_model, model_notes
    from ...errors import TextinvError
    from ...engine.plugins import require_backend
    from ...registry.store import Registry
    from ...engine.run_files import check_new_run_dir
    from ...engine.spec import TrainSpec
    from ...engine.launch import launched_world

    model = configured_model(model)  # --model, else TEXTINV_MODEL / textinv config set model
    world = launched_world()
    if world > 1 and num_processes not in (None, world):
        raise TextinvError(f"--num-processes {num_processes} does not match the {world} processes the launcher started.",
                           "Leave --num-processes out under accelerate launch / torchrun.")
    processes = world if world > 1 else (num_processes if num_processes is not None else 1)
    # The whole spec, checked before anything is read or loaded; the run folder, backend and
    # model are filled in once they are known.
    from ...engine.init_from import start_options

    token, init_list, vectors, start_name = start_options(ctx, token, init, from_name, vectors)
    spec = TrainSpec(
        data_dir=str(Path(data_dir).resolve()), token=token.strip(), init=init_list,
        template=str(template.expanduser().resolve()) if template is not None else None,
        model=model or "tiny", run_dir="", backend=backend or "torch", num_processes=processes,
        vectors=vectors, property=prop, captions=captions, resolution=resolution, center_crop=center_crop,
        flip_p=flip_p, steps=steps, batch_size=batch_size, grad_accum=grad_accum, fuse_accum=fuse_accum, lr=lr, scale_lr=scale_lr,
        lr_schedule=lr_schedule, warmup_steps=warmup_steps, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        adam_eps=adam_eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
        precision=precision, gradient_checkpointing=gradient_checkpointing, attention=attention,
        deterministic=deterministic, clip_skip=clip_skip, save_every=save_every, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, validate=list(validate or []), validate_every=validate_every,
        eval_every=default_eval_every(eval_every, steps), log_every=log_every, report_to=list(report_to or []),
        model_name=model or "tiny", mesh=mesh,
    )
    check_train_spec(spec)
    from ...engine.report_to import check_watching

    check_watching(spec)  # --eval-every, --log-every, --report-to (a missing TensorBoard: before anything loads)
    token = spec.token
    if world == 1 and os.environ.get("MASTER_ADDR") and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        from ..console import err_console

        # `accelerate launch --cpu --num_processes N` starts ONE process unless it runs under MPI
        err_console.print("Warning: accelerate launch --cpu started a single process (several CPU processes need "
                          "MPI there). For N CPU processes use `textinv train --num-processes N`, or "
                          "`accelerate launch --multi_gpu --num_processes N` (gloo, no GPU needed).",
                          markup=False, style="yellow")
    images, _ignored = find_images(data_dir)
    captions_for(images, token, prop, captions, template=spec.template)  # checks the placeholder is in every caption
    from ...engine.checks import check_images_open, check_words_early

    check_images_open(images)  # a broken image, a token or --init word the tokenizer refuses: before torch loads
    from ...engine.init_from import check_model_family
    from ..base_model import choose_with_vae, with_late_vae

    # A checkpoint file is converted here (once; --from's family checked before), so the checks
    # below read the folder a backend will load; `target` is that folder (else `model` as given).
    chosen_model, target = choose_with_vae(
        model, vae, prediction=prediction, command="train", args=ctx.meta.get("textinv.args"),
        before_convert=lambda family, label: check_model_family(start_name, family, label))
    from ...engine.checks import check_size
    from ...models.resolve import folder_on_disk

    check_words_early(token, spec.init, spec.vectors, target)
    if folder_on_disk(target) is not None:  # the side rule now; the memory rule once the backend says where it runs
        check_size(resolution, resolution, str(folder_on_disk(target)), flag="--resolution", allow=allow_large,
                   side_only=True)
    sidecars = sum(1 for img in images if img.with_suffix(".txt").is_file()) if captions == "both" else None

    # A token trained again makes its next version (cat-toy-v2), the active one (registry/versions.py);
    # only an explicit --name that is taken is refused, before any work.
    reg_name = safe_name(name or token)
    existing = Registry().get(reg_name)
    if existing is not None and name is not None:
        import shlex

        from ...registry.names import display_name, rm_command

        free = shlex.quote(display_name(Registry().free_name(reg_name)))
        raise TextinvError(f"The registry already has an embedding named {reg_name} ({existing.token}, {existing.source}).",
                           f"Pass a free name (--name {free}) or leave --name out, or remove it first: "
                           f"{rm_command(reg_name)}")
    if existing is not None:
        reg_name = Registry().free_name(reg_name)

    from ...models.resolve import resolve_model

    if process_rank() == 0 and not (processes > 1 and world == 1):  # the wait until the first step, named
        from ..console import err_console
        from ...models.resolve import loading_line

        err_console.print(loading_line(model, backend), markup=False, style="dim")
    chosen = require_backend(backend)
    check_train_backend(spec, chosen)
    run = run_dir or _planned_run_dir(reg_name)
    check_new_run_dir(run)
    if process_rank() == 0 and not (processes > 1 and world == 1):  # said once, by the process that trains as rank 0
        on_gpu = None if precision == "fp32" else _on_accelerator(chosen)
        _say_before_start([*train_warnings(spec, sidecars=sidecars, on_gpu=on_gpu), *model_notes(model)])
    if processes > 1 and world == 1:  # start the processes; each runs this command again
        from ...engine.launch import launch_processes

        gpus = [d for d in chosen.probe().devices if str(d).startswith("cuda")]
        if gpus and processes > len(gpus) and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
            raise TextinvError(f"--num-processes {processes} needs one GPU per process; this machine shows {len(gpus)}.",
                               f"Use --num-processes {len(gpus)} (or ACCELERATE_USE_CPU=1 for CPU processes).")

        code = launch_processes(["train", *_child_args(ctx, run)], processes)
        if code:
            raise typer.Exit(code)
        return
    # a tiny model is built by the chosen backend (a jax-only install has no torch to build it)
    spec.model = with_late_vae(chosen_model, vae, resolve_model(target, backend=getattr(chosen, "name", None)))
    record_model(spec, chosen_model)
    check_size(resolution, resolution, spec.model, flag="--resolution", allow=allow_large, backend=chosen)  # before it loads
    from ...engine.infotext import model_label
    from ...models.resolve import model_family

    check_model_family(start_name, model_family(spec.model),  # before the model loads
                       chosen_model.file.name if chosen_model.file is not None else model_label(spec.model))
    spec.run_dir, spec.name = str(run.resolve()), reg_name
    spec.backend = getattr(chosen, "name", backend or "torch")
    from ..training import run_training

    run_training(chosen, spec, resume=None, name=reg_name, json_out=json_out)


def record_model(spec, chosen_model) -> None:
    """What spec.json keeps of a single-file model and a --vae file (cli/base_model.py)."""
    if chosen_model.file is not None:
        spec.model_file, spec.model_sha256 = str(chosen_model.file), chosen_model.sha256
        spec.prediction = chosen_model.prediction
    if chosen_model.vae_file is not None:
        spec.vae, spec.vae_sha256 = str(chosen_model.vae_file), chosen_model.vae_sha256


def _say_before_start(notes: list[str]) -> None:
    from ..console import err_console

    for note in notes:
        err_console.print(("Note: " if note.startswith("Model:") else "Warning: ") + note, markup=False,
                          style="dim" if note.startswith("Model:") else "yellow")


def _on_accelerator(backend) -> bool | None:
    """Whether the backend trains on a GPU/TPU here (None when it cannot say)."""
    try:
        devices = backend.probe().devices
    except Exception:  # noqa: BLE001 - only decides whether a warning is worth printing
        return None
    return any(not str(d).lower().startswith("cpu") for d in devices)


def _child_args(ctx: typer.Context, run: Path) -> list[str]:
    """This command's arguments as the user gave them, minus --num-processes, plus --run-dir."""
    opts: list[str] = []
    positional: list[str] = []
    for param in ctx.command.params:
        name, value = param.name, ctx.params.get(param.name)
        if name in ("num_processes", "run_dir") or value is None:
            continue
        if param.param_type_name == "argument":
            positional.append(str(value))
            continue
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "DEFAULT":
            continue
        if getattr(param, "is_flag", False) and isinstance(value, bool):
            if value:
                opts.append(param.opts[0])
            elif param.secondary_opts:
                opts.append(param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for v in value:
                opts += [param.opts[0], str(v)]
        else:
            opts += [param.opts[0], str(value)]
    return [*opts, "--run-dir", str(Path(run).resolve()), "--", *positional]


def default_eval_every(eval_every: int | None, steps: int) -> int:
    """--eval-every as given; left out, about 20 readings but at most one per 50 steps (an
    eval costs about 4 steps: a few % of the run), none for runs under 50 steps."""
    if eval_every is not None:
        return eval_every
    return max(50, steps // 20) if steps >= 50 else 0


def _planned_run_dir(name: str) -> Path:
    """runs/<name>-<UTC time>: the backend creates it once the model and data are validated."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path.cwd() / "runs" / f"{name}-{stamp}"
    run, n = base, 1
    while run.exists():
        run, n = base.with_name(f"{base.name}-{n}"), n + 1
    return run
