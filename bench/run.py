"""textinv's benchmark: `python -m bench.run --cpu` (smoke, tiny model) or `--gpu` (SD 1.5 shapes).

GPU mode measures in one run: the bf16 matrix-product peak, FLOPs per training sample,
textinv's train samples/s and peak memory per batch and precision, diffusers' own
textual_inversion.py on the same model, a slice of the seed recipe, and sampling against
diffusers' StableDiffusionPipeline. Results are written as JSON after every measurement
(so a run cut short still reports what it measured) and printed as a Markdown table.
No speed is asserted anywhere: the numbers go to bench/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in ("torch", "diffusers", "transformers", "accelerate", "jax"):
        try:
            out[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - absent libraries are simply not reported
            pass
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            import subprocess

            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


class Results:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "rows": []}
        self.save()

    def add(self, kind: str, **row) -> None:
        row = {"kind": kind, **row}
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def cpu_smoke(res: Results, work: Path, quick: bool) -> None:
    from textinv_torch.tiny import write_demo_images, write_tiny_model

    from bench import measure

    model = write_tiny_model(work / "tiny-sd1", "sd1")
    images = write_demo_images(work / "images", n=4, size=64)
    for batch in (1, 2):
        row = measure.train_throughput(str(model), images, batch=batch, precision="fp32", steps=8 if quick else 40,
                                       warmup=2 if quick else 10, device="cpu", extra={"threads": 2})
        res.add("train", backend="textinv-torch", device="cpu", model="tiny-sd1", **row)


def gpu(res: Results, work: Path, args) -> None:
    from bench import measure
    from bench.sd15 import build_sd15, write_images

    t = time.perf_counter()
    model = str(build_sd15(work / "sd15", Path(args.tokenizer)))
    res.add("setup", what="build SD1.5-shaped random model", seconds=time.perf_counter() - t)
    images = write_images(work / "images", n=8, size=512)
    parts = set(args.parts.split(","))
    if "peak" in parts:
        res.add("peak", tflops_bf16=measure.matmul_peak())
    if "flops" in parts:
        res.add("flops", per_sample=measure.flops_per_sample(model))
    if "ours" in parts:
        sizes = {1: (150, 30), 8: (50, 10), 32: (25, 8)}
        for precision in args.precisions.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                steps, warm = sizes.get(batch, (25, 8))
                res.add("train", backend="textinv-torch", model="sd15",
                        **measure.train_throughput(model, images, batch=batch, precision=precision, steps=steps,
                                                   warmup=warm))
    if "recipe" in parts:
        # the seed recipe is 3000 steps x batch 1 x accumulation 4; a 150-step slice, timed whole
        res.add("recipe-slice", backend="textinv-torch", **measure.train_throughput(
            model, images, batch=1, grad_accum=4, precision="bf16", steps=150, warmup=30))
    if "diffusers" in parts and args.diffusers_script:
        configs = [c.split(":") for c in args.diffusers_configs.split(",")]
        for batch, precision, workers, steps in ((int(b), p, int(w), int(n)) for b, p, w, n in configs):
            res.add("train", backend="diffusers-script", model="sd15", **measure.diffusers_script(
                Path(args.diffusers_script), model, images, batch=batch, precision=precision if precision != "no" else "fp32",
                steps=steps, workers=workers))
    if "sample" in parts:
        res.add("sample", backend="textinv-torch", **measure.sampling_ours(
            model, n=8, steps=30, size=512, precision="fp16", out=work / "samples"))
        res.add("sample", backend="diffusers-pipeline", **measure.sampling_diffusers(
            model, n=8, steps=30, size=512, precision="fp16"))


def markdown(data: dict) -> str:
    lines = ["| kind | backend | batch | precision | samples/s or images/s | peak GiB | notes |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        rate = r.get("samples_per_s", r.get("images_per_s"))
        peak = r.get("peak_mem_gib")
        notes = {k: r[k] for k in ("step_ms", "wall_s", "tflops_bf16", "per_sample", "seconds", "error", "grad_accum")
                 if k in r}
        lines.append(f"| {r['kind']} | {r.get('backend', '')} | {r.get('batch', '')} | {r.get('precision', '')} | "
                     f"{'' if rate is None else f'{rate:.2f}'} | "
                     f"{'' if peak is None else f'{peak:.2f}'} | "
                     f"{json.dumps(notes)[:200]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true", help="smoke test on the tiny model (CI)")
    mode.add_argument("--gpu", action="store_true", help="SD 1.5 shapes on a CUDA GPU")
    ap.add_argument("--quick", action="store_true", help="fewest steps (CI smoke)")
    ap.add_argument("--work", default=os.environ.get("TEXTINV_BENCH_WORK", "/tmp/textinv-bench"))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/out"), "results.json"))
    ap.add_argument("--tokenizer", default=".bench-carry/clip-tokenizer", help="CLIP vocab.json + merges.txt")
    ap.add_argument("--diffusers-script", default=".bench-carry/textual_inversion.py",
                    help="diffusers' examples/textual_inversion/textual_inversion.py (not shipped with textinv)")
    ap.add_argument("--parts", default="peak,flops,ours,recipe,diffusers,sample")
    ap.add_argument("--precisions", default="bf16,fp32", help="precisions of textinv's train rows")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes of textinv's train rows")
    ap.add_argument("--diffusers-configs", default="1:no:8:60,1:bf16:8:60,8:bf16:8:40,32:bf16:12:20",
                    help="batch:precision:workers:steps of each diffusers-script row (precision no = fp32)")
    args = ap.parse_args()
    os.environ.setdefault("TEXTINV_HOME", str(Path(args.work) / "home"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(Path(args.out), {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "command": "python -m bench.run " + ("--cpu" if args.cpu else "--gpu"),
                                   "versions": _versions()})
    if args.cpu:
        cpu_smoke(res, work, args.quick)
    else:
        gpu(res, work, args)
    print(markdown(res.data))


if __name__ == "__main__":
    main()
