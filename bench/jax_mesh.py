"""What the JAX backend's `--mesh DATAxMODEL` layouts cost and save (textinv_jax/sharding.py).

    .venv/bin/python -m bench.jax_mesh [--meshes 8x1,4x2,2x4] [--steps 20]

First, on real shapes (built abstractly, nothing allocated): the frozen UNet's bytes per
device for SD 1.5 and SDXL when the partition rule splits it over MODEL = 1, 2, 4, 8.

Then, in a child process with as many host CPU devices as the meshes need
(XLA_FLAGS=--xla_force_host_platform_device_count), the tiny sd1 model loaded by a
JaxSession on each mesh (batch 8): the bytes per device of the placed frozen UNet and text
encoder (their shards summed), the compiled step's argument and temporary bytes per device
(XLA's memory_analysis: the temporaries hold the gathered weights while a layer runs), the
collectives in its HLO, and the median of steady steps. Host "devices" share this machine's
cores, so a step time shows a layout's overhead, not a speed-up.

`--sd15` adds, per mesh, the compiled step's memory per device for SD 1.5 shapes (CLIP-L and
the UNet, 256 px, batch 8; compiled from abstract arguments, nothing allocated; `--remat`:
with --gradient-checkpointing), a minute or more of XLA compile per mesh on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, re, statistics, sys, time
from pathlib import Path
import numpy as np
from textinv_cli.engine.captions import captions_for, find_images
from textinv_cli.engine.spec import TrainSpec
from textinv_jax.backend import JaxBackend
from textinv_jax.sharding import device_bytes
from textinv_jax.trainer import put, step_batch
model, data, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
images, _ = find_images(data)
captions = captions_for(images, "<bench-t>", "object", "templates")
for mesh in sys.argv[4:]:
    spec = TrainSpec(data_dir=str(data), token="<bench-t>", init=["toy"], model=model, run_dir="unused",
                     backend="jax", batch_size=8, steps=steps, mesh=mesh)
    s = JaxBackend().open_session(spec)
    s.load(images, captions)
    batch = put(step_batch(s.s, s.plan, 0), s.sharded)
    compiled = s.train_step.lower(s.st, s.frozen, batch, np.float32(1e-3), s.max_norm, cfg=s.cfg).compile()
    hlo, memory = compiled.as_text(), compiled.memory_analysis()
    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    times = []
    for i in range(3 + steps):  # 3 warm-up steps (the first compiles)
        t = time.perf_counter()
        s.step(i, 1e-3, None, True)  # log=True: each step read back, so each is timed whole
        times.append(time.perf_counter() - t)
    print("MESH " + json.dumps({
        "mesh": mesh, "unet": device_bytes(s.frozen["unet"]), "text": device_bytes(s.frozen["text_encoder"]),
        "arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
        "collectives": {op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in ops},
        "step_ms": statistics.median(times[3:]) * 1e3}), flush=True)
"""


SD15 = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.models.checkpoints import architectures as A
from textinv_jax import sharding
from textinv_jax.clip import CLIPTextModel, clip_config, split_frozen
from textinv_jax.layers import split
from textinv_jax.step import StepConfig, opt_state
from textinv_jax.unet import UNet2DConditionModel, unet_config
tg, tw = split_frozen(nnx.eval_shape(lambda: CLIPTextModel(clip_config(A.CLIP_L))))
ug, uw = split(nnx.eval_shape(lambda: UNet2DConditionModel(unet_config(A.UNET_SD1))))
cfg = StepConfig(text=tg, unet=ug, slot="clip_l", prediction_type="epsilon", scaling=0.18215, dtype="float32",
                 remat=sys.argv[1] == "remat")
