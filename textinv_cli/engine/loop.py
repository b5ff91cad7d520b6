"""The run engine: one training run's protocol, the same for every backend.

    check the spec -> open the backend's session -> the run folder (new, or resumed) ->
    load -> restore the newest complete checkpoint -> barrier -> first write (spec.json,
    tidy what a killed run left) -> started + warnings -> per step: progress, snapshot,
    checkpoint (Ctrl-C ignored while it is written), validation, eval loss, stop where all
    agree -> final validation -> final embedding -> finished (with the run's summary)

The README's guarantees are properties of this sequence. Nothing is written before every
check passed and everything loaded. A checkpoint is the rows and optimizer state the
session hands over, written by runs.write_checkpoint (temp folder, fsync, rename, marker,
retention), so a kill at any moment leaves a complete checkpoint or nothing that counts.
Every random draw of a step follows from (seed, step, micro-step) (batch_plan) and the
learning rate from the step, so restoring rows + moments and replaying steps k+1... gives
bit-identical inputs, and with deterministic kernels bit-identical rows. Multi-process:
every process runs this same sequence; only the session's `is_main` process writes.

Watching a run: the main process holds the run folder's lock (runs.hold_run) from its first
write to its last event, so `textinv runs` can tell a running run from a killed one and a
second `resume` of it is refused; every event also goes to train.log as a line of text and,
with --report-to, to TensorBoard. Loss readings (a host sync) come every log_interval steps;
the eval loss on the fixed batch (eval_batch.py, --eval-every) at step 0 of a new run, every
N steps and at the end: those are the only host syncs.

Imports neither torch nor jax: the session does the math.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from . import run_log, runs
from .eval_batch import EVAL_SAMPLES
from .report_to import Reporter, check_watching
from .captions import captions_for, find_images
from ..errors import TextinvError
from .run_files import (DATA_FILE, base_model_meta, check_new_run_dir, data_change, data_listing, embedding_meta,
                        record_event, save_data_listing, write_vectors)
from .schedules import lr_at
from .spec import (SPEC_FILE, Checkpoint, EvalLoss, Event, Finished, Interrupted, Progress, RunWarning, Snapshot,
                   Started, Summary, TrainSpec, Validation)
from .checks import check_train_spec
from .contract import Backend, Session
from .stop import StopFlag, sigint_flag


def run(backend: Backend, spec: TrainSpec, resume: Path | None = None) -> Iterator[Event]:
    """Train `spec` on `backend` (or continue the run folder `resume`); yields the events.
    Every Backend's `train` is this (see contract.Backend.train)."""
    spec.absorb_extra()  # a caller may have set extra["device"] after construction
    check_train_spec(spec, backend)  # everything a user can get wrong, before anything is loaded
    check_watching(spec)
    session = backend.open_session(spec)
    run_dir = _run_folder(session, spec, resume)
    images, ignored = find_images(Path(spec.data_dir))
    captions = captions_for(images, spec.token, spec.property, spec.captions, template=spec.template)
    listing = data_listing(images, Path(spec.data_dir), spec.template)
    with session.running():
        session.load(images, captions)
        yield from _loop(session, spec, run_dir, resume, len(images), [p.name for p in ignored], listing)


def _run_folder(session: Session, spec: TrainSpec, resume: Path | None) -> Path:
    if resume is not None:
        if not (resume / SPEC_FILE).is_file():
            raise TextinvError(f"{resume} is not a training run (no {SPEC_FILE}).",
                               "Pass the run folder printed at start.")
        _refuse_busy(resume, runs.running_pid(resume))  # before the model loads; hold_run makes it certain
        return resume
    spec.run_dir = session.agree_run_dir(spec.run_dir)  # each process may have planned its own name
    run_dir = Path(spec.run_dir)
    check_new_run_dir(run_dir)
    return run_dir


def _refuse_busy(run: Path, pid: int | None) -> None:
    if pid is not None:
        who = f"process {pid}" if pid else "another process"
        raise TextinvError(f"The run {run} is training now ({who}); two processes cannot continue one run.",
                           "Wait for it to end, or stop it with Ctrl-C; `textinv runs` shows its progress.")


