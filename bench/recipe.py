"""The seed recipe as a user runs it: `textinv train` in its own process (imports, model load,
latent caching, every step, checkpoints, the final file and the registry entry all timed).

The recipe is 3000 steps x batch 1 x accumulation 4 = 12,000 samples. A GPU session has
minutes, so the run gets a deadline: if it ends in time its wall time is measured; if not,
it is stopped and the rest projected from the steady rate of its last half (labelled
`projected`, never passed off as measured).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Recipe:
    """start() launches the process; result() follows it to its end or the deadline. On the GPU
    the two are called back to back; the CPU smoke starts it early to overlap its other parts."""

    def __init__(self, model: str, images: Path, run_dir: Path, *, steps: int = 3000, batch: int = 1,
                 grad_accum: int = 4, precision: str = "bf16", deadline_s: float = 120.0, fuse_accum: bool = False):
        self.steps, self.batch, self.grad_accum, self.precision = steps, batch, grad_accum, precision
        self.fuse_accum = fuse_accum
        self.deadline_s, self.run_dir = deadline_s, Path(run_dir)
        self.cmd = [sys.executable, "-m", "bench.textinv_main", "train", str(images), "--token", "<bench-tok>",
                    "--init", "toy", "--name", f"bench-{time.time_ns()}", "--model", model, "--steps", str(steps), "--batch-size", str(batch),
                    "--grad-accum", str(grad_accum), "--precision", precision, "--run-dir", str(run_dir), "--json"] + (["--fuse-accum"] if fuse_accum else [])

    def start(self) -> "Recipe":
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "backends"), os.environ.get("PYTHONPATH", "")])}
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.errors = open(self.run_dir.parent / f"{self.run_dir.name}.stderr", "w+")  # a pipe could fill and block
        self.lines: queue.Queue = queue.Queue()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.errors,
                                     text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.perf_counter() - self.t0, line))
        self.lines.put(None)

    def result(self) -> dict:
        started_s, finished, marks = None, False, []
        while True:
            try:
                item = self.lines.get(timeout=max(0.0, self.deadline_s - (time.perf_counter() - self.t0)))
            except queue.Empty:
                break  # the deadline
            if item is None:
                break
            at, line = item
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # any line that is not an event
            kind = ev.get("event")
            if kind == "started":
                started_s = at
            elif kind == "progress":
                marks.append((ev["step"], at))
            elif kind == "finished":
                finished = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        wall = time.perf_counter() - self.t0
        self.errors.seek(0)
        err = self.errors.read()[-1500:]
        self.errors.close()
        row = {"steps": self.steps, "batch": self.batch, "grad_accum": self.grad_accum, "precision": self.precision,
               "fuse_accum": self.fuse_accum,
               "samples": self.steps * self.batch * self.grad_accum, "load_s": started_s,
               "steps_done": marks[-1][0] if marks else 0}
        if finished and self.proc.returncode == 0:
            return {**row, "wall_s": wall, "measured": True}
        if len(marks) < 4:
            return {**row, "wall_s": wall, "measured": False,
                    "error": err or f"exit {self.proc.returncode} after {len(marks)} steps"}
        return {**row, "wall_s": wall, "measured": False, "stopped_at_deadline_s": self.deadline_s,
                **project(marks, self.steps, self.batch * self.grad_accum)}


def project(marks: list[tuple[int, float]], steps: int, samples_per_step: int) -> dict:
    """Wall time of all `steps` from (step, seconds since launch) marks of a run stopped early:
    the time of the last mark plus the remaining steps at the rate of the marks' last half
    (the first half holds warm-up: cuDNN autotuning, the allocator growing)."""
    (s_mid, t_mid), (s_end, t_end) = marks[len(marks) // 2], marks[-1]
    per_step = (t_end - t_mid) / max(1, s_end - s_mid)
    return {"step_ms": per_step * 1000, "samples_per_s": samples_per_step / per_step,
            "projected_wall_s": t_end + (steps - s_end) * per_step}
