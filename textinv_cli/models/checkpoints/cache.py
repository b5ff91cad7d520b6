"""Converted checkpoints under $TEXTINV_HOME/models/checkpoints/, keyed by the source file's hash.

    <sha256[:16]>-<prediction>/     a diffusers folder (prepare)
    vae-<sha256[:16]>-<family>/     a diffusers vae folder (prepare_vae)

Each holds MARKER, written last: the source, its hash, what it was converted as, the
converter version and every file with its size. A folder is used only when its marker
matches all of that, so a crash, a damaged folder or an older converter's output is rebuilt,
never loaded. Folders are built in a temp folder beside them and renamed into place
(tiny.publish_folder): of two processes converting the same file, both end up using the
one that landed first. Use refreshes the folder's mtime, which listings show as last used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

MARKER = "textinv-checkpoint.json"
CONVERTER = 1  # bump when a conversion would write anything different: old folders are rebuilt
STALE_TEMP_S = 24 * 3600  # a temp folder this old belongs to no running conversion


def root() -> Path:
    from ..resolve import models_dir

    return models_dir() / "checkpoints"


def model_folder(sha256: str, prediction: str) -> Path:
    return root() / f"{sha256[:16]}-{prediction}"


def vae_folder(sha256: str, family: str) -> Path:
    return root() / f"vae-{sha256[:16]}-{family}"


def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((Path(folder) / MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def usable(folder: Path, sha256: str) -> bool:
    """A complete conversion of the file with this hash, by this converter version."""
    marker = read_marker(folder)
    if not marker or marker.get("converter") != CONVERTER or marker.get("sha256") != sha256:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        try:
            if (Path(folder) / rel).stat().st_size != size:
                return False
        except (OSError, TypeError, ValueError):
            return False
    return True


def touch(folder: Path, source: Path | None = None) -> None:
    """Mark a cache hit: the folder's mtime is its last use. A file met under a new path
    (moved, or a copy) has its marker's source updated, so `prune` of conversions whose
    source is gone keeps the ones still in use."""
    with contextlib.suppress(OSError):  # a read-only home still serves the conversion
        os.utime(folder)
        marker = read_marker(folder)
        where = str(Path(source).absolute()) if source is not None else None
        if marker is not None and where is not None and marker.get("source") != where \
                and not os.path.isfile(str(marker.get("source"))):
            from ...writes import atomic_write_bytes

            marker["source"] = where
            atomic_write_bytes(folder / MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode(),
                               force=True)


def build(out: Path, sha256: str, marker: dict, fill: Callable[[Path], None]) -> None:
    """Make `out` by calling fill(tmp) on an empty temp folder beside it, then the marker, then
    the rename. A folder already at `out` that is not usable (damaged, older converter) is
    moved aside first."""
    from ..tiny import publish_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not usable(out, sha256):
        _discard(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        full = {**marker, "converter": CONVERTER, "files": files, "converted": time.time()}
        (tmp / MARKER).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", "utf-8")
        publish_folder(tmp, out, lambda: usable(out, sha256), f"the conversion of {marker.get('source')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed build's leftovers otherwise


def _discard(folder: Path) -> None:
    """Out of the way at once (a rename), then deleted; a failure to delete leaves only a dot-folder."""
    trash = folder.parent / f".{folder.name}.{os.getpid()}.{time.monotonic_ns()}.trash"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def cached_conversions() -> list[dict]:
    """Every cache folder: folder, kind ("model"|"vae"), source, source_exists, sha256, family,
    architecture, prediction, size (bytes on disk), last_used (epoch seconds), complete."""
    base = root()
    if not base.is_dir():
        return []
    out = []
    for folder in sorted(base.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
            continue
        marker = read_marker(folder) or {}
        source = marker.get("source")
        sha = marker.get("sha256")
        out.append({
            "folder": folder, "kind": marker.get("kind"), "source": source,
            "source_exists": isinstance(source, str) and os.path.isfile(source), "sha256": sha,
            "family": marker.get("family"), "architecture": marker.get("architecture"),
            "prediction": marker.get("prediction"), "size": _size(folder),
            "last_used": folder.stat().st_mtime, "complete": isinstance(sha, str) and usable(folder, sha),
        })
    return out


def prune(*, only_missing_sources: bool = False) -> int:
    """Delete cached conversions (all, or those whose source file is gone) and any incomplete
    ones or stale temp folders; returns the bytes freed. A model still in use by a running
    process keeps working on Linux/macOS (open files stay readable) but a later run converts again."""
    base = root()
    if not base.is_dir():
        return 0
    freed = 0
    for entry in cached_conversions():
        if only_missing_sources and entry["source_exists"] and entry["complete"]:
            continue
        freed += entry["size"]
        _discard(entry["folder"])
    now = time.time()
    for folder in base.iterdir():
        if folder.name.startswith(".") and folder.name.endswith((".tmp", ".trash")) and folder.is_dir():
            with contextlib.suppress(OSError):
                if now - folder.stat().st_mtime > STALE_TEMP_S or folder.name.endswith(".trash"):
                    size = _size(folder)
                    shutil.rmtree(folder)
                    freed += size
    return freed
