"""`make demo`: the main job on the built-in tiny model, with no network and no downloads.

Builds the tiny SD 1.x model and a small synthetic image set, trains a concept on CPU,
then lists, inspects, converts and samples with it, and converts a couple of files of
the kinds people download. Everything goes under ./demo-out (its own registry in
demo-out/home unless TEXTINV_HOME is set). Each step runs the real command, with the
first usable backend (torch where it is installed) or the one TEXTINV_DEMO_BACKEND names.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

STEPS = int(os.environ.get("TEXTINV_DEMO_STEPS", "300"))
BACKEND = os.environ.get("TEXTINV_DEMO_BACKEND", "")


def _run(*args: str) -> None:
    from .app import main

    print(f"\n$ textinv {shlex.join(args)}", flush=True)
    try:
        main(list(args))
    except SystemExit as e:
        if e.code not in (0, None):
            raise SystemExit(f"demo step failed: textinv {shlex.join(args)} (exit {e.code})") from None


def main() -> None:
    t0 = time.monotonic()
    out = Path(os.environ.get("TEXTINV_DEMO_DIR", "demo-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TEXTINV_HOME", str(out / "home"))
    model, images, run = out / "models" / "tiny-sd1", out / "cat-toy-images", out / "runs" / "cat-toy"

    # A rerun starts the training part afresh (the model and images are reused).
    from ..registry.store import Registry

    if Registry().get("cat-toy") is not None:
        Registry().remove("cat-toy")
    shutil.rmtree(run, ignore_errors=True)

    backend = ("--backend", BACKEND) if BACKEND else ()
    _run("tiny-model", str(model), "--images", str(images), *backend)
    _run("train", str(images), "--token", "<cat-toy>", "--init", "toy", "--model", str(model),
         "--steps", str(STEPS), "--lr", "5e-3", "--checkpoint-every", str(max(1, STEPS // 3)),
         "--run-dir", str(run), *backend)
    _run("list")
    _run("inspect", "cat-toy", "--model", str(model), "--top", "3")
    _run("convert", "cat-toy", "--to", "a1111", "-o", str(out), "--force")
    _run("convert", "cat-toy", "--to", "kohya", "-o", str(out / "cat-toy.kohya.safetensors"), "--force")
    _run("sample", "A <cat-toy> backpack", "-n", "2", "--steps", "10", "--model", str(model),
         "-o", str(out / "samples"), *backend)

    # Files of the kinds people download: an A1111 .pt and an SDXL kohya file.
    from ..embedding import Embedding
    from ..formats import write_embedding

    rng = np.random.default_rng(0)
    pt = out / "charturner.pt"
    if not pt.exists():
        write_embedding(Embedding("charturner", {"clip_l": rng.standard_normal((2, 768)).astype(np.float32) * 0.02},
                                  {"step": "1500", "sd_checkpoint_name": "v1-5-pruned-emaonly"}), pt, "a1111")
    xl = out / "xl-style.safetensors"
    if not xl.exists():
        write_embedding(Embedding("<xl-style>", {"clip_l": rng.standard_normal((4, 768)).astype(np.float32) * 0.02,
                                                  "clip_g": rng.standard_normal((4, 1280)).astype(np.float32) * 0.02}),
                        xl, "kohya")
    _run("inspect", str(pt))
    _run("convert", str(pt), "--to", "a1111-png", "-o", str(out), "--force")
    _run("convert", str(xl), "--to", "diffusers-sdxl", "-o", str(out / "xl-style-diffusers"), "--force")
    _run("backends")
    print(f"\nDone in {time.monotonic() - t0:.0f} s. Everything is in {out}:")
    print(f"  model {model}\n  images {images}\n  run {run} (checkpoints, spec.json, learned_embeds.safetensors)")
    print(f"  samples {out / 'samples'}\n  registry {os.environ['TEXTINV_HOME']}")


if __name__ == "__main__":
    sys.exit(main())
