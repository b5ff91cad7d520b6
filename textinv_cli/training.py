"""Drive a backend's training generator from the CLI: render events, register the result.

The backend yields events and never prints; this module turns them into a rich progress
bar (or JSON lines with --json), and when the run finishes registers the embedding
(source=trained, origin = the run and its config). Nothing is registered unless the run
finished: an interrupted or failed run leaves only its run folder and checkpoints.

Data-parallel runs: a launcher (torchrun, `accelerate launch --multi_gpu`, or
launch_processes below for `textinv train --num-processes N`) starts one copy of the
command per process with RANK / WORLD_SIZE set. Rank 0 renders and registers; the other
ranks train in step silently (the backend keeps them in step and lets only rank 0 write).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .console import console, err_console, print_json_line
from .errors import Interrupted
from .spec import Event, TrainSpec


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


def process_rank() -> int:
    """This process's rank among those a launcher started (torch's RANK, JAX's JAX_PROCESS_ID), 0 alone."""
    try:
        return int(os.environ.get("RANK") or os.environ.get("JAX_PROCESS_ID") or "0")
    except ValueError:
        return 0


def launched_world() -> int:
    """How many processes a launcher started (WORLD_SIZE), 1 when not launched."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def run_training(backend, spec: TrainSpec, *, resume: Path | None, name: str, json_out: bool) -> dict:
    """Iterate the backend's events to the end; return the registry entry as JSON."""
    events = backend.train(spec, resume)
    if process_rank() != 0:
        return _follow(events)
    if json_out:
        finished = None
        for ev in events:
            print_json_line(_jsonable(ev.to_json()))
            if ev.kind == "finished":
                finished = ev
            elif ev.kind == "interrupted":
                raise _interrupted(ev, spec)
        return _register(finished, spec, name, json_out=True)
    return _render(events, spec, name)


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

    from .untrusted import escape

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "- it/s")

    progress = Progress(
        # markup=False: the description is the token, which `resume` reads back from a run folder
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}", markup=False), TextColumn("lr {task.fields[lr]}", markup=False),
        Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False,
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
                progress.console.print(f"Training {spec.token} on {d.get('model', spec.model)} ({d.get('family', '?')}) "
                                       f"on {d.get('device', '?')}{procs}: {d.get('images', '?')} images{resumed}",
                                       markup=False)
                # escaped here, not only by the console: the column is sized before it renders
                task = progress.add_task(escape(spec.token), total=d.get("total_steps", spec.steps),
                                         completed=d.get("start_step", 0), loss="-", lr="-")
            elif ev.kind == "progress" and task is not None:
                fields = {"lr": f"{d['lr']:.2e}"} if "lr" in d else {}
                if "loss" in d:
                    fields["loss"] = f"{d['loss']:.4f}"
                progress.update(task, completed=d["step"], **fields)
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
    return _register(finished, spec, name, json_out=False)


def _interrupted(ev: Event, spec: TrainSpec) -> Interrupted:
    d = ev.data
    saved = f"checkpoint saved in {d['checkpoint']}" if d.get("checkpoint") else "no checkpoint was written"
    return Interrupted(f"Interrupted at step {d.get('step')}; {saved}.",
                       f"Resume with: textinv resume {shlex.quote(str(spec.run_dir))}")


def _register(finished: Event | None, spec: TrainSpec, name: str, *, json_out: bool) -> dict:
    from .embedding import Embedding
    from .errors import BackendError
    from .registry import Registry
    from .runs import crash_point

    if finished is None:
        raise BackendError("The backend stopped without finishing the run; nothing was registered.",
                           f"Look at {spec.run_dir}/events.jsonl, then `textinv resume {spec.run_dir}`.")
    d = finished.data
    meta = {"learnable_property": spec.property, "base_model": spec.model, "step": str(d.get("step", spec.steps)),
            "backend": spec.backend, **{k: str(v) for k, v in (d.get("meta") or {}).items()}}
    emb = Embedding(d.get("token", spec.token), d["vectors"], meta)
    crash_point("before-register")  # test hook (runs.CRASH_ENV): the final file is written, not yet registered
    origin = {"run": str(Path(spec.run_dir).resolve()), "config": spec.to_json(),
              "embedding_path": str(d.get("embedding_path", ""))}
    entry, created = Registry().add(emb, name=name, source="trained", origin=origin)
    if json_out:
        print_json_line({"event": "registered", "created": created, "entry": entry.to_json()})
    else:
        console.print(f"Embedding: {d.get('embedding_path')}", markup=False)
        verb = "Registered" if created else "Already registered (identical content)"
        console.print(f"{verb} as {entry.name} ({entry.token}, {entry.family}, {entry.n_vectors} vector(s)). "
                      f'Try: textinv sample "a photo of {entry.token}"', markup=False)
    return entry.to_json()


# -- `--num-processes N`: start N copies of the command, as torchrun would --------------------

