"""Data-parallel training across processes.

A run launched by torchrun, `accelerate launch --multi_gpu` or `textinv train
--num-processes N` (textinv_cli.engine.launch.launch_processes) has WORLD_SIZE > 1 and
RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment. Each process then:

- runs on its own device: cuda:LOCAL_RANK with NCCL, or the CPU with gloo (no CUDA,
  spec.device == "cpu", or ACCELERATE_USE_CPU set by `accelerate launch --cpu`);
- takes its block of every micro-step's global batch (BatchPlan numbers samples globally),
  so W processes at batch b see exactly the inputs of 1 process at batch W*b;
- averages the rows' gradients with one all_reduce per optimizer step (SUM / W, before
  unscaling, clipping and AdamW), which also carries the loss and the Ctrl-C flag, so every
  rank holds identical rows and all stop at the same step.

The rows are a plain tensor, not a module, so there is no DDP wrapper: one flat all_reduce
of a few kilobytes per step is all the communication there is.

The global batch of a run is spec.batch_size x spec.num_processes (recorded in spec.json);
any process count that divides it runs the same samples per step (local_batch), which is
why resuming on a different number of processes continues the same run.

The run folder must be on a filesystem every rank can read (one machine, or a shared
disk): all ranks read the data and, on resume, the checkpoint; only rank 0 writes.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from textinv_cli.errors import TextinvError

# Long enough for rank 0 to make validation images while the others wait at the next step.
TIMEOUT = timedelta(minutes=30)


def env_world() -> int:
    """How many processes the launcher started (1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives: every rank must call them at the same point, in the same order -------

    def broadcast(self, obj):
        """Rank 0's value of a small picklable object, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1, device=self.device))

    def reduce_step(self, params: list[torch.Tensor], loss_sum: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        """Average the rows' gradients in place and the step's loss; OR the stop flags.

        One all_reduce of [grads..., loss, stop]. The reduced flag is read on the host every
        step (a sync with the device), so all ranks agree on where Ctrl-C stops the run.
        """
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [loss_sum.reshape(1).float(), torch.full((1,), float(stop), device=self.device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        stop_all = bool(flat[-1].item() > 0)
        flat = flat[:-1] / self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            avg = flat[offset:offset + n].view_as(g).to(g.dtype)
            if p.grad is None:
                p.grad = avg.clone()
            else:
                p.grad.copy_(avg)
            offset += n
        return flat[offset], stop_all


_current: Dist | None = None


def setup(spec) -> Dist:
    """This process's place in the run; joins the process group when launched with WORLD_SIZE > 1."""
    global _current
    world = env_world()
    if world == 1:
        from .loading import pick_device

        return Dist(device=pick_device(spec))
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    wanted = str(getattr(spec, "device", None) or "")
    cpu = wanted == "cpu" or _truthy(os.environ.get("ACCELERATE_USE_CPU")) or not torch.cuda.is_available()
    if cpu:
        device = torch.device("cpu")
    else:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise TextinvError(f"Process {rank} needs GPU {local_rank}, but this machine shows {count} GPU(s).",
                               f"Start at most {count} process(es) per machine (--num-processes {count}).")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if _current is not None and dist.is_initialized():
        return _current
    if not dist.is_initialized():
        backend = "gloo" if device.type == "cpu" else "nccl"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=TIMEOUT, **kwargs)
        atexit.register(_shutdown)
    if dist.get_world_size() != world:
        raise TextinvError(f"The process group has {dist.get_world_size()} processes but WORLD_SIZE is {world}.")
    _current = Dist(rank=dist.get_rank(), world=world, local_rank=local_rank, device=device)
    return _current


def _shutdown() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit, a peer may already be gone; nothing to save
        pass


def local_batch(spec, world: int) -> int:
    """Samples per process per micro-step: the run's global batch split over `world` processes."""
    total = spec.batch_size * spec.num_processes
    if total % world:
        raise TextinvError(
            f"This run's global batch is {total} sample(s) per micro-step (--batch-size {spec.batch_size} x "
            f"{spec.num_processes} process(es)); {world} processes cannot split it evenly.",
            f"Run it on a number of processes that divides {total}, e.g. {spec.num_processes}.")
    return total // world
