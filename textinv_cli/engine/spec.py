"""What crosses the backend boundary: plain dataclasses, numbers, strings and numpy arrays.

TrainSpec holds everything a run needs and is saved into the run directory as JSON, so
`textinv resume RUN` needs nothing but the run. Backends never print: they yield Events,
which the CLI renders as a progress bar or as JSON lines. An Event's kind is one of a closed
set (KINDS), built from the typed payloads below (training: Started, Progress, ...;
sampling: SampleStarted, SampleProgress, ...), whose fields are the JSON keys in order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

SPEC_FILE = "spec.json"
# First-class TrainSpec fields that spec.json keeps under "extra", where earlier versions put
# them: old runs resume, and the file keeps its shape.
IN_EXTRA = ("name", "model_name", "device", "threads", "devices")


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
    template: str | None = None         # a caption template file, A1111's [name]/[filewords] (absent in older runs)
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
    clip_skip: int = 1                  # A1111's "Clip skip": 1 = the text encoder's last layer (older runs: 1)
    # the base model as given, when `model` is a folder made from it (absent in older runs; cli/base_model.py)
    model_file: str | None = None       # a single-file checkpoint (.safetensors/.ckpt); `model` is its conversion
    model_sha256: str | None = None     # that file's sha256 (A1111's short hash: the first 10 hex)
    prediction: str | None = None       # epsilon | v: what the conversion used (--prediction, or the file's)
    vae: str | None = None              # --vae FILE; `model` is then a view folder holding its conversion
    vae_sha256: str | None = None
    # output
    save_every: int = 0                 # embedding snapshots every N steps (0: only the final one)
    checkpoint_every: int = 500         # resumable checkpoints every N steps (0: none)
    keep_checkpoints: int = 2
    validate: list[str] = field(default_factory=list)
    validate_every: int = 0
    validate_steps: int = 25
    num_processes: int = 1
    # watching the run (absent from older spec.json files: these defaults keep them readable)
    eval_every: int = 0                 # eval loss on the fixed batch every N steps (0: off; engine/eval_batch.py)
    log_every: int | None = None        # loss readings every N steps (None: loop.log_interval's default)
    report_to: list[str] = field(default_factory=list)  # "tensorboard" (engine/report_to.py)
    # who and where (kept under "extra" in spec.json, see IN_EXTRA)
    name: str | None = None             # the registry name the result gets
    model_name: str | None = None       # --model as the user typed it
    device: str | None = None           # torch: "cpu", "cuda:1" instead of the default device
    threads: int | None = None          # torch: CPU threads for the run
    devices: int | None = None          # jax: train on the first N local devices
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific knobs, recorded as given

    def __post_init__(self):
        self.absorb_extra()

    def absorb_extra(self) -> None:
        """Move IN_EXTRA keys a caller put in `extra` (or an old spec.json had) to their fields."""
        extra = dict(self.extra or {})
        for key in IN_EXTRA:
            if key in extra:
                setattr(self, key, extra.pop(key))
        self.extra = extra

    def to_json(self) -> dict:
        data = asdict(self)
        first = {k: data.pop(k) for k in IN_EXTRA}
        data["extra"] = {**{k: v for k, v in first.items() if v is not None}, **data["extra"]}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TrainSpec":
        known = {f.name for f in fields(cls)} - set(IN_EXTRA)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run_dir: Path) -> None:
        from ..writes import atomic_write_bytes

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
    scheduler: str = "ddim"             # a key or A1111 name of engine/samplers.py (DDIM, Euler a, DPM++ 2M Karras...)
    guidance: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    precision: str = "fp32"
    batch_size: int | None = None       # images per pipeline call; None: the backend picks (up to 8)
    clip_skip: int = 1                  # A1111's "Clip skip" (1: the last layer)
    # A1111's names for the PNG parameters (cli/base_model.py); "" where the model is no single file
    model_hash: str = ""                # "Model hash": the checkpoint file's short hash (10 hex)
    model_title: str = ""               # "Model": the checkpoint file's stem (else the backend's folder name)
    vae_hash: str = ""                  # "VAE hash" of --vae's file (10 hex)
    vae_name: str = ""                  # "VAE": its file name


KINDS = ("started", "progress", "checkpoint", "snapshot", "validation", "sample", "finished", "interrupted",
         "warning", "eval", "failed")  # failed: only recorded in a run's files (loop._Watch.failed), never yielded


@dataclass
class Event:
    """What a backend reports: `kind` (one of KINDS) and its data, the JSON line's keys.

    Backends make them from typed payloads, `Event.of(Progress(step=3, ...))`, which stay
    in `payload`; `data` is what the CLI renders and events.jsonl records."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown event kind {self.kind!r}; one of {', '.join(KINDS)}.")

    @classmethod
    def of(cls, payload: "Payload") -> "Event":
        return cls(payload.KIND, payload.to_data(), payload)

    def to_json(self) -> dict:
        return {"event": self.kind, **self.data}


