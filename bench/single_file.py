"""Start-up from a single-file checkpoint: the first `textinv sample --model FILE` (hash the
file, convert it to the cached diffusers folder, load it) against the second (cache hit:
load only), on an SD 1.5-shaped file with random weights in A1111's LDM layout, fp16.

    python -m bench.single_file --work /tmp/sf --runs 3

The file is ~2.1 GB; it is built once under --work (the SD 1.5-shaped folder from sd15.py,
written in the LDM layout by the tests' own writer). Each run is a whole `textinv` process
(imports, model load, one 64 px denoising step on the CPU), timed from outside; the first-start
runs delete the conversion cache and the hash memo before they start. Prints the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_file(work: Path) -> Path:
    out = work / "models" / "v1-5-pruned-emaonly.safetensors"
    if out.exists():
        return out
    from textinv_cli.models.checkpoints import clip_vocab

    from .sd15 import build_sd15

    tokenizer = work / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for name, data in clip_vocab.tokenizer_files().items():
        (tokenizer / name).write_bytes(data)
    folder = build_sd15(work / "sd15", tokenizer, device="cpu")
    from tests.support.ldm_writer import ldm_state_dict, save_checkpoint

    (folder / "textinv-tiny.json").write_text(json.dumps({"family": "sd1"}))  # the writer reads the family here
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ldm_state_dict(folder), out, "fp16")
    finally:
        (folder / "textinv-tiny.json").unlink()
    return out


def run_once(file: Path, home: Path, first: bool) -> float:
    if first:
        shutil.rmtree(home / "models" / "checkpoints", ignore_errors=True)
        (home / "models" / "hashes.json").unlink(missing_ok=True)
    out = home / "out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "textinv_cli", "sample", "a cat", "--model", str(file), "--steps", "1",
                    "--size", "64", "-o", str(out)], check=True, capture_output=True,
                   env={**os.environ, "TEXTINV_HOME": str(home)})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/textinv-single-file"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    file = build_file(args.work)
    home = args.work / "home"
    run_once(file, home, first=False)  # warm-up: the page cache and the imports, as every later run has them
    first, second = [], []
    for _ in range(args.runs):  # in turn, so a drifting machine affects both alike
        first.append(run_once(file, home, first=True))
        second.append(run_once(file, home, first=False))
    print(json.dumps({"file_bytes": file.stat().st_size, "first_start_s": statistics.median(first),
                      "cached_start_s": statistics.median(second), "first": first, "cached": second}, indent=2))


if __name__ == "__main__":
    main()
