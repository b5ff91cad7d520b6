"""How a JAX run lies on its devices: a 2-D Mesh ("data", "model") and the one partition
rule for the frozen weights.

    --mesh DATAxMODEL     e.g. 4x2 on 8 devices; default Nx1 (plain data parallel)

The frozen base-model weights (UNet, text encoder, VAE) are what fills a device's memory:
an SDXL UNet is 10 GB in fp32, the rows and their AdamW state a few KB. So each large frozen
weight is stored split over the MODEL devices of its group and whole in each of the DATA
groups (FSDP inside a group, replicas across groups: ZeRO-3 / PyTorch's HSDP); XLA gathers a
weight where a layer reads it, since the step (step.py) is written for whole weights. The
batch is split over *every* device, both axes, as FSDP does: a model group's devices then
each take their own samples instead of all computing the same ones, and the batch rule stays
data parallel's (a multiple of the local device count). The new rows, their optimizer state,
the caption-id table and the latent cache stay replicated: small, and read by every sample.

Several hosts: the mesh is jax.devices() in order (process by process) reshaped to DATAxMODEL,
so each process's devices are one contiguous block of the flattened batch axis and each gives
its own block of the global batch (trainer.put), as in data parallel. A MODEL that divides the
devices of one host keeps the gathers on that host's fast links; one spanning hosts works,
over the slower network.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from textinv_cli.engine.checks import is_int, parse_mesh
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.errors import TextinvError

AXES = ("data", "model")
# Weights smaller than this stay whole on every device: norms, biases and small kernels add up
# to ~1% of a UNet's bytes, and each split weight costs one all-gather (a fixed latency) per use.
MIN_SPLIT_BYTES = 64 * 1024


def make_mesh(spec: TrainSpec) -> Mesh:
    """The spec's devices (every device, or the first spec.devices of one host) as a
    ("data", "model") grid; --mesh DATAxMODEL, else Nx1."""
    devices = jax.devices()
    want = spec.devices
    if want is not None:
        if not is_int(want) or not 1 <= want <= len(devices) or jax.process_count() > 1:
            raise TextinvError(f"devices={want!r}: this machine has {len(devices)} JAX device(s).")
        devices = devices[:want]
    n, kind = len(devices), devices[0].platform
    data, model = parse_mesh(spec.mesh) if spec.mesh is not None else (n, 1)
    if data * model != n:
        fits = ", ".join(f"{n // m}x{m}" for m in range(1, n + 1) if n % m == 0 and m <= 8)
        raise TextinvError(f"--mesh {data}x{model} needs {data * model} devices; this run has {n} {kind} device(s).",
                           f"Pass --mesh with a grid of {n} devices: {fits} (a new run without --mesh is "
                           f"data parallel over all {n}).")
    local = sum(d.process_index == jax.process_index() for d in devices)
    if spec.batch_size % local:
        raise TextinvError(f"--batch-size {spec.batch_size} does not split evenly over the {local} "
                           f"{kind} devices the jax backend trains on.",
                           f"Pass a multiple of {local} (each device takes an equal share of the batch), or "
                           "use fewer devices (CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS).")
    return Mesh(np.array(devices).reshape(data, model), AXES)


def model_size(mesh: Mesh) -> int:
    return mesh.shape["model"]


# -- the partition rule ---------------------------------------------------------------------------

def weight_spec(shape: tuple, itemsize: int, model: int) -> P:
    """Where one frozen weight lives: split on `model` along its largest dimension that the
    model axis divides (a conv's output or input channels, a linear's wider side, the token
    table's vocabulary), else whole. Scalars, vectors (biases, norm scales) and weights under
    MIN_SPLIT_BYTES stay whole. Ties go to the later dimension (a kernel's output channels)."""
    if model == 1 or len(shape) < 2 or math.prod(shape) * itemsize < MIN_SPLIT_BYTES:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: (-shape[i], -i)):
        if shape[axis] % model == 0:
            return P(*(("model" if i == axis else None) for i in range(len(shape))))
    return P()


def weight_shardings(weights, mesh: Mesh):
    """The rule over a tree of frozen weights (a pure dict from layers.split, arrays or
    ShapeDtypeStructs): a NamedSharding per leaf."""
    model = model_size(mesh)
    return jax.tree.map(lambda a: NamedSharding(mesh, weight_spec(tuple(a.shape), np.dtype(a.dtype).itemsize,
                                                                  model)), weights)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Step inputs [accum, B, ...]: the batch axis over every device (data and model)."""
    return NamedSharding(mesh, P(None, AXES))


def place(tree, shardings):
    """Host arrays every process holds whole (weights, tables) -> global arrays laid out as
    `shardings` (a tree of them, or one for all). Several processes: each builds only the
    shards its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda index: np.asarray(a)[index]),
                        tree, shardings)


def check_model_axis(weights, mesh: Mesh, what: str = "UNet") -> str | None:
    """A model axis that splits none of `what`'s weights is refused (it would only cost
    gathers); one that leaves most bytes whole gets a warning (returned)."""
    model = model_size(mesh)
    if model == 1:
        return None
    split, total = split_bytes(weights, mesh)
    data = mesh.shape["data"]
    if split == 0:
        raise TextinvError(f"--mesh {data}x{model}: no weight of the {what} has a dimension divisible by {model}, so "
                           "nothing would be split.", "Pass a MODEL that divides the channel counts (2, 4 or 8), "
                           "or leave --mesh out (data parallel).")
    if split < total / 2:
        return (f"--mesh {data}x{model} splits only {split / total:.0%} of the {what}'s weight bytes (the rest have no "
                f"dimension divisible by {model}); a power of 2 splits more.")
    return None


def split_bytes(weights, mesh: Mesh) -> tuple[int, int]:
    """(bytes of the weights the rule splits, bytes of all of them)."""
    model, split, total = model_size(mesh), 0, 0
    for a in jax.tree.leaves(weights):
        size = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        total += size
        split += size if weight_spec(tuple(a.shape), np.dtype(a.dtype).itemsize, model) != P() else 0
    return split, total


def device_bytes(tree) -> int:
    """The most bytes of `tree`'s global arrays any one device holds (its shards, summed)."""
    per: dict = {}
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)


# -- the step, with its outputs pinned ------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def train_step_on(mesh: Mesh):
    """step.train_step, jitted with every output replicated on `mesh` (the rows and the
    optimizer state go into the next step, donated, and are read on the host as one device's
    copy); the inputs keep the shardings they were placed with. One per mesh: runs on the
    same devices share the compiled step."""
    from .step import train_step

    return jax.jit(train_step.__wrapped__, static_argnames=("cfg",), donate_argnums=(0,),
                   out_shardings=replicated(mesh))
