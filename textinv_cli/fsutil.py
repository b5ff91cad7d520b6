"""Atomic file and folder writes: temp file in the same folder, fsync, rename.

A crash at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExistsError, TextinvError

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a TI file is KBs; refuse anything this large unless asked


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def _as_if_created(fd_or_path, mode: int) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; the finished file should get the
    permissions a plain open() would give it (0666/0777 minus the umask), like cp does."""
    with contextlib.suppress(OSError):
        os.chmod(fd_or_path, mode & ~_umask())


def check_writable_target(path: Path, force: bool) -> None:
    """Refuse before any work is done: existing target without --force, missing folder."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists.", "Pass --force to overwrite it, or -o to write elsewhere.")
    if not path.parent.exists():
        raise TextinvError(f"The folder {path.parent} does not exist.", "Create it first or pick another -o.")


@contextlib.contextmanager
def errors_name(path: Path):
    """OSErrors name the destination: the user knows that path, not a temp file or folder
    beside it named `.NAME.*` (which is gone), and a write that fails midway (ENOSPC at
    write or fsync) carries no file name at all.
    """
    path = Path(path)
    try:
        yield
    except OSError as e:
        if e.filename is None or os.path.basename(os.fsdecode(e.filename)).startswith(f".{path.name}."):
            e.filename = str(path)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, force: bool = False) -> None:
    path = Path(path)
    check_writable_target(path, force)
    with errors_name(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _as_if_created(fd, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


def atomic_write_dir(path: Path, files: dict[str, bytes], *, force: bool = False) -> None:
    """Write a folder of files: build it beside the target, then rename into place."""
    path = Path(path)
    check_writable_target(path, force)
    with errors_name(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            _as_if_created(tmp, 0o777)
            for name, data in files.items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            if path.exists():  # --force: move the old one aside, then drop it once the new one is in
                _swap_in(tmp, path)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_dir(path.parent)


def _swap_in(new: Path, path: Path) -> None:
    """Replace the folder `path` by `new`; if that fails, the old folder is put back."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_capped(path: Path, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole user file, refusing sizes no embedding has before reading them."""
    from .errors import FormatError, NotFoundError

    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise FormatError(
            f"{path} is {size / 2**20:.1f} MiB; an embedding is normally a few KB.",
            f"If this really is an embedding, pass --max-size {size // 2**20 + 1} (MiB).",
        )
    return path.read_bytes()
