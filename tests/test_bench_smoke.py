"""The benchmark's CPU mode runs every part end to end on the tiny model (a smoke test: no
speed is asserted), and its bookkeeping (the recipe's projection, the targets table) is right."""

import json
import math
import os
import subprocess
import sys

import pytest

from bench import recipe, report


def test_bench_cpu_mode_runs_every_part_and_writes_results(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    env = {**os.environ, "TEXTINV_BENCH_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert not [r for r in rows if "error" in r or r["kind"] == "skipped"], rows
    by = {}
    for r in rows:
        by.setdefault(r["kind"], []).append(r)
    assert by["peak"][0]["tflops_bf16"] > 0 and by["flops"][0]["per_sample"] > 0
    assert [r["batch"] for r in by["train"]] == [1, 2]
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["loss_first"]) for r in by["train"])  # measured, finite
    assert {r["backend"]: r["batch_size"] for r in by["sample"]} == {"textinv-torch": 2, "diffusers-pipeline": 2}
    assert [r["lever"] for r in by["lever"]] == ["sdpa-math", "channels-last"]
    # a lever changes the kernels, not the math: its losses are the baseline's up to rounding
    base = by["lever"][0]["losses"]
    for r in by["lever"]:
        assert r["losses"] == pytest.approx(base, rel=1e-4)
    (rec,) = by["recipe"]
    assert rec["measured"] and rec["steps_done"] == rec["steps"] and rec["samples"] == rec["steps"] * 2
    assert rec["load_s"] < rec["wall_s"]
    md = (out / "results.md").read_text()
    assert "| textinv-torch train | 1 | fp32 |" in md and "| target (issue 6) |" in md
    assert "| textinv-torch train |" in proc.stdout


def test_recipe_projection_uses_the_steady_half():
    # 3 s to start, then a slow warm-up step and 0.1 s per step after it
    marks = [(1, 3.0), (2, 4.0)] + [(s, 4.0 + 0.1 * (s - 2)) for s in range(3, 11)]
    got = recipe.project(marks, steps=3000, samples_per_step=4)
    assert got["step_ms"] == pytest.approx(100)
    assert got["samples_per_s"] == pytest.approx(40)
    assert got["projected_wall_s"] == pytest.approx(4.8 + 2990 * 0.1)


def _train(backend, batch, rate, peak=None, precision="bf16"):
    return {"kind": "train", "backend": backend, "batch": batch, "precision": precision, "samples_per_s": rate,
            "step_ms": 1000 * batch / rate, "peak_mem_gib": peak}


def test_targets_are_checked_against_the_runs_own_rows():
    rows = [_train("textinv-torch", 1, 13.5, peak=3.5), _train("textinv-torch", 32, 200.0, peak=25.0),
            _train("textinv-jax", 1, 10.0), _train("diffusers-script", 32, 50.0),
            {"kind": "sample", "backend": "textinv-torch", "images_per_s": 3.9, "images_per_s_before_png": 4.56},
            {"kind": "sample", "backend": "diffusers-pipeline", "images_per_s": 3.8},
            {"kind": "recipe", "steps": 3000, "measured": False, "wall_s": 90.0, "projected_wall_s": 120.0}]
    lines = report.targets(rows)
    assert lines == [
        "| best batch >= 4x diffusers' best (200 samples/s) | 200.0 at batch 32 bf16 | met |",
        "| batch 1 >= 13 samples/s with peak <= 4 GB (3.73 GiB) | 13.5 samples/s, 3.50 GiB | met |",
        "| seed recipe <= 90 s wall, model load included | 120 s projected | NOT met |",
        "| sampling >= 1.0x diffusers' pipeline | 1.03x (1.20x before writing the PNG files) | met |",
        "| JAX >= 0.8x torch at batch 1 bf16 | 0.74x | NOT met |",
    ]
    rows[1]["peak_mem_gib"], rows[0]["peak_mem_gib"] = 25.0, 4.0  # 4 GiB is more than 4 GB
    assert report.targets(rows)[1].endswith("| NOT met |")
