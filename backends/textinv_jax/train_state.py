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

import json
from pathlib import Path

import numpy as np

from textinv_cli import run_files, runs
from textinv_cli.run_files import StopFlag, is_log_step, sigint_flag  # noqa: F401 - shared with torch
from textinv_cli.errors import TextinvError
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors

TENSORS = "state.safetensors"
INFO = "state.json"
VERSION = 1  # textinv_torch.state.VERSION: the same format


def save_checkpoint(run: Path, step: int, rows: dict[str, np.ndarray], mu: dict[str, np.ndarray],
                    nu: dict[str, np.ndarray], count: int, info: dict, keep: int) -> Path:
    """Write run/checkpoints/step-NNNNNN/ through the core's runs.write_checkpoint (temp folder,
    fsync, rename, marker, retention: a kill at any point loses nothing); returns it."""
    tensors = {}
    for slot, r in rows.items():
        tensors[f"rows.{slot}"] = np.asarray(r, np.float32)
        tensors[f"adam.{slot}.exp_avg"] = np.asarray(mu[slot], np.float32)
        tensors[f"adam.{slot}.exp_avg_sq"] = np.asarray(nu[slot], np.float32)
        tensors[f"adam.{slot}.step"] = np.asarray(count, np.float32)
    meta = {"version": VERSION, "step": step, "slots": list(rows),
            "shapes": {s: list(np.shape(r)) for s, r in rows.items()}, **info}
    files = {TENSORS: dump_safetensors(tensors, {"format": "np"}),
             INFO: json.dumps(meta, indent=2, sort_keys=True).encode()}
    return runs.write_checkpoint(run, step, files, keep)


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


# -- embeddings, run folder and event log: the core's, shared with the torch backend --------

def embedding_meta(spec, family: str, step: int) -> dict[str, str]:
    return run_files.embedding_meta(spec, family, step, backend="jax")


def write_vectors(path: Path, vectors: dict, spec, family: str, step: int) -> Path:
    return run_files.write_vectors(path, vectors, spec, family, step, backend="jax")


check_new_run_dir, record_event, EVENTS = run_files.check_new_run_dir, run_files.record_event, run_files.EVENTS


# -- the run's bookkeeping: options, Ctrl-C, log steps ------------------------------------------
# The torch trainer's rules (textinv_torch/trainer.py), here because that module imports torch.

def check_spec(spec) -> None:
    """The core's option checks (every backend), then what only the jax backend refuses."""
    run_files.check_spec(spec)
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



def position(spec, step: int, n_images: int, processes: int = 1) -> dict:
    """Where the data order stands after `step` steps (informational: it follows from the step)."""
    g = step * spec.grad_accum * spec.batch_size * processes
    return {"epoch": g // n_images, "index": g % n_images, "samples_seen": g}


def describe(devices) -> str:
    """"cpu", "gpu (NVIDIA H200)", "8 x cpu": what the progress line says it trains on."""
    d = devices[0]
    name = d.platform if d.platform == "cpu" else f"{d.platform} ({d.device_kind})"
    return name if len(devices) == 1 else f"{len(devices)} x {name}"


