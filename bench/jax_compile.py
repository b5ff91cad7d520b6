"""Wall time of a tiny JAX training run through the CLI, and its first step (nearly all XLA
compile), repeated for a median: the numbers issue #16's Flax port is compared on.

    .venv/bin/python -m bench.jax_compile [--repo PATH] [--steps 30] [--repeat 3]

Each repeat is a fresh process (`python -m textinv_cli train DATA --backend jax --json
--log-every 1` on the tiny sd1 model, built once into a shared TEXTINV_HOME beforehand), so
the import, load and compile costs are all in it (a 1-step warm-up run builds the model first). `--repo` runs another checkout's code (its
root and backends/ first on PYTHONPATH), e.g. a `git archive` of an older commit: both sides
measured by one script, on the same machine, in turn.

Printed per repeat and as medians: wall (process start to exit), first (from the `started`
event to step 1's progress event: the step's trace, compile and one run), rest (step 1 to the
last step: the steady steps, each read back to the host because of --log-every 1).

`--phases` also splits the first step of a JaxSession (same spec, in a child process) into
trace (Python: building the jaxpr, where the flax.nnx merge happens), lower (to StableHLO)
and XLA compile, and times 20 steady steps (each synced). `--overhead` times, on an SD 1.5
sized UNet built abstractly (nothing allocated), what jax.jit does on the host per call for
the models: hashing the static graphdef (raw, and as layers.Graph) and flattening the
weights (an nnx.State, and the same as a pure dict).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(repo: Path, home: Path, data: Path, steps: int, run_dir: Path) -> dict:
    env = {**os.environ, "TEXTINV_HOME": str(home), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "backends"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "textinv_cli", "train", str(data), "--token", "<bench-t>", "--init", "toy",
           "--backend", "jax", "--steps", str(steps), "--log-every", "1", "--json", "--run-dir", str(run_dir),
           "--name", f"bench-{run_dir.name}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks: dict = {}
    for line in proc.stdout:
        now = time.perf_counter() - t0
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "started":
            marks["started"] = now
        elif kind == "progress":
            marks.setdefault("step1", now)
            marks["last"] = now
    err = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "step1" not in marks:
        raise SystemExit(f"run failed ({proc.returncode}): {err[-2000:]}")
    return {"wall": wall, "first": marks["step1"] - marks["started"], "rest": marks["last"] - marks["step1"]}


PHASES = r"""
import sys, time, json
from pathlib import Path
import jax, numpy as np
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.engine.captions import captions_for, find_images
from textinv_jax.trainer import JaxSession, put, step_batch
from textinv_jax.step import train_step
data, home, run = sys.argv[1:4]
spec = TrainSpec(data_dir=data, token="<bench-t>", init=["toy"], model="tiny", run_dir=run, backend="jax", steps=30)
images, _ = find_images(Path(data))
s = JaxSession(spec)
s.load(images, captions_for(images, spec.token, spec.property, spec.captions))
batch = put(step_batch(s.s, s.plan, 0), s.sharded)
args = (s.st, s.frozen, batch, np.float32(1e-3), s.max_norm)
t0 = time.perf_counter(); traced = train_step.trace(*args, cfg=s.cfg)
t1 = time.perf_counter(); lowered = traced.lower()
t2 = time.perf_counter(); compiled = lowered.compile()
t3 = time.perf_counter()
st = s.st
for i in range(3):  # warm the dispatch path
    st, m = train_step(st, s.frozen, batch, np.float32(1e-3), s.max_norm, cfg=s.cfg); m["loss"].block_until_ready()
t4 = time.perf_counter()
for i in range(20):
    st, m = train_step(st, s.frozen, batch, np.float32(1e-3), s.max_norm, cfg=s.cfg); m["loss"].block_until_ready()
t5 = time.perf_counter()
print("PHASES " + json.dumps({"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "step_ms": (t5 - t4) / 20 * 1e3}))
"""


def phases(repo: Path, home: Path, data: Path, run_dir: Path) -> dict:
    env = {**os.environ, "TEXTINV_HOME": str(home), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "backends"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PHASES, str(data), str(home), str(run_dir)], cwd=repo, env=env,
                          capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("PHASES ")]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"phases failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(found[0][7:])


def overhead() -> None:
    import timeit

    import jax
    from flax import nnx

    from textinv_jax.layers import Graph
    from textinv_jax.unet import UNet2DConditionModel, unet_config

    cfg = unet_config({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
                       "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "sample_size": 64})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg)))
    graph, pure = Graph(graphdef), nnx.to_pure_dict(state)
    n = 20
    for name, fn in (("hash(GraphDef)", lambda: hash(graphdef)), ("hash(Graph)", lambda: hash(graph)),
                     ("flatten State", lambda: jax.tree.leaves(state)), ("flatten pure dict", lambda: jax.tree.leaves(pure))):
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"SD 1.5 UNet ({len(jax.tree.leaves(state))} weights): {name} {best * 1e3:.3f} ms per call")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--overhead", action="store_true", help="only the per-call host overhead (this checkout)")
    args = ap.parse_args(argv)
    if args.overhead:
        sys.path[:0] = [str(REPO / "backends")]
        return overhead()
    sys.path[:0] = [str(REPO)]
    from textinv_cli.models.demo_images import write_demo_images

    with tempfile.TemporaryDirectory(prefix="bench-jax-compile-") as tmp:
        tmp = Path(tmp)
        data = write_demo_images(tmp / "data" / "cat", n=4, size=64)
        home = tmp / "home"
        one_run(args.repo.resolve(), home, data, 1, tmp / "warm-up")  # builds the tiny model into home
        rows = [one_run(args.repo.resolve(), home, data, args.steps, tmp / f"run{i}") for i in range(args.repeat)]
        split = [phases(args.repo.resolve(), home, data, tmp / f"phases{i}") for i in range(args.repeat)] \
            if args.phases else []
    for i, r in enumerate(rows):
        print(f"repeat {i}: wall {r['wall']:.2f} s, first step {r['first']:.2f} s, steps 2..{args.steps} "
              f"{r['rest']:.2f} s")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median of {len(rows)} ({args.repo}): wall {med['wall']:.2f} s, first step {med['first']:.2f} s, "
          f"steps 2..{args.steps} {med['rest']:.2f} s")
    for i, p in enumerate(split):
        print(f"phases {i}: trace {p['trace']:.2f} s, lower {p['lower']:.2f} s, compile {p['compile']:.2f} s, "
              f"steady step {p['step_ms']:.2f} ms")
    if split:
        med = {k: statistics.median(p[k] for p in split) for k in split[0]}
        print(f"phases median ({args.repo}): trace {med['trace']:.2f} s, lower {med['lower']:.2f} s, "
              f"compile {med['compile']:.2f} s, steady step {med['step_ms']:.2f} ms")


if __name__ == "__main__":
    main()
