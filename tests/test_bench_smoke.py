"""The benchmark's CPU mode runs end to end (a smoke test: no speed is asserted)."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_cpu_mode_runs_and_writes_results(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "results.json"
    env = {**os.environ, "TEXTINV_BENCH_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if r["kind"] == "train"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["samples_per_s"] > 0 and r["loss_first"] == r["loss_first"] for r in rows)  # measured, finite
    assert "| train | textinv-torch |" in proc.stdout
