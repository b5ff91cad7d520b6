"""Every file textinv writes: atomic writes that never remove what textinv did not write.

Temp file (or folder) in the same folder, fsync, rename. A crash at any moment leaves either
the old file or the new one, never half of one. `--force` replaces a file, or a folder
holding nothing but the members textinv would write there; anything else is refused. Output
targets are checked before anything is written (check_writable_target, check_new_folder):
never under /proc or /sys, never through a file where a folder should be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import OutputExistsError, TextinvError
from .fsutil import on_special_fs
from .untrusted import shown

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


def _lstat(path: Path) -> os.stat_result | None:
    """lstat, None when nothing is there; a path the OS cannot even look up is a clear error."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES on a parent...
        raise TextinvError(f"{path} cannot be used: {e.strerror}.", "Pick another output path.") from None


def foreign_members(path: Path, members) -> list[str]:
    """What in the folder `path` is not one of `members` as a regular file: what --force
    would destroy if it replaced the folder (sorted, first 5). A link counts as foreign."""
    found = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name not in members or not entry.is_file(follow_symlinks=False):
                found.append(entry.name)
    return sorted(found)[:5]


def check_writable_target(path: Path, force: bool, *, members=None) -> None:
    """Refuse before any work is done. `members`: the target is a folder textinv writes with
    these files; None: a single file.

    A target that exists needs --force, and even then is replaced only when it is what would
    be written: a file (not a folder) for a file, a folder holding only `members` for a folder.
    """
    path = Path(path)
    st = _lstat(path)
    if st is not None:
        if members is None and os.path.isdir(path):
            raise OutputExistsError(f"{path} is a folder; a single file is written here, and --force never "
                                    "replaces a folder with one.", "Pass -o with a file name.")
        if members is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise OutputExistsError(f"{path} is not a folder; a folder is written here.",
                                        "Pass -o with a folder name.")
            others = foreign_members(path, set(members))
            if others:
                raise OutputExistsError(
                    f"{path} holds other files than an embedding folder textinv wrote "
                    f"({', '.join(shown(n, 40) for n in others)}); "
                    "--force only replaces such a folder.",
                    "Pass -o with a new folder name, or empty the folder first.")
        if not force:
            raise OutputExistsError(f"{path} already exists.", "Pass --force to overwrite it, or -o to write elsewhere.")
    parent = path.parent
    if not os.path.isdir(parent):
        if os.path.lexists(parent):  # `-o afile/x.safetensors`: the "folder" is a file
            raise TextinvError(f"{parent} is a file, not a folder, so nothing can be written under it.",
                               "Pick another -o.")
        raise TextinvError(f"The folder {parent} does not exist.", "Create it first or pick another -o.")
    if on_special_fs(parent):
        raise TextinvError(f"{parent} is on a kernel file system (/proc, /sys); nothing can be written there.",
                           "Pick another -o.")


def check_new_folder(path: Path, what: str, hint: str) -> None:
    """A folder `what` is to be created at `path` (with its parents): refuse, before any work,
    what would fail halfway -- a file where a folder is needed (`out` itself or a parent:
    `tiny-model afile/x`), a kernel file system, a place that is not writable -- in words.
    An existing folder is left to the caller (empty or not is its own rule)."""
    path = Path(os.path.abspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"{path} is a file; {what} is a folder.", hint)
    parent = path
    try:
        while not os.path.lexists(parent):
            parent = parent.parent
    except (OSError, ValueError) as e:
        raise TextinvError(f"{path} cannot be used for {what}: {getattr(e, 'strerror', None) or e}.", hint) from None
    if on_special_fs(parent):
        raise TextinvError(f"{path} is on a kernel file system (/proc, /sys); nothing can be written there.", hint)
    if not os.path.isdir(parent):
        raise TextinvError(f"{parent} is a file, so {what} cannot be created under it at {path}.", hint)
    if parent != path and not os.access(parent, os.W_OK | os.X_OK):
        raise TextinvError(f"Cannot create {what} at {path}: {parent} is not writable.", hint)


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
    with atomic_stream(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_stream(path: Path):
    """A binary file whose contents replace `path` when the block ends without an error (temp
    in the same folder, fsync, rename), for files too large to hold in memory (a converted
    model); on any error the temp is removed and `path` is untouched. The caller decides
    beforehand whether `path` may be replaced (check_writable_target)."""
    path = Path(path)
    with errors_name(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _as_if_created(fd, 0o666)
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


def atomic_write_dir(path: Path, files: dict[str, bytes], *, force: bool = False) -> None:
    """Write a folder of files: build it beside the target, then rename into place.

    With --force over an existing folder, that folder may hold only the names in `files`
    (checked before the work, and again right before the swap); the old copy is then
    dismantled member by member, so even a file that appears meanwhile is never removed.
    """
    path = Path(path)
    check_writable_target(path, force, members=files)
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
            if _lstat(path) is not None:  # --force: move the old one aside, then drop it once the new one is in
                check_writable_target(path, force, members=files)
                _swap_in(tmp, path, files)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_dir(path.parent)


def _swap_in(new: Path, path: Path, members) -> None:
    """Replace the folder `path` by `new`; if that fails, the old folder is put back.

    The old folder is removed by unlinking its known members and rmdir: whatever else is in
    it (put there after our check) stays, in `.NAME.old-PID` beside the new folder.
    """
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    for name in members:
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(old / name).st_mode):
                os.unlink(old / name)
    with contextlib.suppress(OSError):
        os.rmdir(old)
