"""textinv's benchmark: `python -m bench.run --gpu` (SD 1.5 shapes) or `--cpu` (tiny model, smoke).

One run measures every throughput target, in priority order, inside a time budget (one
device call): the bf16 matrix-product peak, FLOPs per training sample, textinv's train
samples/s and peak memory per batch and precision, sampling beside diffusers'
StableDiffusionPipeline, the seed recipe as a timed `textinv train` process, the JAX
backend's train rows, and speed levers one at a time with their losses. A part that
would not fit the time left is recorded as skipped, not half-run.

Results are written after every measurement (a run cut short still reports what it
measured) to OUT/results.json and OUT/results.md (a table fragment for bench/RESULTS.md,
with the targets checked). No speed is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench import report
from bench.levers import GPU_LEVERS

# Rough seconds each part takes on an H200 (model loads included): a part starts only if
# this much of the budget is left.
COST_S = {"peak": 5, "flops": 15, "train": 60, "sample": 45, "recipe": 100, "jax": 150, "levers": 80,
          "lever-compile-blocks": 90,  # regional compile's warm-up (a guess: measured on the tiny model only)
          "fp32": 60, "diffusers": 120}
GPU_PARTS = "peak,flops,train,sample,recipe,jax,levers,fp32,diffusers"
TRAIN_STEPS = {1: (150, 30), 8: (50, 10), 32: (25, 8)}  # batch -> (steps, warm-up steps excluded)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in ("torch", "diffusers", "transformers", "accelerate", "jax", "flax"):
        try:
            out[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - absent libraries are simply not reported
            pass
    try:
        import torch

        if torch.cuda.is_available():
            import subprocess

            out["gpu"] = torch.cuda.get_device_name(0)
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


class Results:
    """Rows as measured, saved (JSON and Markdown) after each one."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, {"meta": meta, "rows": []}
        self.save()

    def add(self, kind: str, **row) -> None:
        row = {"kind": kind, **row}
        self.data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "results.md").write_text(report.markdown(self.data))


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, res: Results, part: str, cost: float) -> bool:
        if self.left() >= cost:
            return True
        res.add("skipped", part=part, reason=f"{self.left():.0f} s of the budget left, needs ~{cost:.0f} s")
        return False


def _guarded(res: Results, kind: str, fn, **labels) -> None:
    """One measurement; a failure becomes an error row and the run goes on to the next."""
    try:
        res.add(kind, **labels, **fn())
    except Exception as e:  # noqa: BLE001 - a failed lever or backend must not lose the other rows
        res.add(kind, **labels, error=f"{type(e).__name__}: {str(e)[:500]}")


