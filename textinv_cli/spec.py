"""What crosses the backend boundary: plain dataclasses, numbers, strings and numpy arrays.

TrainSpec holds everything a run needs and is saved into the run directory as JSON, so
`textinv resume RUN` needs nothing but the run. Backends never print: they yield Events,
which the CLI renders as a progress bar or as JSON lines.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"


@dataclass
class TrainSpec:
    data_dir: str
    token: str
    init: list[str]
    model: str
    run_dir: str
    backend: str = "torch"
    # concept
    vectors: int = 1
    property: str = "object"            # object | style: which caption templates
    captions: str = "templates"         # templates | files | both
    # data
    resolution: int | None = None       # None: the model's native size
    center_crop: bool = False
    flip_p: float = 0.5
    # optimisation
    steps: int = 3000
    batch_size: int = 1
    grad_accum: int = 1
    fuse_accum: bool = False            # run the grad_accum micro-steps as one batch (same loss, more memory)
    lr: float = 5e-3
    scale_lr: bool = False              # lr *= batch * accumulation * processes, as diffusers does
    lr_schedule: str = "constant"       # constant | warmup | cosine | linear | "0.005:100, 1e-3:1000"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    # speed and memory
    precision: str = "fp32"             # fp32 | fp16 | bf16 (frozen weights; the new rows stay fp32)
    gradient_checkpointing: bool = False
    attention: str = "sdpa"             # sdpa | xformers
    deterministic: bool = False
    # output
    save_every: int = 0                 # embedding snapshots every N steps (0: only the final one)
    checkpoint_every: int = 500         # resumable checkpoints every N steps (0: none)
    keep_checkpoints: int = 2
    validate: list[str] = field(default_factory=list)
    validate_every: int = 0
    validate_steps: int = 25
    num_processes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific knobs, recorded as given

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run_dir: Path) -> None:
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(Path(run_dir) / SPEC_FILE, json.dumps(self.to_json(), indent=2).encode(), force=True)

    @classmethod
    def load(cls, run_dir: Path) -> "TrainSpec":
        return cls.from_json(json.loads((Path(run_dir) / SPEC_FILE).read_text()))


@dataclass
class EmbeddingRef:
    """An embedding handed to a backend for sampling: token, family and vectors per slot."""

    token: str
    vectors: dict[str, Any]  # slot -> float32 numpy [n, width]
    short_hash: str = ""
    name: str = ""


@dataclass
class SampleRequest:
    prompt: str
    model: str
    out_dir: str
    embeddings: list[EmbeddingRef] = field(default_factory=list)
    negative: str = ""
    n: int = 1
    steps: int = 30
    scheduler: str = "ddim"             # ddim | euler | euler-a | dpm++ | unipc
    guidance: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    precision: str = "fp32"
    batch_size: int | None = None       # images per pipeline call; None: the backend picks (up to 8)


@dataclass
class Event:
    """kind: started | progress | checkpoint | snapshot | validation | sample | finished | interrupted | warning."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"event": self.kind, **self.data}
