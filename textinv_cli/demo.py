"""`make demo`: a tour of textinv on this machine, with no network and no downloads.

Everything goes under ./demo-out (its own registry in demo-out/home unless TEXTINV_HOME
is set). Each step runs the real command, exactly as a user would type it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import numpy as np


def _run(*args: str) -> None:
    from .app import main

    print(f"\n$ textinv {shlex.join(args)}", flush=True)
    try:
        main(list(args))
    except SystemExit as e:
        if e.code not in (0, None):
            raise SystemExit(f"demo step failed: textinv {shlex.join(args)} (exit {e.code})") from None


def main() -> None:
    out = Path(os.environ.get("TEXTINV_DEMO_DIR", "demo-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TEXTINV_HOME", str(out / "home"))

    from .embedding import Embedding
    from .formats import write_embedding

    # Stand-ins for files people download: an A1111 .pt and an SDXL kohya file.
    rng = np.random.default_rng(0)
    pt = out / "charturner.pt"
    if not pt.exists():
        emb = Embedding("charturner", {"clip_l": rng.standard_normal((2, 768)).astype(np.float32) * 0.02},
                        {"step": "1500", "sd_checkpoint_name": "v1-5-pruned-emaonly"})
        write_embedding(emb, pt, "a1111")
    xl = out / "xl-style.safetensors"
    if not xl.exists():
        emb = Embedding("<xl-style>", {"clip_l": rng.standard_normal((4, 768)).astype(np.float32) * 0.02,
                                        "clip_g": rng.standard_normal((4, 1280)).astype(np.float32) * 0.02})
        write_embedding(emb, xl, "kohya")

    _run("inspect", str(pt))
    _run("convert", str(pt), "--to", "safetensors", "-o", str(out), "--force")
    _run("convert", str(pt), "--to", "a1111-png", "-o", str(out), "--force")
    _run("convert", str(xl), "--to", "diffusers-sdxl", "-o", str(out / "xl-style-diffusers"), "--force")
    _run("import", str(pt))
    _run("import", str(xl), "--name", "xl-style")
    _run("list")
    _run("inspect", "xl-style")
    _run("backends")
    print(f"\nDemo files are in {out}; its registry is {os.environ['TEXTINV_HOME']}.")


if __name__ == "__main__":
    sys.exit(main())
