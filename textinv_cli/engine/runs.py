"""A training run on disk, the same for every backend.

    run/
      spec.json                 the TrainSpec: all `textinv resume` needs
      data.json                 the files it trains on (size, time): `resume` says when they changed
      events.jsonl              what happened, one JSON event per line
      checkpoints/step-000500/  written as .step-000500.tmp, renamed, then `complete` added
      snapshots/step-000250.safetensors
      samples/                  validation images
      learned_embeds.safetensors   the final embedding (diffusers format)
      train.log                 one line per loss reading, eval, checkpoint... (engine/run_log.py)
      .textinv-run.lock         held (flock) by the process that trains it: `textinv runs` says
                                "running", and a second `resume` of the same run is refused
      loss.png                  the loss curve, drawn by `textinv runs show`

A checkpoint counts only when it is a folder named step-<digits> holding a `complete`
marker: a stray `checkpoint-foo`, a leftover .tmp or a folder without the marker is never
picked. Retention deletes the oldest complete ones only after a newer one is complete and
on disk for good (files, folder and rename fsynced), and first renames each one out of the
step-N pattern, so a process killed mid-delete never leaves a half-deleted folder that still
counts. `tidy_for_resume` sweeps what a killed process left behind when a run resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
FINAL = "learned_embeds.safetensors"
# A checkpoint's own files, one format for every backend (a torch run resumes on JAX and back)
STATE_TENSORS, STATE_INFO, STATE_VERSION = "state.safetensors", "state.json", 1
_STEP_DIR = re.compile(r"step-(\d+)\Z")
_LEFTOVER_DIR = re.compile(r"\.step-\d+\.(tmp|old)\Z")  # a write or a delete that a kill cut short
# writes.atomic_write_bytes' temp files (.NAME.<random>.tmp) for the files a run writes
_LEFTOVER_FILE = re.compile(r"\.(learned_embeds(_2)?\.safetensors|spec\.json|step-\d+(_2)?\.safetensors)\.\w+\.tmp\Z")
# Test hook: tests/test_kill_training.py sets this to "<stage>" or "<stage>:<step>" to SIGKILL
# the process at that point of a checkpoint (or the final) write, to prove a kill there
# loses nothing. Stages: temp-partial, before-rename, after-rename, after-complete,
# during-retention (here) and before-register (textinv_cli.cli.training). Unset in normal use.
CRASH_ENV = "TEXTINV_CHECKPOINT_CRASH_AT"


LOCK = ".textinv-run.lock"


class RunBusyError(Exception):
    """The run folder is held by another process (its pid, when known)."""

    def __init__(self, pid: int | None):
        super().__init__(pid)
        self.pid = pid


def hold_run(run: Path):
    """Lock `run` for this process until the returned file is closed (or the process dies:
    the OS drops an flock with its owner, so a killed run never looks like it still runs).
    Raises RunBusyError when another process holds it. Where flock does not exist (Windows)
    the pid is recorded and nothing is enforced (os.kill there would end the process, so
    a pid is never probed)."""
    f = open(Path(run) / LOCK, "a+")  # noqa: SIM115 - held for the whole run
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = _pid_in(f.read())
            f.close()
            raise RunBusyError(pid) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "started": round(time.time(), 3)}))
    f.flush()
    return f


def running_pid(run: Path) -> int | None:
    """The pid of the process training `run` now (0 when it holds the lock but its pid is
    unknown); None when no process does. Never creates the lock file."""
    try:
        fd = os.open(Path(run) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096).decode("utf-8", "replace")
        try:
            import fcntl
        except ImportError:  # no flock (Windows): whether the run still runs is not known here
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _pid_in(text) or 0
        return None
    finally:
        os.close(fd)  # also drops the shared lock taken just to test it


def _pid_in(text: str) -> int | None:
    try:
        pid = json.loads(text).get("pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def is_leftover_file(name: str) -> bool:
    """Whether `name` is the temp file of a run file (spec, final embedding, snapshot) whose
    write a kill cut short."""
    return bool(_LEFTOVER_FILE.match(name))


def crash_point(stage: str, step: int | None = None) -> None:
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    name, _, at = want.partition(":")
    if name == stage and (not at or at == str(step)):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:06d}"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run) / CHECKPOINTS
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def write_checkpoint(run: Path, step: int, files: dict[str, bytes], keep: int) -> Path:
    """run/checkpoints/step-NNNNNN/ holding `files` (name -> bytes), written so that a kill
    at any moment leaves either the complete folder or nothing that counts; then retention."""
    tmp = begin_checkpoint(run, step)
    try:
        for i, (name, data) in enumerate(files.items()):
            if i:
                crash_point("temp-partial", step)
            (tmp / name).write_bytes(data)  # commit_checkpoint fsyncs each before the rename
    except BaseException:  # e.g. the disk is full: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(run, tmp, step, keep)


def read_checkpoint(folder: Path, read_tensors) -> tuple[dict, dict]:
    """(info, tensors) of a complete checkpoint folder; `read_tensors(path)` is the backend's
    safetensors loader. A damaged or newer checkpoint says which folder to delete."""
    from ..errors import TextinvError

    folder = Path(folder)
    try:
        info = json.loads((folder / STATE_INFO).read_text("utf-8"))
        tensors = read_tensors(folder / STATE_TENSORS)
    except Exception as e:  # noqa: BLE001 - OSError, JSON and the loader's own errors all mean "damaged"
        raise TextinvError(f"The checkpoint {folder} cannot be read: {e}",
                           "Delete that checkpoint folder to resume from the one before it.") from None
    if not isinstance(info, dict) or info.get("version") != STATE_VERSION:
        version = info.get("version") if isinstance(info, dict) else None
        raise TextinvError(f"The checkpoint {folder} has format version {version!r}; "
                           f"this textinv reads version {STATE_VERSION}.")
    return info, tensors


def begin_checkpoint(run: Path, step: int) -> Path:
    """A fresh temp folder to write a checkpoint into; `commit_checkpoint` makes it count."""
    root = Path(run) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(run: Path, tmp: Path, step: int, keep: int) -> Path:
    """fsync, rename into place, mark complete, then apply retention (newest `keep`).

    The order is what makes a kill harmless: the files and their folder are on disk before
    the rename, the rename before the marker, the marker before any older checkpoint goes."""
    final, renamed = checkpoint_dir(run, step), False
    try:
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        crash_point("before-rename", step)
        if final.exists():  # an earlier attempt at this step that a kill cut short before its marker
            _discard(final)
        os.replace(tmp, final)
        renamed = True
        _fsync(final.parent)
        crash_point("after-rename", step)
        with open(final / COMPLETE, "w") as f:
            f.write(json.dumps({"step": step, "time": time.time()}))
            f.flush()
            os.fsync(f.fileno())
        _fsync(final)
    except BaseException:  # an error, not a kill: take back what counts, or might (a torn marker)
        shutil.rmtree(final if renamed else tmp, ignore_errors=True)
        raise
    crash_point("after-complete", step)
    if keep > 0:
        for _, old in complete_checkpoints(run)[:-keep]:
            _discard(old, retention_step=step)
    return final


def tidy_for_resume(run: Path, keep: int) -> list[str]:
    """Remove what killed writes left behind: in run/checkpoints temp folders, folders renamed
    but never marked complete, half-deleted old ones, and complete ones beyond the newest
    `keep` (a kill between a marker and retention); in the run and its snapshots the temp
    files of the final embedding, spec and snapshots. Returns their names. Only names that
    textinv writes: anything else a user put there stays. Called when a run resumes, after
    its checkpoint is loaded and before it writes anything, by the one process that writes."""
    run, gone = Path(run), []
    root = run / CHECKPOINTS
    for _, old in complete_checkpoints(run)[:-keep] if keep > 0 else []:
        _discard(old)
        gone.append(old.name)
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        ours = _LEFTOVER_DIR.match(p.name) or (_STEP_DIR.match(p.name) and not (p / COMPLETE).is_file())
        if ours and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    for folder in (run, run / "snapshots"):
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if is_leftover_file(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def _discard(folder: Path, retention_step: int | None = None) -> None:
    """Delete a checkpoint folder: renamed out of the step-N pattern first (atomic), so from
    that moment it no longer counts, however much of it a kill leaves behind."""
    gone = folder.with_name(f".{folder.name}.old")
    if gone.exists():
        shutil.rmtree(gone, ignore_errors=True)
    os.replace(folder, gone)
    _fsync(folder.parent)
    if retention_step is not None:
        crash_point("during-retention", retention_step)
    shutil.rmtree(gone, ignore_errors=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
