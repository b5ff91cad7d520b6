"""The files every backend's training run writes, and the checks before it writes any.

check_spec validates a TrainSpec (every option in range, messages naming the flag) before
anything is loaded; the rest writes the run's embeddings (snapshots and the final one in
the diffusers format), checks the run folder, and appends to its event log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from .errors import OutputExistsError, TextinvError
from .spec import TrainSpec

EVENTS = "events.jsonl"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_spec(spec: TrainSpec) -> None:
    """Every option in range, before anything is loaded or written; messages name the flag."""
    from .schedules import validate as validate_schedule

    def need(ok: bool, name: str, what: str, hint: str | None = None):
        if not ok:
            raise TextinvError(f"{_flag(name)} {what}, not {getattr(spec, name)!r}.", hint)

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(spec.token, str) or not spec.token.strip() or any(c.isspace() for c in spec.token):
        raise TextinvError(f"--token must be one word without spaces, not {spec.token!r}.",
                           'For example --token "<cat-toy>".')
    if not spec.init or not all(isinstance(w, str) and w.strip() for w in spec.init):
        raise TextinvError("--init needs at least one non-empty word.", "For example --init toy.")
    need(is_int(spec.vectors) and 1 <= spec.vectors <= 64, "vectors", "must be between 1 and 64")
    need(spec.resolution is None or (is_int(spec.resolution) and spec.resolution > 0), "resolution",
         "must be a positive number of pixels")
    need(is_num(spec.flip_p) and 0 <= spec.flip_p <= 1, "flip_p", "must be a probability between 0 and 1")
    for name in ("steps", "batch_size", "grad_accum", "validate_steps", "num_processes"):
        need(is_int(getattr(spec, name)) and getattr(spec, name) >= 1, name, "must be at least 1")
    for name in ("warmup_steps", "save_every", "checkpoint_every", "keep_checkpoints", "validate_every", "seed"):
        need(is_int(getattr(spec, name)) and getattr(spec, name) >= 0, name, "must be 0 or more")
    need(is_num(spec.lr) and spec.lr > 0, "lr", "must be a positive learning rate", "Typical: 5e-3 (A1111) or 5e-4.")
    validate_schedule(spec.lr_schedule)
    for name in ("adam_beta1", "adam_beta2"):
        need(is_num(getattr(spec, name)) and 0 <= getattr(spec, name) < 1, name, "must be in [0, 1)")
    need(is_num(spec.adam_eps) and spec.adam_eps > 0, "adam_eps", "must be positive")
    need(is_num(spec.weight_decay) and spec.weight_decay >= 0, "weight_decay", "must be 0 or more")
    need(spec.max_grad_norm is None or (is_num(spec.max_grad_norm) and spec.max_grad_norm > 0), "max_grad_norm",
         "must be positive (or left out)")
    need(spec.precision in ("fp32", "fp16", "bf16"), "precision", "must be fp32, fp16 or bf16")
    need(spec.attention in ("sdpa", "xformers"), "attention", "must be sdpa or xformers")
    if not all(isinstance(p, str) and p.strip() for p in spec.validate):
        raise TextinvError("--validate prompts must be non-empty text.")


# -- embeddings the run writes: snapshots and the final one ---------------------------------

def embedding_meta(spec, family: str, step: int, backend: str | None = None) -> dict[str, str]:
    """What the file and the registry keep about where the embedding came from."""
    return {"token": spec.token, "step": str(step), "base_model": str(spec.model), "family": family,
            "learnable_property": spec.property, "vectors": str(spec.vectors), "trained_with": f"textinv {backend or spec.backend}"}


def write_vectors(path: Path, vectors: dict, spec, family: str, step: int, backend: str | None = None) -> Path:
    """The diffusers format at `path` (X.safetensors: {token: [n, w]}); SDXL also writes
    X_2.safetensors beside it, the pair diffusers' SDXL script writes. Returns `path`."""
    from .embedding import Embedding
    from .formats import write_embedding
    from .formats.folders import SDXL_FIRST, SDXL_SECOND, sdxl_pair_files
    from .fsutil import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through Embedding: the same checks (NaN, shapes) and metadata as every other writer.
    emb = Embedding(token=spec.token, vectors=vectors, meta=embedding_meta(spec, family, step, backend))
    if family == "sdxl":
        files = sdxl_pair_files(emb)  # the bytes diffusers' SDXL script writes, under our names
        atomic_write_bytes(path.with_name(path.stem + "_2" + path.suffix), files[SDXL_SECOND], force=True)
        atomic_write_bytes(path, files[SDXL_FIRST], force=True)
        return path
    write_embedding(emb, path, "safetensors", force=True)
    return path