def run_parts(res: Results, cfg: dict, parts: set[str], budget: Budget, model: str, images: Path, work: Path) -> None:
    from bench import jax_rows, levers, measure, recipe

    device, cost = cfg["device"], cfg["cost"]

    def new_recipe(fuse_accum: bool = False) -> recipe.Recipe:
        r = cfg["recipe"]
        return recipe.Recipe(model, images, work / "recipe" / f"run-{time.time_ns()}", fuse_accum=fuse_accum,
                             **{**r, "deadline_s": min(r["deadline_s"], budget.left())})

    # The CPU smoke overlaps the recipe's process with the in-process parts (fused, so the
    # option's plumbing is smoke-tested); the GPU never overlaps and runs both ways.
    overlapped = new_recipe(fuse_accum=True).start() if device == "cpu" and "recipe" in parts else None
    if "peak" in parts and budget.allows(res, "peak", cost["peak"]):
        _guarded(res, "peak", lambda: {"tflops_bf16": measure.matmul_peak(device, n=cfg["matmul_n"])})
    if "flops" in parts and budget.allows(res, "flops", cost["flops"]):
        _guarded(res, "flops", lambda: {"per_sample": measure.flops_per_sample(
            model, device, resolution=cfg["resolution"], dtype_name=cfg["flops_dtype"])})

    def train_rows(precision: str, batches: list[int]) -> None:
        for batch in batches:
            steps, warm = cfg["train_steps"](batch)
            _guarded(res, "train", lambda: measure.train_throughput(
                model, images, batch=batch, precision=precision, steps=steps, warmup=warm, device=device,
                extra=cfg["extra"]), backend="textinv-torch", model=cfg["model_name"])

    if "train" in parts and budget.allows(res, "train", cost["train"]):
        train_rows(cfg["precision"], cfg["batches"])
    if "sample" in parts and budget.allows(res, "sample", cost["sample"]):
        s = cfg["sample"]
        _guarded(res, "sample", lambda: measure.sampling_ours(model, out=work / "samples", **s),
                 backend="textinv-torch")
        _guarded(res, "sample", lambda: measure.sampling_diffusers(model, device=device, **s),
                 backend="diffusers-pipeline")
    if "recipe" in parts and overlapped is None and budget.allows(res, "recipe", cost["recipe"]):
        _free_torch_cache()
        _guarded(res, "recipe", lambda: new_recipe().start().result(), backend="textinv-torch")
        if budget.allows(res, "recipe", cost["recipe"]):  # the lever: micro-steps as one batch
            _free_torch_cache()
            _guarded(res, "recipe", lambda: new_recipe(fuse_accum=True).start().result(), backend="textinv-torch")
    if "jax" in parts and budget.allows(res, "jax", cost["jax"]):
        _free_torch_cache()
        j = cfg["jax"]
        limit = max(30.0, min(cfg["jax_timeout_s"], budget.left() - 5))  # compiles can run long: cap them
        for row in jax_rows.rows(model, images, cpu=device == "cpu", timeout_s=limit, **j):
            res.add("train", backend="textinv-jax", model=cfg["model_name"], **row)
    if "levers" in parts and budget.allows(res, "levers", cost["levers"]):
        lv = cfg["levers"]
        for name in lv["names"]:
            if not budget.allows(res, f"lever {name}", cost.get(f"lever-{name}", 0)):
                continue
            _guarded(res, "lever", lambda: measure.train_throughput(
                model, images, batch=lv["batch"], precision=cfg["precision"], steps=lv["steps"],
                warmup=lv["warmup"], device=device, extra=cfg["extra"], around=lambda: levers.lever(name)),
                lever=name, backend="textinv-torch")
    if "fp32" in parts and cfg["fp32_batches"] and budget.allows(res, "fp32", cost["fp32"]):
        train_rows("fp32", cfg["fp32_batches"])
    if overlapped is not None:
        _guarded(res, "recipe", overlapped.result, backend="textinv-torch")


def _free_torch_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a child process gets the memory torch's allocator still caches
    except ImportError:
        pass


def cpu_config(quick: bool) -> dict:
    from bench.levers import CPU_LEVERS

    n = 1 if quick else 3
    return {"device": "cpu", "model_name": "tiny-sd1", "resolution": 64, "matmul_n": 256, "flops_dtype": "fp32",
            "precision": "fp32", "batches": [1, 2], "fp32_batches": [], "extra": {"threads": 1},
            "train_steps": lambda b: (4 * n, n), "cost": {k: 0 for k in COST_S},
            "sample": {"n": 2, "steps": 2, "size": 64, "precision": "fp32", "warmup": not quick},
            "recipe": {"steps": 2 * n, "batch": 1, "grad_accum": 2, "precision": "fp32", "deadline_s": 120},
            "jax": {"batches": [1], "precision": "fp32", "steps": 3 * n, "warmup": 1}, "jax_timeout_s": 300,
            "levers": {"names": CPU_LEVERS, "batch": 1, "steps": 2 + n, "warmup": 1}}


