"""A training run on disk, the same for every backend.

    run/
      spec.json                 the TrainSpec: all `textinv resume` needs
      events.jsonl              what happened, one JSON event per line
      checkpoints/step-000500/  written as .step-000500.tmp, renamed, then `complete` added
      snapshots/step-000250.safetensors
      samples/                  validation images
      learned_embeds.safetensors   the final embedding (diffusers format)

A checkpoint counts only when it is a folder named step-<digits> holding a `complete`
marker: a stray `checkpoint-foo`, a leftover .tmp or a folder without the marker is never
picked. Retention deletes the oldest complete ones only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from .errors import TextinvError

CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
FINAL = "learned_embeds.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)\Z")


def new_run_dir(token_name: str, root: Path | None = None) -> Path:
    """runs/<name>-<UTC timestamp>[-n]: created now, so two runs never share a folder."""
    root = Path(root) if root is not None else Path.cwd() / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = root / (f"{token_name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise TextinvError(f"Could not create a run folder in {root}.")


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
    """fsync, rename into place, mark complete, then apply retention (newest `keep`)."""
    for f in tmp.iterdir():
        _fsync(f)
    final = checkpoint_dir(run, step)
    if final.exists():  # a previous attempt at this step that never completed (or did: replace)
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker = final / COMPLETE
    with open(marker, "w") as f:
        f.write(json.dumps({"step": step, "time": time.time()}))
        f.flush()
        os.fsync(f.fileno())
    _fsync(final)
    _fsync(final.parent)
    if keep > 0:
        for _, old in complete_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