# -- the run folder ----------------------------------------------------------------------

def check_new_run_dir(run: Path) -> None:
    """A new run needs an absent or empty folder in a writable place; checked before any work."""
    if run.is_dir():
        _drop_unstarted_leftovers(run)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise OutputExistsError(f"The run folder {run} already exists and is not empty.",
                                f"Continue it with `textinv resume {run}`, or pick another folder.")
    parent = run
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TextinvError(f"Cannot create the run folder {run}: {parent} is not writable.",
                           "Pick a writable place for the run (--run-dir / --output).")


def _drop_unstarted_leftovers(run: Path) -> None:
    """A run killed while writing its first file (spec.json) left only that temp file: the
    folder never held a run, so it counts as empty rather than blocking `train --run-dir`."""
    from .runs import is_leftover_file

    entries = list(run.iterdir())
    if entries and all(p.is_file() and is_leftover_file(p.name) for p in entries):
        for p in entries:
            p.unlink(missing_ok=True)


def record_event(run: Path, event) -> object:
    """Append the event to run/events.jsonl; numpy arrays are left out (shapes stay).

    Not fsynced (a log, written every step); a process or machine that died mid-line leaves
    a torn last line, which the next append cuts off so every line stays one JSON object."""
    def plain(v):
        if isinstance(v, np.ndarray):
            return list(v.shape)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    line = json.dumps({"time": round(time.time(), 3), **plain(event.to_json())}) + "\n"
    with open(run / EVENTS, "a+b") as f:
        _cut_torn_line(f)
        f.write(line.encode("utf-8"))
    return event


def _cut_torn_line(f) -> None:
    """Truncate a file opened for appending after its last newline, if it does not end in one."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos = end
    while pos > 0:  # walk back in blocks to the last newline (or the start of the file)
        start = max(0, pos - 65536)
        f.seek(start)
        nl = f.read(pos - start).rfind(b"\n")
        if nl >= 0:
            f.truncate(start + nl + 1)
            return
        pos = start
    f.truncate(0)


# -- the loop's bookkeeping: log steps and Ctrl-C --------------------------------------------

def is_log_step(done: int, total: int) -> bool:
    """About 50 loss readings per run, and the last step: the only places we sync with the device."""
    return done % max(1, total // 50) == 0 or done == total


class StopFlag:
    """Ctrl-C asks to stop after the current optimizer step; presses while a checkpoint is
    being written are ignored. A third press outside checkpointing aborts at once.

    `debounce` (seconds) counts signals that arrive together as one press: under torchrun a
    terminal Ctrl-C reaches each worker twice, from the terminal and forwarded by the agent."""

    def __init__(self, debounce: float = 0.0):
        self.requested = False
        self.checkpointing = False
        self.presses = 0
        self.debounce = debounce
        self._last = -math.inf

    def __call__(self, signum, frame):
        self.requested = True
        now = time.monotonic()
        if self.checkpointing or now - self._last < self.debounce:
            return
        self._last = now
        self.presses += 1
        if self.presses >= 3:
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_flag(debounce: float = 0.0):
    flag = StopFlag(debounce)
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals only reach the main thread; the caller stops us another way
        return
    old = signal.signal(signal.SIGINT, flag)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)