def gpu_config(args) -> dict:
    return {"device": "cuda", "model_name": "sd15", "resolution": 512, "matmul_n": 8192, "flops_dtype": "bf16",
            "precision": "bf16", "batches": [int(b) for b in args.batches.split(",")],
            "fp32_batches": [int(b) for b in args.fp32_batches.split(",") if b],
            "extra": {}, "train_steps": lambda b: TRAIN_STEPS.get(b, (25, 8)), "cost": COST_S,
            "sample": {"n": 8, "steps": 30, "size": 512, "precision": "fp16", "warmup": True},
            "recipe": {"steps": 3000, "batch": 1, "grad_accum": 4, "precision": "bf16",
                       "deadline_s": args.recipe_deadline},
            "jax": {"batches": [1, 8], "precision": "bf16", "steps": 60, "warmup": 20}, "jax_timeout_s": 200,
            "levers": {"names": args.levers.split(","), "batch": 8, "steps": 30, "warmup": 10}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true", help="smoke test on the tiny model (CI): every part, tiny")
    mode.add_argument("--gpu", action="store_true", help="SD 1.5 shapes on a CUDA GPU")
    ap.add_argument("--quick", action="store_true", help="fewest steps (CI smoke)")
    ap.add_argument("--work", default=os.environ.get("TEXTINV_BENCH_WORK", "/tmp/textinv-bench"))
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json/.md ($OUT, else WORK/out)")
    ap.add_argument("--budget-s", type=float, default=450,
                    help="GPU: seconds (model build included) after which no part starts; see bench/README.md")
    ap.add_argument("--tokenizer", default=".bench-carry/clip-tokenizer", help="CLIP vocab.json + merges.txt")
    ap.add_argument("--diffusers-script", default=".bench-carry/textual_inversion.py",
                    help="diffusers' examples/textual_inversion/textual_inversion.py (not shipped with textinv)")
    ap.add_argument("--parts", default=None, help=f"comma list (default: all: {GPU_PARTS})")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes of the bf16 train rows")
    ap.add_argument("--fp32-batches", default="1,8", help="batch sizes of the fp32 train rows ('' for none)")
    ap.add_argument("--levers", default=",".join(GPU_LEVERS), help="levers measured one by one (bench/levers.py)")
    ap.add_argument("--recipe-deadline", type=float, default=60,
                    help="seconds after which the seed recipe's process is stopped and its wall time projected")
    ap.add_argument("--diffusers-configs", default="1:no:8:60,8:bf16:8:40,32:bf16:12:20",
                    help="batch:precision:workers:steps of each diffusers-script row (precision no = fp32)")
    args = ap.parse_args()
    t_start = time.monotonic()
    os.environ.setdefault("TEXTINV_HOME", str(Path(args.work) / "home"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + ("--cpu" + (" --quick" if args.quick else "") if args.cpu else "--gpu")
    res = Results(Path(args.out or work / "out"), {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "command": command, "versions": _versions()})
    parts = set((args.parts or GPU_PARTS).split(","))
    if args.cpu:
        from textinv_cli.models.demo_images import write_demo_images
        from textinv_torch.tiny import write_tiny_model

        model = str(write_tiny_model(work / "tiny-sd1", "sd1"))
        images = write_demo_images(work / "images", n=4, size=64)
        # --quick leaves out the JAX rows: their XLA compile of the train step alone takes ~10 s
        skip = {"diffusers"} | ({"jax"} if args.quick and not args.parts else set())
        run_parts(res, cpu_config(args.quick), parts - skip, Budget(3600), model, images, work)
    else:
        from bench.sd15 import build_sd15, write_images

        budget = Budget(args.budget_s)
        t = time.perf_counter()
        model = str(build_sd15(work / "sd15", Path(args.tokenizer)))
        res.add("setup", what="build SD1.5-shaped random model", seconds=time.perf_counter() - t)
        images = write_images(work / "images", n=8, size=512)
        run_parts(res, gpu_config(args), parts, budget, model, images, work)
        if "diffusers" in parts and Path(args.diffusers_script).is_file():
            _diffusers_rows(res, args, model, images, budget)
    res.data["meta"]["total_s"] = time.monotonic() - t_start
    res.save()
    print(report.markdown(res.data))


def _diffusers_rows(res: Results, args, model: str, images: Path, budget: Budget) -> None:
    from bench import measure

    for spec in args.diffusers_configs.split(","):
        batch, precision, workers, steps = spec.split(":")
        if not budget.allows(res, f"diffusers-script {spec}", COST_S["diffusers"] / 3):
            return
        _guarded(res, "train", lambda: measure.diffusers_script(
            Path(args.diffusers_script), model, images, batch=int(batch),
            precision=precision if precision != "no" else "fp32", steps=int(steps), workers=int(workers)),
            backend="diffusers-script", model="sd15")


if __name__ == "__main__":
    main()