rows = {"clip_l": np.zeros((1, 768), np.float32)}
st = (rows, opt_state(TrainSpec(data_dir="d", token="<t>", init=["x"], model="m", run_dir="r"), rows))
B, h = 8, 32  # 256 px latents
for mesh in sys.argv[2:]:
    data, model = map(int, mesh.split("x"))
    m = Mesh(np.array(jax.devices()).reshape(data, model), sharding.AXES)
    repl, rows_of = sharding.replicated(m), sharding.batch_sharding(m)
    shape = lambda s, dt, where: jax.ShapeDtypeStruct(s, dt, sharding=where)
    models = {"text_encoder": tw, "unet": uw}
    frozen = {**jax.tree.map(lambda a, w: shape(a.shape, a.dtype, w), models, sharding.weight_shardings(models, m)),
              "tables": shape((16, 77), jnp.int32, repl), "mean": shape((B, 4, h, h), jnp.float32, repl),
              "std": shape((B, 4, h, h), jnp.float32, repl), "ac": shape((1000,), jnp.float32, repl)}
    batch = {"entry": shape((1, B), jnp.int32, rows_of), "caption": shape((1, B), jnp.int32, rows_of),
             "t": shape((1, B), jnp.int32, rows_of), "eps": shape((1, B, 4, h, h), jnp.float32, rows_of),
             "noise": shape((1, B, 4, h, h), jnp.float32, rows_of)}
    t0 = time.perf_counter()
    compiled = sharding.train_step_on(m).lower(jax.device_put(st, repl), frozen, batch, np.float32(1e-3),
                                               np.float32(1.0), cfg=cfg).compile()
    mem = compiled.memory_analysis()
    print(f"SD 1.5, 256 px, batch 8, mesh {mesh}{', remat' if cfg.remat else ''}, per device: arguments "
          f"{mem.argument_size_in_bytes / 2**20:.0f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.0f} MiB, "
          f"sum {(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20:.0f} MiB "
          f"(compiled in {time.perf_counter() - t0:.0f} s)", flush=True)
"""


def real_shapes() -> None:
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from textinv_cli.models.checkpoints import architectures
    from textinv_jax.layers import split
    from textinv_jax.sharding import weight_spec
    from textinv_jax.unet import UNet2DConditionModel, unet_config

    for name, cfg in (("SD 1.5", architectures.UNET_SD1), ("SDXL", architectures.UNET_SDXL)):
        leaves = jax.tree.leaves(split(nnx.eval_shape(lambda: UNet2DConditionModel(unet_config(cfg))))[1])
        row = []
        for model in (1, 2, 4, 8):
            per = sum(math.prod(a.shape) * 4 // (model if weight_spec(tuple(a.shape), 4, model) != P() else 1)
                      for a in leaves)
            row.append(f"MODEL {model}: {per / 2**20:.0f} MiB")
        print(f"{name} UNet, {len(leaves)} fp32 weights, per device: " + ", ".join(row))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshes", default="8x1,4x2,2x4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sd15", action="store_true", help="also compile the step for SD 1.5 shapes per mesh")
    ap.add_argument("--remat", action="store_true", help="--sd15 with --gradient-checkpointing")
    args = ap.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "backends")]
    real_shapes()
    meshes = args.meshes.split(",")
    devices = {math.prod(int(n) for n in m.lower().split("x")) for m in meshes}
    if len(devices) != 1:
        raise SystemExit(f"--meshes {args.meshes}: every mesh needs the same number of devices")
    from textinv_cli.models.demo_images import write_demo_images
    from textinv_cli.models.resolve import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-jax-mesh-") as tmp:
        tmp = Path(tmp)
        data = write_demo_images(tmp / "data" / "cat", n=4, size=64)
        model = make_tiny_model(tmp / "sd1", "sd1")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TEXTINV_HOME": str(tmp / "home"),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices.pop()}",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "backends"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), str(args.steps), *meshes],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if args.sd15:
            sd15 = subprocess.run([sys.executable, "-c", SD15, "remat" if args.remat else "-", *meshes], cwd=REPO,
                                  env=env, capture_output=True, text=True)
            print(sd15.stdout.strip() or f"the SD 1.5 compiles failed ({sd15.returncode}): {sd15.stderr[-2000:]}")
    rows = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("MESH ")]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"the mesh runs failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print("tiny sd1, batch 8, per device: mesh | frozen UNet | text encoder | step arguments | step temporaries | "
          "collectives | steady step")
    for r in rows:
        ops = ", ".join(f"{n} {op}" for op, n in r["collectives"].items() if n)
        print(f"{r['mesh']} | {r['unet'] / 1024:.0f} KiB | {r['text'] / 1024:.0f} KiB | {r['arguments'] / 1024:.0f} KiB | "
              f"{r['temporaries'] / 1024:.0f} KiB | {ops or 'none'} | {r['step_ms']:.1f} ms")


if __name__ == "__main__":
    main()
