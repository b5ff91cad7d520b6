"""What a JAX run writes to disk: checkpoints, embedding snapshots, the final embedding, events.

The same files as the torch backend (textinv_torch/state.py), written with the core's
numpy safetensors writer, so neither torch nor the `safetensors` package is needed:

    state.safetensors   rows.<slot>             fp32 [n, width]  the trainable rows
                        adam.<slot>.exp_avg      fp32 [n, width]  optax's mu
                        adam.<slot>.exp_avg_sq   fp32 [n, width]  optax's nu
                        adam.<slot>.step         fp32 []          optax's update count
    state.json          version, step, token, slots, shapes, seed, data position

optax's Adam keeps the same two moments and count as torch's AdamW under the same math,
so the keys mean the same thing in both backends. Everything random in a step follows from
(seed, step, micro-step) (textinv_cli.batch_plan) and the learning rate from the step, so
these arrays are all a run needs to continue exactly. No pickle: a checkpoint is data.

Also the run's bookkeeping the torch trainer has (option checks, Ctrl-C, log steps), kept
here with the same rules and messages because textinv_torch.trainer imports torch.
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

from textinv_cli import runs
from textinv_cli.errors import OutputExistsError, TextinvError
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors

TENSORS = "state.safetensors"
INFO = "state.json"
VERSION = 1  # textinv_torch.state.VERSION: the same format
EVENTS = "events.jsonl"


def save_checkpoint(run: Path, step: int, rows: dict[str, np.ndarray], mu: dict[str, np.ndarray],
                    nu: dict[str, np.ndarray], count: int, info: dict, keep: int) -> Path:
    """Write run/checkpoints/step-NNNNNN/ atomically (temp folder, rename, marker); returns it."""
    tensors = {}
    for slot, r in rows.items():
        tensors[f"rows.{slot}"] = np.asarray(r, np.float32)
        tensors[f"adam.{slot}.exp_avg"] = np.asarray(mu[slot], np.float32)
        tensors[f"adam.{slot}.exp_avg_sq"] = np.asarray(nu[slot], np.float32)
        tensors[f"adam.{slot}.step"] = np.asarray(count, np.float32)
    meta = {"version": VERSION, "step": step, "slots": list(rows),
            "shapes": {s: list(np.shape(r)) for s, r in rows.items()}, **info}
    tmp = runs.begin_checkpoint(run, step)
    (tmp / TENSORS).write_bytes(dump_safetensors(tensors, {"format": "np"}))
    (tmp / INFO).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return runs.commit_checkpoint(run, tmp, step, keep)


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(info, tensors) of a complete checkpoint folder."""
    try:
        info = json.loads((Path(folder) / INFO).read_text("utf-8"))
        tensors, _ = load_safetensors((Path(folder) / TENSORS).read_bytes(), str(Path(folder) / TENSORS))
    except Exception as e:  # noqa: BLE001 - OSError, JSON and format errors all mean "damaged"
        raise TextinvError(f"The checkpoint {folder} cannot be read: {e}",
                           "Delete that checkpoint folder to resume from the one before it.") from None
    if info.get("version") != VERSION:
        raise TextinvError(f"The checkpoint {folder} has format version {info.get('version')!r}; "
                           f"this textinv reads version {VERSION}.")
    return info, tensors


def restore(info: dict, tensors: dict[str, np.ndarray], shapes: dict[str, tuple], token: str,
            folder: Path) -> tuple[int, dict, dict, dict, int]:
    """(step, rows, mu, nu, count) from a checkpoint, checked against the live run's slots
    and shapes. A checkpoint without moments (none written yet) restores zeros."""
    if info.get("token") not in (None, token) or list(info.get("slots", [])) != list(shapes):
        theirs = ", ".join(info.get("slots", []))
        raise TextinvError(f"The checkpoint {folder} is for {info.get('token')!r} ({theirs}), "
                           f"not {token!r} ({', '.join(shapes)}).", "Resume the run it belongs to.")
    rows, mu, nu, count = {}, {}, {}, 0
    for slot, shape in shapes.items():
        saved = tensors.get(f"rows.{slot}")
        if saved is None or tuple(saved.shape) != tuple(shape):
            have = None if saved is None else list(saved.shape)
            raise TextinvError(f"The checkpoint {folder} holds rows of shape {have} for {slot}; "
                               f"the run has {list(shape)}.",
                               "The base model or --vectors changed since the checkpoint was written.")
        rows[slot] = np.asarray(saved, np.float32)
        mu[slot] = np.asarray(tensors.get(f"adam.{slot}.exp_avg", np.zeros(shape)), np.float32)
        nu[slot] = np.asarray(tensors.get(f"adam.{slot}.exp_avg_sq", np.zeros(shape)), np.float32)
        # torch stores a 0-d tensor; the core's writer a [1] array: read either
        count = int(round(float(np.asarray(tensors.get(f"adam.{slot}.step", 0.0)).reshape(-1)[0])))
    return int(info["step"]), rows, mu, nu, count


