"""The files every backend's training run writes: the run's embeddings (snapshots and the
final one, in the diffusers format), the run folder's check before the first write, and the
event log. The run engine (engine/loop.py) calls them; the option checks are engine/checks.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..errors import OutputExistsError
from ..writes import check_new_folder

EVENTS = "events.jsonl"


# -- embeddings the run writes: snapshots and the final one ---------------------------------

def embedding_meta(spec, family: str, step: int, backend: str | None = None) -> dict[str, str]:
    """What the file and the registry keep about where the embedding came from (its start too:
    the --init words, or the registry entry it continued)."""
    from .init_from import init_meta

    return {"token": spec.token, "step": str(step), **base_model_meta(spec), "family": family,
            "learnable_property": spec.property, "vectors": str(spec.vectors),
            "trained_with": f"textinv {backend or spec.backend}", **init_meta(spec),
            **({"clip_skip": str(spec.clip_skip)} if getattr(spec, "clip_skip", 1) > 1 else {})}


def base_model_meta(spec) -> dict[str, str]:
    """The base model as the embedding's metadata keeps it: `base_model`, the model as given
    (a single-file checkpoint's path, not the cached folder made from it; a folder given with
    --vae, not the view joining them), and for a single
    file A1111's `sd_checkpoint` (its short hash) and `sd_checkpoint_name` (its stem), the
    fields A1111 writes into the embeddings it trains."""
    model_file = getattr(spec, "model_file", None)
    if not model_file:
        from ..models.model_views import view_info

        joined = view_info(Path(spec.model)) if getattr(spec, "vae", None) else None  # a folder with --vae
        return {"base_model": str(joined["model"]) if joined and joined.get("model") else str(spec.model)}
    from .infotext import a1111_model_fields

    fields = a1111_model_fields(model_file, getattr(spec, "model_sha256", None), None, None)
    return {"base_model": str(model_file), "sd_checkpoint": fields["model_hash"],
            "sd_checkpoint_name": fields["model_title"]}


def write_vectors(path: Path, vectors: dict, spec, family: str, step: int, backend: str | None = None) -> Path:
    """The diffusers format at `path` (X.safetensors: {token: [n, w]}); SDXL also writes
    X_2.safetensors beside it, the pair diffusers' SDXL script writes. Returns `path`."""
    from ..embedding import Embedding
    from ..formats import write_embedding
    from ..formats.folders import SDXL_FIRST, SDXL_SECOND, sdxl_pair_files
    from ..writes import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through Embedding: the same checks (NaN, shapes) and metadata as every other writer.
    emb = Embedding(token=spec.token, vectors=vectors, meta=embedding_meta(spec, family, step, backend))
    if family == "sdxl":
        files = sdxl_pair_files(emb)  # the bytes diffusers' SDXL script writes, under our names
        atomic_write_bytes(path.with_name(path.stem + "_2" + path.suffix), files[SDXL_SECOND], force=True)
        atomic_write_bytes(path, files[SDXL_FIRST], force=True)
        return path
    write_embedding(emb, path, "safetensors", force=True)
    return path


# -- the run folder ----------------------------------------------------------------------

def check_new_run_dir(run: Path) -> None:
    """A new run needs an absent or empty folder in a writable place; checked before any work."""
    if run.is_dir():
        _drop_unstarted_leftovers(run)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise OutputExistsError(f"The run folder {run} already exists and is not empty.",
                                f"Continue it with `textinv resume {run}`, or pick another folder.")
    check_new_folder(run, "the run folder", "Pick a writable place for the run (--run-dir).")


def _drop_unstarted_leftovers(run: Path) -> None:
    """A run killed while writing its first file (spec.json) left only that temp file: the
    folder never held a run, so it counts as empty rather than blocking `train --run-dir`."""
    from .runs import is_leftover_file

    entries = list(run.iterdir())
    if entries and all(p.is_file() and is_leftover_file(p.name) for p in entries):
        for p in entries:
            p.unlink(missing_ok=True)


def record_event(run: Path, event) -> object:
    """Append the event to run/events.jsonl; numpy arrays are left out (shapes stay).

    Not fsynced (a log, written every step); a process or machine that died mid-line leaves
    a torn last line, which the next append cuts off so every line stays one JSON object."""
    def plain(v):
        if isinstance(v, np.ndarray):
            return list(v.shape)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    line = json.dumps({"time": round(time.time(), 3), **plain(event.to_json())}) + "\n"
    with open(run / EVENTS, "a+b") as f:
        _cut_torn_line(f)
        f.write(line.encode("utf-8"))
    return event


def _cut_torn_line(f) -> None:
    """Truncate a file opened for appending after its last newline, if it does not end in one."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos = end
    while pos > 0:  # walk back in blocks to the last newline (or the start of the file)
        start = max(0, pos - 65536)
        f.seek(start)
        nl = f.read(pos - start).rfind(b"\n")
        if nl >= 0:
            f.truncate(start + nl + 1)
            return
        pos = start
    f.truncate(0)


# -- the data a run trains on: recorded at its start, compared on resume ----------------------------
DATA_FILE = "data.json"


def data_listing(images: list[Path], data_dir: Path, template: str | None = None) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file the run reads: the images, their .txt
    captions and the --template file. A changed size or time means changed content (a copy
    that keeps both is the same data as far as anyone can tell)."""
    files = {Path(p) for p in images} | {Path(p).with_suffix(".txt") for p in images}
    if template:
        files.add(Path(template))
    listing = {}
    for f in sorted(files):
        try:
            st = f.stat()
        except OSError:
            continue  # a caption that is not there: absent from both listings alike
        try:
            key = str(f.resolve().relative_to(Path(data_dir).resolve()))
        except ValueError:
            key = str(f.resolve())
        listing[key] = [st.st_size, st.st_mtime_ns]
    return listing


def save_data_listing(run: Path, listing: dict) -> None:
    from ..writes import atomic_write_bytes

    atomic_write_bytes(Path(run) / DATA_FILE, json.dumps(listing, sort_keys=True).encode() + b"\n", force=True)


def data_change(run: Path, listing: dict) -> str | None:
    """What changed in the data since the run started, in one sentence, or None (also when the
    run predates data.json: nothing to compare with)."""
    try:
        before = json.loads((Path(run) / DATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(before, dict) or before == listing:
        return None
    added = [k for k in listing if k not in before]
    removed = [k for k in before if k not in listing]
    changed = [k for k in listing if k in before and before[k] != listing[k]]
    parts = [f"{len(x)} {what}" for x, what in ((added, "added"), (removed, "removed"), (changed, "changed"))
             if x]
    example = (added + removed + changed)[0]
    return (f"The training data changed since the run started ({', '.join(parts)}, e.g. {example}): "
            "the result can no longer match an uninterrupted run.")