def data_position(step: int, n_images: int, grad_accum: int, global_batch: int) -> dict:
    """Where the data order stands after `step` steps (informational: it follows from the step)."""
    g = step * grad_accum * global_batch
    return {"epoch": g // n_images, "index": g % n_images, "samples_seen": g}


def _loop(session: Session, spec: TrainSpec, run: Path, resume: Path | None, n_images: int,
          ignored: list[str], listing: dict) -> Iterator[Event]:
    start, resumed_from, warnings = 0, None, []
    if resume is not None and (changed := data_change(run, listing)):
        warnings.append(changed)
    if resume is not None:
        found = runs.latest_checkpoint(run)
        if found is None:
            warnings.append(f"{run} has no complete checkpoint; starting again from step 0.")
        else:
            start, resumed_from = min(spec.steps, session.restore(found[1])), str(found[1])

    session.barrier()  # every process loaded and checked everything before the main one creates the run
    watch = _Watch(run, spec, resuming=resume is not None) if session.is_main else None
    if watch is not None and (resume is None or not (run / DATA_FILE).exists()):
        save_data_listing(run, listing)  # what every resume compares with: the data the run began on
    try:
        yield from _steps(session, spec, run, n_images, ignored, start, resumed_from, warnings, watch)
    except Exception as e:
        if watch is not None:
            watch.failed(e)
        raise
    finally:
        if watch is not None:
            watch.close()


class _Watch:
    """What the main process keeps open for a run: the lock, train.log, TensorBoard. Opened at
    the run's first write (a new run's folder holds spec.json before the lock, so one killed
    in between still counts as empty); closed as the last event is recorded (the consumer may
    hold the finished generator a long time: registering, or an exception's traceback)."""

    def __init__(self, run: Path, spec: TrainSpec, resuming: bool):
        self.run, self.lock, self.reporter, self.step = run, None, None, None
        if not resuming:
            run.mkdir(parents=True, exist_ok=True)  # the first write of the run, after every check
            spec.save(run)
        try:
            self.lock = runs.hold_run(run)
        except runs.RunBusyError as e:
            _refuse_busy(run, e.pid or 0)
        if resuming:  # under the lock: a second resume never rewrites a running run's files
            spec.save(run)
            runs.tidy_for_resume(run, spec.keep_checkpoints)  # what a killed process left half-written
        self.reporter = Reporter(run, spec.report_to)

    def record(self, event: Event) -> None:
        if event.kind == "progress":
            self.step = event.data.get("step", self.step)
        record_event(self.run, event)
        record_text(self.run, event)
        if self.reporter is not None:
            self.reporter.event(event.kind, event.data)
        if event.kind in ("finished", "interrupted"):
            self.close()

    def failed(self, error: Exception) -> None:
        """What ended the run, in events.jsonl and train.log, so `textinv runs` can say why it
        failed long after the terminal that showed the error is gone. Never raises over `error`."""
        from ..redact import redact

        if self.lock is None:  # closed: the run had already finished or been interrupted
            return
        message = error.message if isinstance(error, TextinvError) else f"{type(error).__name__}: {error}"
        try:
            event = Event("failed", {"step": self.step, "error": redact(message)[:2000]})
            record_event(self.run, event)
            record_text(self.run, event)
        except Exception:  # noqa: BLE001 - a full disk here must not hide the error that ended the run
            pass
        self.close()

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _steps(session: Session, spec: TrainSpec, run: Path, n_images: int, ignored: list[str], start: int,
           resumed_from: str | None, warnings: list[str], watch: _Watch | None) -> Iterator[Event]:
    total, accum, main = spec.steps, spec.grad_accum, session.is_main
    base_lr = spec.lr * (session.global_batch * accum if spec.scale_lr else 1)
    every, eval_every = log_interval(total, spec.log_every), spec.eval_every

    def emit(payload) -> Event:
        event = Event.of(payload)
        if watch is not None:
            watch.record(event)
        return event

    many = lambda n: n if n > 1 else None  # noqa: E731 - started names counts only above one
    yield emit(Started(run_dir=str(run), device=session.device, family=session.family,
                       model=base_model_meta(spec)["base_model"],  # the file or folder as given, not a conversion
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

    def evaluate(done: int) -> Iterator[Event]:
        loss = session.eval_loss()
        if loss is not None:
            yield emit(EvalLoss(step=done, loss=loss, samples=EVAL_SAMPLES))

    last_checkpoint = start if resumed_from else -1
    with sigint_flag(debounce=session.stop_debounce) as stop:
        if eval_every and start == 0:
            yield from evaluate(0)  # the init rows: where "eval loss A -> B" starts
        began = time.monotonic()
        for step in range(start, total):
            lr = lr_at(step, base_lr=base_lr, schedule=spec.lr_schedule, total_steps=total,
                       warmup_steps=spec.warmup_steps)
            done = step + 1
            loss = session.step(step, lr, stop, log=is_log_step(done, total, every))
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
            if eval_every and (done % eval_every == 0 or done == total):
                yield from evaluate(done)
            if session.agree_to_stop(stop) and done < total:
                path = runs.checkpoint_dir(run, done)
                if main and last_checkpoint != done:
                    path = checkpoint(done, stop)
                yield emit(Interrupted(step=done, checkpoint=str(path)))
                return

    seconds = time.monotonic() - began
    done = total
    if spec.validate and (not spec.validate_every or done % spec.validate_every):
        yield from validate(done)  # once at the end
    vectors = session.vectors()
    meta = embedding_meta(spec, session.family, done, backend=session.name)
    path = run / runs.FINAL
    told = None
    if main:
        write_vectors(path, vectors, spec, session.family, done, backend=session.name)
        told = summary(run, spec, total - start, seconds, path, watch.reporter).to_data()
    yield emit(Finished(step=done, embedding_path=str(path), token=spec.token, vectors=vectors, meta=meta,
                        summary=told))


def summary(run: Path, spec: TrainSpec, steps: int, seconds: float, embedding: Path,
            reporter: Reporter | None) -> Summary:
    """How the run went: this session's speed; the whole run's losses, read back from
    events.jsonl (the readings of every session, the redone steps of a resume dropped)."""
    c = run_log.curve(run_log.read_events(run))
    losses = [v for _, v in c.loss]
    first, last = (c.eval[0], c.eval[-1]) if c.eval else ((None, None), (None, None))
    return Summary(steps=steps, total=spec.steps, seconds=round(seconds, 3),
                   steps_per_s=round(steps / seconds, 3) if seconds > 0 else 0.0, run_dir=str(run),
                   embedding_path=str(embedding), final_loss=losses[-1] if losses else None,
                   mean_loss=sum(losses) / len(losses) if losses else None, eval_first=first[1], eval_last=last[1],
                   eval_first_step=first[0], eval_last_step=last[0], log_file=str(run / run_log.LOG_FILE),
                   tensorboard=str(reporter.log_dir) if reporter is not None and reporter.log_dir else None)


def record_text(run: Path, event: Event) -> None:
    """The event as a line of train.log (appended, not fsynced: a log, like events.jsonl)."""
    line = run_log.log_line(event.to_json())
    if line is not None:
        with open(run / run_log.LOG_FILE, "a", encoding="utf-8") as f:
            f.write(line)


def log_interval(total: int, log_every: int | None = None) -> int:
    """Steps between loss readings: --log-every, else about 50 per run but at least every 10
    steps (a long run still shows a number every few seconds in a log file)."""
    return int(log_every) if log_every else max(1, min(total // 50, 10))


def is_log_step(done: int, total: int, every: int | None = None) -> bool:
    """Every `every` steps (log_interval's default when None), and the last step: with the
    eval steps, the only places the loop syncs with the device."""
    return done % (every or log_interval(total)) == 0 or done == total
