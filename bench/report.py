"""results.json -> a Markdown fragment for bench/RESULTS.md: one table of every row as
measured, then the throughput targets (bench/README.md), each checked against this run's own rows."""

from __future__ import annotations

import math

# Issue 6's targets (same machine, same run, same model).
DIFFUSERS_BEST = 53.6   # diffusers' script, best batch, samples/s (its own row wins if measured)
DIFFUSERS_B1 = 6.7      # diffusers' script, batch 1 fp32
GB4_IN_GIB = 4e9 / 2**30


def _num(v, fmt="{:.2f}") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _what(r: dict) -> str:
    kind = r["kind"]
    if kind == "train":
        return f"{r.get('backend', '')} train"
    if kind == "lever":
        return f"lever {r.get('lever')} (train)"
    if kind == "sample":
        return f"{r.get('backend', '')} sample {r.get('images')} x {r.get('size')} px, {r.get('steps')} steps"
    if kind == "recipe":
        fused = ", --fuse-accum" if r.get("fuse_accum") else ""
        return f"seed recipe: `textinv train` process, 3000 x b1 x accum 4{fused}" if r.get("steps") == 3000 else \
            f"recipe: `textinv train` process, {r.get('steps')} x b{r.get('batch')} x accum {r.get('grad_accum')}{fused}"
    if kind == "peak":
        return "bf16 matrix product (the roofline)"
    if kind == "flops":
        return "FLOPs per training sample (FlopCounterMode)"
    if kind == "skipped":
        return f"skipped: {r.get('part')}"
    return kind


def _result(r: dict, peak_tflops: float | None, flops: float | None) -> str:
    if "error" in r:
        return "error: " + r["error"].strip().splitlines()[-1][:120] if r["error"].strip() else "error"
    kind = r["kind"]
    if kind in ("train", "lever"):
        text = f"{_num(r.get('samples_per_s'))} samples/s ({_num(r.get('step_ms'), '{:.1f}')} ms/step)"
        if flops and r.get("samples_per_s") and r.get("backend", "").startswith("textinv"):
            tf = flops * r["samples_per_s"] / 1e12
            text += f" = {tf:.0f} TFLOP/s" + (f", {100 * tf / peak_tflops:.0f}% of peak" if peak_tflops else "")
        if "loss_first" in r:
            text += f"; loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}"
        return text
    if kind == "sample":
        after = (f"; of it PNG files {r['png_files_s']:.2f} s: {r['images_per_s_before_png']:.2f} images/s "
                 "before them") if "png_files_s" in r else ""
        return f"{_num(r.get('images_per_s'))} images/s ({_num(r.get('seconds'))} s, batch {r.get('batch_size')}{after})"
    if kind == "recipe":
        if r.get("measured"):
            return f"{r['wall_s']:.1f} s wall, measured (model load {_num(r.get('load_s'), '{:.1f}')} s)"
        return (f"{_num(r.get('projected_wall_s'), '{:.0f}')} s wall, PROJECTED from {r.get('steps_done')} steps in "
                f"{r['wall_s']:.0f} s ({_num(r.get('samples_per_s'))} samples/s; load {_num(r.get('load_s'), '{:.1f}')} s)")
    if kind == "peak":
        return f"{r['tflops_bf16']:.1f} TFLOP/s"
    if kind == "flops":
        return f"{r['per_sample'] / 1e12:.4f} TFLOP"
    if kind == "setup":
        return f"{r['seconds']:.1f} s"
    if kind == "skipped":
        return r.get("reason", "")
    return ""


def _peak(r: dict) -> str:
    if r.get("peak_step_gib") is not None and not math.isnan(r.get("peak_step_gib", math.nan)):
        return f"{r['peak_mem_gib']:.2f} (steps {r['peak_step_gib']:.2f}, setup {r['peak_setup_gib']:.2f})"
    return _num(r.get("peak_mem_gib"))


def targets(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["kind"] == "train" and r.get("backend") == "textinv-torch" and r.get("samples_per_s")]
    jax = [r for r in ok if r["kind"] == "train" and r.get("backend") == "textinv-jax" and r.get("samples_per_s")]
    script = [r for r in ok if r["kind"] == "train" and r.get("backend") == "diffusers-script"]
    out = []
    best_script = max([r["samples_per_s"] for r in script] or [DIFFUSERS_BEST])
    if ours:
        best = max(ours, key=lambda r: r["samples_per_s"])
        out.append(_check(f"best batch >= 4x diffusers' best ({4 * best_script:.0f} samples/s)",
                          best["samples_per_s"] >= 4 * best_script,
                          f"{best['samples_per_s']:.1f} at batch {best['batch']} {best['precision']}"))
    b1 = [r for r in ours if r["batch"] == 1 and r.get("grad_accum", 1) == 1 and r["precision"] == "bf16"]
    if b1:
        r = b1[0]
        out.append(_check(f"batch 1 >= {2 * DIFFUSERS_B1:.0f} samples/s with peak <= 4 GB ({GB4_IN_GIB:.2f} GiB)",
                          r["samples_per_s"] >= 2 * DIFFUSERS_B1 and r.get("peak_mem_gib", 99) <= GB4_IN_GIB,
                          f"{r['samples_per_s']:.1f} samples/s, {_num(r.get('peak_mem_gib'))} GiB"))
    for r in [r for r in ok if r["kind"] == "recipe" and r.get("steps") == 3000]:
        wall = r["wall_s"] if r.get("measured") else r.get("projected_wall_s")
        if wall is not None:
            how = " (--fuse-accum)" if r.get("fuse_accum") else ""
            out.append(_check(f"seed recipe{how} <= 90 s wall, model load included", wall <= 90,
                              f"{wall:.0f} s {'measured' if r.get('measured') else 'projected'}"))
    samples = {r.get("backend"): r for r in ok if r["kind"] == "sample"}
    if "textinv-torch" in samples and "diffusers-pipeline" in samples:
        mine, theirs = samples["textinv-torch"], samples["diffusers-pipeline"]["images_per_s"]
        ratio = mine["images_per_s"] / theirs
        before = (f" ({mine['images_per_s_before_png'] / theirs:.2f}x before writing the PNG files)"
                  if "images_per_s_before_png" in mine else "")
        out.append(_check("sampling >= 1.0x diffusers' pipeline", ratio >= 1.0, f"{ratio:.2f}x{before}"))
    for j in jax:
        same = [r for r in ours if r["batch"] == j["batch"] and r["precision"] == j["precision"]]
        if same:
            ratio = j["samples_per_s"] / same[0]["samples_per_s"]
            out.append(_check(f"JAX >= 0.8x torch at batch {j['batch']} {j['precision']}", ratio >= 0.8,
                              f"{ratio:.2f}x"))
    return out


def _check(what: str, met: bool, value: str) -> str:
    return f"| {what} | {value} | {'met' if met else 'NOT met'} |"


def markdown(data: dict) -> str:
    rows = data["rows"]
    peak = next((r["tflops_bf16"] for r in rows if r["kind"] == "peak" and "tflops_bf16" in r), None)
    flops = next((r["per_sample"] for r in rows if r["kind"] == "flops" and "per_sample" in r), None)
    lines = ["| measurement | batch | precision | result | peak memory GiB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_what(r)} | {r.get('batch', '')} | {r.get('precision', '')} | "
                     f"{_result(r, peak, flops)} | {_peak(r)} |")
    checks = targets(rows)
    if checks:
        lines += ["", "| target (issue 6) | this run | |", "|---|---|---|", *checks]
    return "\n".join(lines) + "\n"