# -- embeddings the run writes: snapshots and the final one ---------------------------------

def embedding_meta(spec, family: str, step: int) -> dict[str, str]:
    """What the file and the registry keep about where the embedding came from."""
    return {"token": spec.token, "step": str(step), "base_model": str(spec.model), "family": family,
            "learnable_property": spec.property, "vectors": str(spec.vectors), "trained_with": "textinv jax"}


def write_vectors(path: Path, vectors: dict, spec, family: str, step: int) -> Path:
    """The diffusers format at `path` ({token: [n, w]}, what load_textual_inversion reads)."""
    from textinv_cli.embedding import Embedding
    from textinv_cli.formats import write_embedding

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through Embedding: the same checks (NaN, shapes) and metadata as every other writer.
    emb = Embedding(token=spec.token, vectors=vectors, meta=embedding_meta(spec, family, step))
    write_embedding(emb, path, "safetensors", force=True)
    return path


# -- the run folder ----------------------------------------------------------------------

def check_new_run_dir(run: Path) -> None:
    """A new run needs an absent or empty folder in a writable place; checked before any work."""
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise OutputExistsError(f"The run folder {run} already exists and is not empty.",
                                f"Continue it with `textinv resume {run}`, or pick another folder.")
    parent = run
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TextinvError(f"Cannot create the run folder {run}: {parent} is not writable.",
                           "Pick a writable place for the run (--run-dir / --output).")


def record_event(run: Path, event) -> object:
    """Append the event to run/events.jsonl; numpy arrays are left out (shapes stay)."""
    def plain(v):
        if isinstance(v, np.ndarray):
            return list(v.shape)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    with open(Path(run) / EVENTS, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **plain(event.to_json())}) + "\n")
    return event


# -- the run's bookkeeping: options, Ctrl-C, log steps ------------------------------------------
# The torch trainer's rules (textinv_torch/trainer.py), here because that module imports torch.

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_spec(spec) -> None:
    """Every option in range, before anything is loaded or written; messages name the flag."""
    from textinv_cli.schedules import validate as validate_schedule

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
    if spec.attention == "xformers":
        raise TextinvError("--attention xformers is a PyTorch library; the jax backend uses XLA's attention.",
                           "Leave --attention at sdpa with --backend jax, or use --backend torch.")
    if spec.num_processes != 1:
        raise TextinvError("The jax backend trains on every device from one process per host; "
                           f"--num-processes {spec.num_processes} is for --backend torch.",
                           "Leave --num-processes out: all local devices are used (several hosts: "
                           "jax.distributed, JAX_COORDINATOR_ADDRESS).")
    if not all(isinstance(p, str) and p.strip() for p in spec.validate):
        raise TextinvError("--validate prompts must be non-empty text.")


def is_log_step(done: int, total: int) -> bool:
    """About 50 loss readings per run, and the last step: the only places we sync with the device."""
    return done % max(1, total // 50) == 0 or done == total


def position(spec, step: int, n_images: int, processes: int = 1) -> dict:
    """Where the data order stands after `step` steps (informational: it follows from the step)."""
    g = step * spec.grad_accum * spec.batch_size * processes
    return {"epoch": g // n_images, "index": g % n_images, "samples_seen": g}


def describe(devices) -> str:
    """"cpu", "gpu (NVIDIA H200)", "8 x cpu": what the progress line says it trains on."""
    d = devices[0]
    name = d.platform if d.platform == "cpu" else f"{d.platform} ({d.device_kind})"
    return name if len(devices) == 1 else f"{len(devices)} x {name}"


class StopFlag:
    """Ctrl-C asks to stop after the current optimizer step; presses while a checkpoint is
    being written are ignored. A third press outside checkpointing aborts at once."""

    def __init__(self):
        self.requested = False
        self.checkpointing = False
        self.presses = 0

    def __call__(self, signum, frame):
        self.requested = True
        if self.checkpointing:
            return
        self.presses += 1
        if self.presses >= 3:
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_flag():
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals only reach the main thread; the caller stops us another way
        return
    old = signal.signal(signal.SIGINT, flag)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)
