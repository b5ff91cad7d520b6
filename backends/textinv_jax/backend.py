"""The `jax` backend: what the CLI talks to (textinv_cli.engine.contract.Backend).

Thin on purpose: train() is the core's run engine driving a trainer.JaxSession; jax is imported inside the methods, so `textinv backends` can list this
backend cheaply, and nothing here (or in the modules it loads) imports torch.

Several hosts (TPU pods, GPU clusters): `jax.distributed.initialize()` must run before JAX
touches a device, and probe() is the first thing the CLI asks, so every entry point calls
`init_distributed()` first. It acts only where a launcher set the usual variables:
JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID where JAX cannot
detect them), a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts), SLURM with
several tasks, or TEXTINV_JAX_DISTRIBUTED=1 to ask for JAX's own cluster detection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from textinv_cli.engine.checks import GPU_MEMORY
from textinv_cli.engine.lib_versions import MISSING, versions
from textinv_cli.engine.contract import Backend, BackendInfo, Session
from textinv_cli.engine.spec import Event, SampleRequest, TrainSpec


def wants_distributed(env=os.environ) -> bool:
    try:
        slurm_tasks = int(env.get("SLURM_NTASKS", "1"))
    except ValueError:
        slurm_tasks = 1
    return bool(env.get("JAX_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or slurm_tasks > 1 or env.get("TEXTINV_JAX_DISTRIBUTED") == "1")


def init_distributed() -> None:
    """jax.distributed.initialize() once, where the environment describes several processes."""
    import jax

    if wants_distributed() and not jax.distributed.is_initialized():
        # JAX reads JAX_COORDINATOR_ADDRESS itself; the process count and id it detects only
        # on clusters it knows (TPU, SLURM, MPI, k8s), so a plain launcher passes them as well.
        kw = {name: int(os.environ[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                           ("process_id", "JAX_PROCESS_ID")) if os.environ.get(var)}
        jax.distributed.initialize(**kw)


class JaxBackend(Backend):
    name = "jax"
    attention = ("sdpa",)                # XLA's attention; xformers is a PyTorch library
    schedulers = ("euler", "euler-a", "dpm++", "dpm++-karras", "ddim")  # as sampling.SCHEDULERS
    multi_process = False                # one process per host drives all its devices
    mesh = True                          # --mesh DATAxMODEL: frozen weights split over MODEL (sharding.py)
    clip_skip = True                     # conditioning.text_conditioning, in training and sampling

    def probe(self) -> BackendInfo:
        try:
            import jax
        except ImportError as e:
            return BackendInfo(self.name, available=False, reason=f"jax is not installed ({e.name or e})")
        # read from package metadata: importing them only for a version costs seconds
        details = versions(("jaxlib", "optax", "transformers"))
        # optax runs the optimizer; transformers' CLIPTokenizer (pure Python, no torch) tokenizes.
        missing = [lib for lib in ("optax", "transformers") if details[lib] == MISSING]
        try:
            init_distributed()
            devices = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
            limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices() if d.platform != "cpu"]
            if limits and all(isinstance(n, int) and n > 0 for n in limits):  # GPU/TPU memory (check_size)
                details[GPU_MEMORY] = str(min(limits))
        except Exception as e:  # noqa: BLE001 - a broken accelerator plugin: say why, don't crash
            return BackendInfo(self.name, version=jax.__version__, available=False, details=details,
                               reason=f"jax cannot use its devices: {type(e).__name__}: {e}")
        if jax.process_count() > 1:
            details["processes"] = f"{jax.process_count()} (this is process {jax.process_index()})"
        return BackendInfo(self.name, version=jax.__version__, available=not missing, devices=devices,
                           reason=f"{', '.join(missing)} not installed" if missing else None, details=details)

    def train(self, spec: TrainSpec, resume: Path | None = None) -> Iterator[Event]:
        init_distributed()
        from textinv_cli.engine.loop import run

        return run(self, spec, Path(resume) if resume is not None else None)

    def open_session(self, spec: TrainSpec) -> Session:
        init_distributed()
        from .trainer import JaxSession

        return JaxSession(spec)

    def sample(self, request: SampleRequest) -> Iterator[Event]:
        init_distributed()
        from .sampling import sample

        return sample(request, self)

    def make_tiny_model(self, out: Path, family: str, seed: int) -> Path:
        from .tiny import write_tiny_model

        return write_tiny_model(out, family, seed)
