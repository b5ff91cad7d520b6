"""The run engine: one training run's protocol, the same for every backend.

    check the spec -> open the backend's session -> the run folder (new, or resumed) ->
    load -> restore the newest complete checkpoint -> barrier -> first write (spec.json,
    tidy what a killed run left) -> started + warnings -> per step: progress, snapshot,
    checkpoint (Ctrl-C ignored while it is written), validation, stop where all agree ->
    final validation -> final embedding -> finished

The README's guarantees are properties of this sequence. Nothing is written before every
check passed and everything loaded. A checkpoint is the rows and optimizer state the
session hands over, written by runs.write_checkpoint (temp folder, fsync, rename, marker,
retention), so a kill at any moment leaves a complete checkpoint or nothing that counts.
Every random draw of a step follows from (seed, step, micro-step) (batch_plan) and the
learning rate from the step, so restoring rows + moments and replaying steps k+1... gives
bit-identical inputs, and with deterministic kernels bit-identical rows. Multi-process:
every process runs this same sequence; only the session's `is_main` process writes.

Imports neither torch nor jax: the session does the math.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from . import runs
from .captions import captions_for, find_images
from ..errors import TextinvError
from .run_files import check_new_run_dir, embedding_meta, record_event, write_vectors
from .schedules import lr_at
from .spec import (SPEC_FILE, Checkpoint, Event, Finished, Interrupted, Progress, RunWarning, Snapshot, Started,
                    TrainSpec, Validation)
from .checks import check_train_spec
from .contract import Backend, Session
from .stop import StopFlag, sigint_flag


def run(backend: Backend, spec: TrainSpec, resume: Path | None = None) -> Iterator[Event]:
    """Train `spec` on `backend` (or continue the run folder `resume`); yields the events.
    Every Backend's `train` is this (see contract.Backend.train)."""
    spec.absorb_extra()  # a caller may have set extra["device"] after construction
    check_train_spec(spec, backend)  # everything a user can get wrong, before anything is loaded
    session = backend.open_session(spec)
    run_dir = _run_folder(session, spec, resume)
    images, ignored = find_images(Path(spec.data_dir))
    captions = captions_for(images, spec.token, spec.property, spec.captions)
    with session.running():
        session.load(images, captions)
        yield from _loop(session, spec, run_dir, resume, len(images), [p.name for p in ignored])


def _run_folder(session: Session, spec: TrainSpec, resume: Path | None) -> Path:
    if resume is not None:
        if not (resume / SPEC_FILE).is_file():
            raise TextinvError(f"{resume} is not a training run (no {SPEC_FILE}).",
                               "Pass the run folder printed at start.")
        return resume
    spec.run_dir = session.agree_run_dir(spec.run_dir)  # each process may have planned its own name
    run_dir = Path(spec.run_dir)
    check_new_run_dir(run_dir)
    return run_dir


def data_position(step: int, n_images: int, grad_accum: int, global_batch: int) -> dict:
    """Where the data order stands after `step` steps (informational: it follows from the step)."""
    g = step * grad_accum * global_batch
    return {"epoch": g // n_images, "index": g % n_images, "samples_seen": g}


def _loop(session: Session, spec: TrainSpec, run: Path, resume: Path | None, n_images: int,
          ignored: list[str]) -> Iterator[Event]:
    total, accum, main = spec.steps, spec.grad_accum, session.is_main
    base_lr = spec.lr * (session.global_batch * accum if spec.scale_lr else 1)

    start, resumed_from, warnings = 0, None, []
    if resume is not None:
        found = runs.latest_checkpoint(run)
        if found is None:
            warnings.append(f"{run} has no complete checkpoint; starting again from step 0.")
        else:
            start, resumed_from = min(total, session.restore(found[1])), str(found[1])

    session.barrier()  # every process loaded and checked everything before the main one creates the run
    if main:
        run.mkdir(parents=True, exist_ok=True)  # the first write of the run, after every check
        spec.save(run)
        if resume is not None:  # what a killed process left half-written: never picked, now gone
            runs.tidy_for_resume(run, spec.keep_checkpoints)

    def emit(payload) -> Event:
        event = Event.of(payload)
        return record_event(run, event) if main else event

    many = lambda n: n if n > 1 else None  # noqa: E731 - started names counts only above one
    yield emit(Started(run_dir=str(run), device=session.device, family=session.family, model=spec.model,
                       images=n_images, ignored=ignored, total_steps=total, start_step=start,
                       resumed_from=resumed_from, devices=many(session.n_devices),
                       processes=many(session.n_processes)))
    if ignored:
        warnings.append(f"Skipped {len(ignored)} file(s) that are not images: "
                        + ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    for message in warnings + list(session.warnings):
        yield emit(RunWarning(message=message))

    def checkpoint(done: int, stop: StopFlag) -> Path:
        info = {"token": spec.token, "seed": spec.seed,
                "data_position": data_position(done, n_images, accum, session.global_batch)}
        stop.checkpointing = True  # Ctrl-C while the checkpoint is written is ignored
        try:
            return runs.write_checkpoint(run, done, session.checkpoint_files(done, info), spec.keep_checkpoints)
        finally:
            stop.checkpointing = False

    def validate(done: int) -> Iterator[Event]:
        paths = session.validate(run, done)
        if paths is not None:
            yield emit(Validation(step=done, paths=[str(p) for p in paths]))

    last_checkpoint = start if resumed_from else -1
    with sigint_flag(debounce=session.stop_debounce) as stop:
        for step in range(start, total):
            lr = lr_at(step, base_lr=base_lr, schedule=spec.lr_schedule, total_steps=total,
                       warmup_steps=spec.warmup_steps)
            done = step + 1
            loss = session.step(step, lr, stop, log=is_log_step(done, total))
            yield emit(Progress(step=done, total=total, lr=lr, loss=loss))
            if main and spec.save_every and done % spec.save_every == 0:
                path = write_vectors(run / "snapshots" / f"step-{done:06d}.safetensors", session.vectors(), spec,
                                     session.family, done, backend=session.name)
                yield emit(Snapshot(step=done, path=str(path)))
            if spec.checkpoint_every and done % spec.checkpoint_every == 0:
                last_checkpoint = done
                if main:
                    yield emit(Checkpoint(step=done, path=str(checkpoint(done, stop))))
            if spec.validate and spec.validate_every and done % spec.validate_every == 0:
                yield from validate(done)
            if session.agree_to_stop(stop) and done < total:
                path = runs.checkpoint_dir(run, done)
                if main and last_checkpoint != done:
                    path = checkpoint(done, stop)
                yield emit(Interrupted(step=done, checkpoint=str(path)))
                return

    done = total
    if spec.validate and (not spec.validate_every or done % spec.validate_every):
        yield from validate(done)  # once at the end
    vectors = session.vectors()
    meta = embedding_meta(spec, session.family, done, backend=session.name)
    path = run / runs.FINAL
    if main:
        write_vectors(path, vectors, spec, session.family, done, backend=session.name)
    yield emit(Finished(step=done, embedding_path=str(path), token=spec.token, vectors=vectors, meta=meta))


def is_log_step(done: int, total: int) -> bool:
    """About 50 loss readings per run, and the last step: the only places we sync with the device."""
    return done % max(1, total // 50) == 0 or done == total
