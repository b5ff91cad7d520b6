"""The backend contract: what a backend gives the core, typed.

A backend (found as a plugin, textinv_cli.engine.plugins) is a `Backend`: it reports itself
(`probe`), samples (`sample`), and for training opens a `Session` that the core's run
engine (loop.py, which imports this module, never the other way) drives. The engine owns the run protocol, once for every backend: the
run folder, resume from the newest complete checkpoint, the events, snapshots, checkpoints
with the Ctrl-C flag, validation and the final embedding. A session owns the math and the
devices: load the model and data, restore from a checkpoint, run one optimizer step, hand
back its rows and optimizer state as checkpoint files, its vectors, validation images, and
agree with the other processes on where to stop.

Nothing here imports torch or jax; vectors cross as float32 numpy arrays.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np

    from .spec import Event, SampleRequest, TrainSpec
    from .stop import StopFlag


@dataclass
class BackendInfo:
    """What `probe()` says: versions, devices, and why it is unusable when it is."""

    name: str
    version: str = ""
    available: bool = True
    devices: list[str] = field(default_factory=list)
    reason: str | None = None
    details: dict[str, str] = field(default_factory=dict)


class Session:
    """One training run on one backend, in one process; the engine calls, in order:

        agree_run_dir -> with running(): load -> [restore] -> barrier -> step ... -> vectors

    plus checkpoint_files, vectors, validate, eval_loss and agree_to_stop between steps. Every process
    of a multi-process run makes the same calls in the same order (some are collectives);
    only the one with `is_main` writes files.

    What the `started` event and the engine's bookkeeping read, set by the backend:
    """

    name: ClassVar[str] = ""     # the backend's name: the embedding's "trained_with"
    device: str = "cpu"          # what the run trains on, as the started event says it
    n_devices: int = 1           # devices this run's steps run on (all processes)
    n_processes: int = 1         # processes running this run
    is_main: bool = True         # the one process that writes
    global_batch: int = 1        # samples per micro-step over all processes
    stop_debounce: float = 0.0   # seconds within which Ctrl-C signals count as one press
    family: str = ""             # sd1 | sd2 | sdxl, known after load()
    warnings: Sequence[str] = ()  # the backend's own warnings, known after load()

    def agree_run_dir(self, planned: str) -> str:
        """The new run's folder every process uses (process 0's plan); a collective."""
        return planned

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around load and the whole loop (torch: deterministic kernels, threads, quiet logs)."""
        yield

    def load(self, images: list[Path], captions: list[list[str]]) -> None:
        """Load the model, add the token, cache the data, place everything on the devices;
        after it, the rows are the init rows and every check has passed. Writes nothing."""
        raise NotImplementedError

    def restore(self, folder: Path) -> int:
        """Rows and optimizer state from a complete checkpoint folder; returns its step."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every process got here (all have loaded and checked everything)."""

    def step(self, step: int, lr: float, stop: "StopFlag", log: bool) -> float | None:
        """One optimizer step (0-based `step`) at learning rate `lr`; its mean loss as a float
        when `log` (a host sync), else None (no sync). `stop` is the Ctrl-C flag, for
        sessions that agree on stopping inside the step's own collective."""
        raise NotImplementedError

    def agree_to_stop(self, stop: "StopFlag") -> bool:
        """Whether the run stops after this step: the same answer on every process."""
        return stop.requested

    def checkpoint_files(self, step: int, info: dict) -> dict[str, bytes]:
        """The checkpoint after `step` steps as file name -> bytes (rows, optimizer state,
        and state.json holding `info`); the engine writes them atomically."""
        raise NotImplementedError

    def vectors(self) -> dict[str, "np.ndarray"]:
        """The rows as they are now: slot -> float32 [n, width], on the host."""
        raise NotImplementedError

    def validate(self, run: Path, step: int) -> list[Path] | None:
        """Render the spec's --validate prompts into run/samples; None where this process
        takes no part (the engine then reports nothing)."""
        raise NotImplementedError

    def eval_loss(self) -> float | None:
        """The mean loss of the rows as they are now on the fixed evaluation batch
        (engine/eval_batch.eval_draw from the spec's seed, cut into pieces of the training
        batch's size), as a float: a host sync, made only at --eval-every steps. It must not
        touch the rows, the optimizer or any state a later step reads (training stays
        bit-identical). Every process computes it; None: this backend has no eval loss."""
        return None


class Backend:
    """A training/sampling backend. Subclasses set `name` and what they support (the
    checks module refuses the rest before anything loads), and implement probe, sample,
    open_session and train, which hands the run to the core's engine:

        def train(self, spec, resume=None):
            return textinv_cli.engine.loop.run(self, spec, resume)
    """

    name: ClassVar[str] = ""
    attention: ClassVar[tuple[str, ...]] = ("sdpa",)       # --attention values it runs
    schedulers: ClassVar[tuple[str, ...]] = ("ddim",)      # sample --scheduler values it runs
    multi_process: ClassVar[bool] = False                 # --num-processes > 1
    clip_skip: ClassVar[bool] = False                     # --clip-skip above 1 (A1111's "Clip skip")
    mesh: ClassVar[bool] = False                          # --mesh DATAxMODEL (frozen weights sharded over MODEL)

    def probe(self) -> BackendInfo:
        raise NotImplementedError

    def open_session(self, spec: "TrainSpec") -> Session:
        """Join the processes and pick the devices for `spec` (cheap: nothing loaded yet)."""
        raise NotImplementedError

    def train(self, spec: "TrainSpec", resume: Path | None = None) -> Iterator["Event"]:
        """The run's events (`resume`: the run folder to continue): engine.loop.run(self, ...)."""
        raise NotImplementedError

    def sample(self, request: "SampleRequest") -> Iterator["Event"]:
        raise NotImplementedError

    def make_tiny_model(self, out: Path, family: str, seed: int) -> Path:
        """Optional: write the built-in tiny model of `family` ("sd1" | "sd2" | "sdxl",
        random weights from `seed`) into `out` and return `out`, as
        textinv_cli.models.tiny.publish_tiny_model does (the core's recipe, atomic,
        idempotent). The core asks for it through the plugins (models.make_tiny_model),
        so `--model tiny` works with whichever backend is installed; a backend that
        cannot build one leaves this as it is."""
        raise NotImplementedError
