"""The `torch` backend: what the CLI talks to (textinv_cli.engine.contract.Backend).

Thin on purpose: probe() reports versions and devices, train() is the core's run engine
driving a trainer.TorchSession, sample() is sampling.sample. torch is imported inside the
methods so `textinv backends` can list this backend cheaply and the core never pays for
torch at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from textinv_cli.engine.checks import ATTENTION, GPU_MEMORY, SCHEDULERS
from textinv_cli.engine.lib_versions import MISSING, versions
from textinv_cli.engine.contract import Backend, BackendInfo, Session
from textinv_cli.engine.spec import Event, SampleRequest, TrainSpec


class TorchBackend(Backend):
    name = "torch"
    attention = ATTENTION
    schedulers = SCHEDULERS
    multi_process = True
    clip_skip = True

    def probe(self) -> BackendInfo:
        try:
            import torch
        except ImportError as e:
            return BackendInfo(self.name, available=False, reason=f"torch is not installed ({e.name or e})")
        # read from package metadata: importing them only for a version costs seconds
        details = versions(("diffusers", "transformers", "accelerate", "xformers"))
        missing = [lib for lib in ("diffusers", "transformers") if details[lib] == MISSING]
        devices = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        if devices:  # the smallest GPU's memory: what engine/checks.check_size holds a size to (no allocation)
            details[GPU_MEMORY] = str(min(torch.cuda.get_device_properties(i).total_memory
                                          for i in range(torch.cuda.device_count())))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
        devices.append("cpu")
        return BackendInfo(self.name, version=torch.__version__, available=not missing, devices=devices,
                           reason=f"{', '.join(missing)} not installed" if missing else None, details=details)

    def train(self, spec: TrainSpec, resume: Path | None = None) -> Iterator[Event]:
        from textinv_cli.engine.loop import run

        return run(self, spec, Path(resume) if resume is not None else None)

    def open_session(self, spec: TrainSpec) -> Session:
        from .trainer import TorchSession

        return TorchSession(spec)

    def sample(self, request: SampleRequest) -> Iterator[Event]:
        from .sampling import sample

        return sample(request)

    def make_tiny_model(self, out: Path, family: str, seed: int) -> Path:
        from .tiny import write_tiny_model

        return write_tiny_model(out, family, seed)