class Payload:
    """A typed event body: its fields in order are the event's keys; OPTIONAL ones are
    left out while None (so a one-process run's `started` has no `processes` key)."""

    KIND: ClassVar[str] = ""
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_data(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
                if not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}


@dataclass(frozen=True)
class Started(Payload):
    KIND: ClassVar[str] = "started"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("devices", "processes")
    run_dir: str
    device: str
    family: str
    model: str
    images: int
    ignored: list[str]
    total_steps: int
    start_step: int
    resumed_from: str | None
    devices: int | None = None          # more than one device (jax)
    processes: int | None = None        # more than one process


@dataclass(frozen=True)
class Progress(Payload):
    KIND: ClassVar[str] = "progress"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("loss",)
    step: int
    total: int
    lr: float
    loss: float | None = None           # at log steps only (the loop's host syncs)


@dataclass(frozen=True)
class _FileAtStep(Payload):
    step: int
    path: str


@dataclass(frozen=True)
class Snapshot(_FileAtStep):
    """The embedding as it was after `step` steps (run/snapshots/step-N.safetensors)."""

    KIND: ClassVar[str] = "snapshot"


@dataclass(frozen=True)
class Checkpoint(_FileAtStep):
    """A complete checkpoint folder (run/checkpoints/step-N/)."""

    KIND: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class Validation(Payload):
    KIND: ClassVar[str] = "validation"
    step: int
    paths: list[str]


@dataclass(frozen=True)
class Interrupted(Payload):
    KIND: ClassVar[str] = "interrupted"
    step: int
    checkpoint: str


@dataclass(frozen=True)
class Finished(Payload):
    KIND: ClassVar[str] = "finished"
    step: int
    embedding_path: str
    token: str
    vectors: dict[str, Any]             # slot -> float32 numpy [n, width]
    meta: dict[str, str]
    summary: dict[str, Any] | None = None  # Summary.to_data(), from the process that writes
    OPTIONAL: ClassVar[tuple[str, ...]] = ("summary",)


@dataclass(frozen=True)
class EvalLoss(Payload):
    """The loss on the fixed evaluation batch (engine/eval_batch.py) after `step` steps."""

    KIND: ClassVar[str] = "eval"
    step: int
    loss: float
    samples: int


@dataclass(frozen=True)
class Summary(Payload):
    """How the run went, the `finished` event's "summary": this session's time and speed, the
    whole run's losses (earlier sessions' from events.jsonl), where its files are."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("final_loss", "mean_loss", "eval_first", "eval_last",
                                           "eval_first_step", "eval_last_step", "log_file", "tensorboard")
    steps: int                          # steps this session ran
    total: int
    seconds: float                      # this session's time from its first step to its last
    steps_per_s: float
    run_dir: str
    embedding_path: str
    final_loss: float | None = None
    mean_loss: float | None = None      # over every loss reading of the run
    eval_first: float | None = None
    eval_last: float | None = None
    eval_first_step: int | None = None
    eval_last_step: int | None = None
    log_file: str | None = None
    tensorboard: str | None = None


@dataclass(frozen=True)
class RunWarning(Payload):
    KIND: ClassVar[str] = "warning"
    message: str


# -- sampling ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleStarted(Payload):
    KIND: ClassVar[str] = "started"
    model: str
    family: str
    device: str
    precision: str
    scheduler: str
    sampler: str                        # A1111's name for it (the PNG infotext's)
    images: int
    batch_size: int
    steps: int
    total: int                          # images x steps
    out_dir: str
    embeddings: list[dict[str, Any]]    # {name, token, vectors} each


@dataclass(frozen=True)
class SampleProgress(Payload):
    KIND: ClassVar[str] = "progress"
    image: int                          # the batch's first image (0-based)
    batch: int
    images: int
    step: int
    steps: int
    done: int                           # image-steps done of `total`
    total: int


@dataclass(frozen=True)
class Sampled(Payload):
    KIND: ClassVar[str] = "sample"
    path: str
    seed: int
    index: int
    width: int
    height: int


@dataclass(frozen=True)
class SampleFinished(Payload):
    KIND: ClassVar[str] = "finished"
    paths: list[str]
    out_dir: str
    seconds: float
