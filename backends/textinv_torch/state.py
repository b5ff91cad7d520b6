"""What a run writes to disk: checkpoints, embedding snapshots, the final embedding, events.

Checkpoints hold what a run needs to continue exactly, in safetensors + a small JSON.

All randomness of a step is derived from (seed, step, micro-step) and the data order from
(seed, epoch) (see step.py), and the learning rate is a pure function of the step. So a
checkpoint is only:

    state.safetensors   rows.<slot>            fp32 [n, width]  the trainable rows
                        adam.<slot>.exp_avg     fp32 [n, width]  AdamW moments
                        adam.<slot>.exp_avg_sq
                        adam.<slot>.step        AdamW's step counter, as torch keeps it
    state.json          step, token, slots, shapes, seed, grad-scaler state, data position

No pickle anywhere (the house rule: never torch.load): a checkpoint is data, never code.
The run engine writes these files through runs.write_checkpoint (temp dir, fsync, rename,
`complete` marker, retention), so a half-written one is never picked up, whenever the process dies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from textinv_cli.engine.runs import STATE_INFO, STATE_TENSORS, STATE_VERSION, read_checkpoint
from textinv_cli.errors import TextinvError

TENSORS, INFO, VERSION = STATE_TENSORS, STATE_INFO, STATE_VERSION  # engine/runs.py: one format


def checkpoint_files(step: int, rows: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     info: dict) -> dict[str, bytes]:
    """The checkpoint's files (name -> bytes); the run engine writes them atomically."""
    from safetensors.torch import save

    tensors = {}
    for slot, r in rows.items():
        tensors[f"rows.{slot}"] = r.detach().to("cpu", torch.float32).contiguous()
        st = optimizer.state.get(r, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                v = st[key] if torch.is_tensor(st[key]) else torch.tensor(float(st[key]))
                tensors[f"adam.{slot}.{key}"] = v.detach().to("cpu").contiguous()
    meta = {"version": VERSION, "step": step, "slots": list(rows),
            "shapes": {s: list(r.shape) for s, r in rows.items()}, **info}
    files = {TENSORS: save(tensors, metadata={"format": "pt"}),
             INFO: json.dumps(meta, indent=2, sort_keys=True).encode()}
    return files


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, tensors) of a complete checkpoint folder, on the CPU."""
    from safetensors.torch import load_file

    return read_checkpoint(folder, lambda path: load_file(str(path)))


def restore(info: dict, tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, token: str, folder: Path) -> int:
    """Copy rows and AdamW state into the live run; returns the step to continue from."""
    if info.get("token") not in (None, token) or list(info.get("slots", [])) != list(rows):
        theirs = ", ".join(info.get("slots", []))
        raise TextinvError(f"The checkpoint {folder} is for {info.get('token')!r} ({theirs}), "
                           f"not {token!r} ({', '.join(rows)}).", "Resume the run it belongs to.")
    with torch.no_grad():
        for slot, r in rows.items():
            saved = tensors.get(f"rows.{slot}")
            if saved is None or tuple(saved.shape) != tuple(r.shape):
                shape = None if saved is None else list(saved.shape)
                raise TextinvError(f"The checkpoint {folder} holds rows of shape {shape} for {slot}; "
                                   f"the run has {list(r.shape)}.",
                                   "The base model or --vectors changed since the checkpoint was written.")
            r.copy_(saved.to(r.device, r.dtype))
    # Rebuild the optimizer's state dict around the live parameters (AdamW keys state by
    # position in param_groups), then let load_state_dict put tensors on the right device.
    sd = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    moments = {}
    for slot, r in rows.items():
        keys = {k: tensors[f"adam.{slot}.{k}"] for k in ("exp_avg", "exp_avg_sq", "step")
                if f"adam.{slot}.{k}" in tensors}
        if keys:
            moments[index[id(r)]] = keys
    sd["state"] = moments
    optimizer.load_state_dict(sd)
    return int(info["step"])

