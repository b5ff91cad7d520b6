"""The JAX backend's train rows, in a process of their own: JAX and torch in one process would
share (and fight over) the GPU's memory, and each framework's peak-memory counter only sees
its own allocations. `rows()` runs `python -m bench.jax_rows` and returns its rows.

A row is what bench.measure.train_throughput gives for torch: samples/s between two synced
log steps after warm-up (the first steps include XLA's compile), peak memory, losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_ROW = "BENCH-ROW "


def rows(model: str, images: Path, *, batches: list[int], precision: str, steps: int, warmup: int,
         cpu: bool = False, timeout_s: float = 600) -> list[dict]:
    """Run the rows in a child process; one dict per batch (an `error` row if it failed)."""
    cmd = [sys.executable, "-m", "bench.jax_rows", model, str(images), ",".join(map(str, batches)), precision,
           str(steps), str(warmup)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "backends"), os.environ.get("PYTHONPATH", "")])}
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        found = [json.loads(line[len(_ROW):]) for line in out.splitlines() if line.startswith(_ROW)]
        return found + [{"error": f"timed out after {timeout_s:.0f} s"}]
    found = [json.loads(line[len(_ROW):]) for line in proc.stdout.splitlines() if line.startswith(_ROW)]
    if proc.returncode != 0:
        found.append({"error": proc.stderr[-1500:]})
    return found


def _train_row(model: str, images: str, batch: int, precision: str, steps: int, warmup: int) -> dict:
    import jax
    from textinv_jax.backend import JaxBackend

    from bench.measure import steady_rate  # torch-free at import: the JAX process never loads torch

    from textinv_cli.engine.spec import TrainSpec

    run = Path(tempfile.mkdtemp(prefix="bench-jax-")) / "run"
    spec = TrainSpec(data_dir=images, token="<bench-tok>", init=["toy"], model=model, run_dir=str(run), backend="jax",
                     steps=steps, batch_size=batch, precision=precision, checkpoint_every=0)
    t0 = time.perf_counter()
    marks, losses = [], []
    for ev in JaxBackend().train(spec):
        if ev.kind == "progress" and "loss" in ev.data:
            marks.append((ev.data["step"], time.perf_counter()))
            losses.append(ev.data["loss"])
    wall = time.perf_counter() - t0
    stats = jax.local_devices()[0].memory_stats() or {}  # None on the CPU
    peak = stats.get("peak_bytes_in_use")
    return {"batch": batch, "precision": precision, "steps": steps, "device": jax.local_devices()[0].platform,
            **steady_rate(marks, warmup, batch),
            "peak_mem_gib": peak / 2**30 if peak else float("nan"), "wall_s": wall,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses}


def main(argv: list[str]) -> None:
    model, images, batches, precision, steps, warmup = argv
    for batch in (int(b) for b in batches.split(",")):
        row = _train_row(model, images, batch, precision, int(steps), int(warmup))
        print(_ROW + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
