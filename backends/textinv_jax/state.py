"""What a JAX checkpoint holds: the rows and optax's AdamW state, as files.

The same files as the torch backend (textinv_torch/state.py), written with the core's
numpy safetensors writer, so neither torch nor the `safetensors` package is needed:

    state.safetensors   rows.<slot>             fp32 [n, width]  the trainable rows
                        adam.<slot>.exp_avg      fp32 [n, width]  optax's mu
                        adam.<slot>.exp_avg_sq   fp32 [n, width]  optax's nu
                        adam.<slot>.step         fp32 []          optax's update count
    state.json          version, step, token, slots, shapes, seed, data position

optax's Adam keeps the same two moments and count as torch's AdamW under the same math,
so the keys mean the same thing in both backends. Everything random in a step follows from
(seed, step, micro-step) (textinv_cli.engine.batch_plan) and the learning rate from the step, so
these arrays are all a run needs to continue exactly. No pickle: a checkpoint is data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from textinv_cli.engine.runs import STATE_INFO, STATE_TENSORS, STATE_VERSION, read_checkpoint
from textinv_cli.errors import TextinvError
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors

TENSORS, INFO, VERSION = STATE_TENSORS, STATE_INFO, STATE_VERSION  # engine/runs.py: one format


def checkpoint_files(step: int, rows: dict[str, np.ndarray], mu: dict[str, np.ndarray], nu: dict[str, np.ndarray],
                     count: int, info: dict) -> dict[str, bytes]:
    """The checkpoint's files (name -> bytes); the run engine writes them through the core's
    runs.write_checkpoint (temp folder, fsync, rename, marker, retention: a kill at any point
    loses nothing)."""
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
    return files


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(info, tensors) of a complete checkpoint folder."""
    return read_checkpoint(folder, lambda path: load_safetensors(path.read_bytes(), str(path))[0])


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