# After rank 0 ends, the others get KILL_GRACE_MAIN seconds to end too; after another process
# fails, rank 0 gets KILL_GRACE_OTHER (it may be finishing a checkpoint, or be stuck waiting
# for the dead one). Then SIGTERM, and SIGKILL 5 s later.
KILL_GRACE_MAIN = 10.0
KILL_GRACE_OTHER = 30.0


def launch_processes(args: list[str], n: int, *, program: list[str] | None = None) -> int:
    """Run `python -m textinv_cli ARGS` (or PROGRAM ARGS) as n data-parallel processes on this
    machine; return rank 0's exit code (130 when interrupted).

    Each child gets what torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the backend reads those, not this launcher.
    Rank 0 writes to our stdout/stderr as it goes (its progress bar included); the others
    print nothing, and their stderr is shown only when one of them fails first.

    The children run in their own session and we forward SIGINT/SIGTERM, so one Ctrl-C
    reaches each of them exactly once. A process that fails makes us stop the others (after
    a grace period, so rank 0 can finish a checkpoint), as torchrun does; otherwise a rank
    could wait forever for a peer that is gone.
    """
    import socket
    import tempfile

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n),
                LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", NODE_RANK="0")
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # n processes share the cores
    cmd = [*(program or [sys.executable, "-m", "textinv_cli"]), *args]
    procs: list[subprocess.Popen] = []
    logs: list = [None]
    copiers: list[threading.Thread] = []
    preexec = _parent_death_signal()
    try:
        for rank in range(n):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            if rank == 0:
                (out, out_copy), (err, err_copy) = _sink(sys.stdout), _sink(sys.stderr)
            else:
                logs.append(tempfile.TemporaryFile())
                out, err, out_copy, err_copy = subprocess.DEVNULL, logs[-1], None, None
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True,
                                 preexec_fn=preexec)
            procs.append(p)
            for pipe, stream in ((p.stdout, out_copy), (p.stderr, err_copy)):
                if stream is not None:
                    copiers.append(threading.Thread(target=_copy, args=(pipe, stream), daemon=True))
                    copiers[-1].start()
        codes, first_failed, killed = _supervise(procs)
    finally:
        for p in procs:  # still running only if we leave by an exception of our own
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in copiers:
            t.join(timeout=5)
    if first_failed not in (None, 0) and codes[first_failed] != 130:
        from .console import err_console

        log = logs[first_failed]
        log.seek(0)
        tail = log.read()[-4000:].decode("utf-8", "replace").rstrip()
        err_console.print(f"Process {first_failed} of {n} failed (exit code {codes[first_failed]}):", markup=False)
        for line in tail.splitlines():  # one print per line: the console escapes a newline inside one
            err_console.print(line, markup=False, highlight=False)
    for log in logs[1:]:
        log.close()
    if 0 in killed and first_failed not in (None, 0):
        return codes[first_failed] if codes[first_failed] > 0 else 1
    return codes[0] if codes[0] >= 0 else 128 - codes[0]


def _supervise(procs: list[subprocess.Popen]) -> tuple[list[int], int | None, set[int]]:
    """Wait for every process, forwarding Ctrl-C; stop the rest when one ends badly.
    Returns (exit codes, the first rank that failed, the ranks we had to stop)."""
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    first_failed, deadline, term_at, killed = None, None, None, set()
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes, first_failed, killed
            now = time.monotonic()
            if first_failed is None:
                first_failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if deadline is None:
                if codes[0] is not None:
                    deadline = now + KILL_GRACE_MAIN
                elif first_failed is not None:
                    deadline = now + KILL_GRACE_OTHER
            if deadline is not None and now > deadline:
                term_at = now if term_at is None else term_at
                sig = signal.SIGTERM if now < term_at + 5 else signal.SIGKILL
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        killed.add(rank)
                        p.send_signal(sig)
                deadline = now + 1  # re-send once a second until they are gone
            time.sleep(0.05)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _sink(stream):
    """Where a child's output goes: our own file descriptor when the stream has one (the
    child then sees the terminal itself), else a pipe that a thread copies into `stream`."""
    try:
        fd = stream.fileno()
        stream.flush()
        return fd, None
    except (AttributeError, OSError, ValueError):
        return subprocess.PIPE, stream


def _copy(pipe, stream) -> None:
    for line in iter(pipe.readline, b""):
        try:
            stream.write(line.decode("utf-8", "replace"))
            stream.flush()
        except (OSError, ValueError):
            pass
    pipe.close()


def _parent_death_signal():
    """A preexec_fn (Linux) that gives the child SIGTERM when the launcher dies, even by SIGKILL.
    libc is loaded here, in the parent: between fork and exec the child must not import."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except Exception:  # noqa: BLE001 - not Linux: the children outlive a killed launcher, as under torchrun
        return None

    def preexec():
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec
