"""The file system doors for user files: atomic writes that never remove what textinv did not
write, and reads that are bounded and never leave the place they were asked to read.

Writes: temp file (or folder) in the same folder, fsync, rename. A crash at any moment leaves
either the old file or the new one, never half of one. `--force` replaces a file, or a folder
holding nothing but the members textinv would write there; anything else is refused.

Reads: every read of a user's file goes through open_regular() (regular files only: no FIFO,
device, socket, folder or procfs/sysfs file; a folder's member never a link leaving it) and
read_capped() (bounded by the bytes actually read, never by st_size, which procfs reports as 0).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import FormatError, NotFoundError, OutputExistsError, TextinvError
from .untrusted import shown

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a TI file is KBs; refuse anything this large unless asked
MAX_SIZE_LIMIT_MIB = 2**40  # --max-size beyond this (an exbibyte) is a typo, or 1e308/inf
_READ_CHUNK = 1 << 20
_MAX_READ = 64 << 20  # one os.read at most (a sparse file's st_size can be 2**62)
# Kernel file systems: their files are "regular" with st_size 0 and hold the process's
# environment, memory maps, secrets. Never an embedding, never a place to write one.
_SPECIAL_ROOTS = ("/proc", "/sys")


# -- --max-size (its typer callback: cli/options.py) ------------------------------------------

def max_bytes_from_mib(mib: float | None) -> int:
    """The byte cap for `--max-size MIB` (None: the default). The one check of that option:
    nan, inf, 0, negatives and absurd sizes (1e308 MiB is inf bytes) are refused here."""
    if mib is None:
        return DEFAULT_MAX_BYTES
    if not isinstance(mib, (int, float)) or not math.isfinite(mib) or not 0 < mib <= MAX_SIZE_LIMIT_MIB:
        raise TextinvError(f"--max-size must be a number of MiB above 0 and at most {MAX_SIZE_LIMIT_MIB}, not {mib}.",
                           "Pass e.g. --max-size 200 to accept files up to 200 MiB.")
    return max(1, int(mib * 2**20))


# -- writing ---------------------------------------------------------------------------------

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


def on_special_fs(path) -> bool:
    """True for a path in /proc or /sys (after resolving links)."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + "/") for r in _SPECIAL_ROOTS)


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


# -- reading ---------------------------------------------------------------------------------

def _is_member(folder: Path, real: str) -> bool:
    """Whether the resolved path `real` is a file of `folder`: directly in it, or (the one
    layout whose members are links by design) in huggingface_hub's cache, where
    <repo>/snapshots/<commit id>/NAME links to <repo>/blobs/<hash>: then it must be in that
    repo's own blobs folder (a real folder, not a link), or in the cache-wide store of Xet
    files that current clients link those blobs on to (<cache>/blobs/<2 hex>/<64 hex>, a
    real folder marked .huggingface-shared-blobs: huggingface_hub.utils._shared_blobs),
    never anywhere else."""
    home = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if parent == home:
        return True
    parts = Path(home).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            blobs = os.path.join(*parts[:i], "blobs")
            if parent == blobs:
                return os.path.isdir(blobs) and not os.path.islink(blobs)
            return i >= 2 and _in_shared_store(os.path.join(*parts[:i - 1]), real)
    return False


def _in_shared_store(cache: str, real: str) -> bool:
    """`real` is <cache>/blobs/XX/HASH in huggingface_hub's shared Xet store (XX: HASH[:2])."""
    store = os.path.join(cache, "blobs")
    name = os.path.basename(real)
    return (re.fullmatch(r"[0-9a-f]{64}", name) is not None
            and os.path.dirname(real) == os.path.join(store, name[:2])
            and os.path.isdir(store) and not os.path.islink(store)
            and not os.path.islink(os.path.dirname(real))
            and os.path.isfile(os.path.join(store, ".huggingface-shared-blobs")))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@functools.lru_cache(maxsize=1)  # two stats per file opened otherwise; mounts do not move mid-run
def _special_devices() -> frozenset[int]:
    devs = set()
    for root in _SPECIAL_ROOTS:
        with contextlib.suppress(OSError):
            devs.add(os.stat(root).st_dev)
    return frozenset(devs)


def _refuse(path: Path, what: str) -> FormatError:
    return FormatError(f"{path} is {what}; textinv reads embeddings from regular files only.",
                       "Give the embedding file itself (a copy, not a link to a device or a system file).")


def open_regular(path: Path, *, within: Path | None = None) -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file opened for reading: the one rule for opening a user file.

    Refused: FIFOs, devices, sockets, folders (checked before opening, so opening cannot hang
    or act on a device, and again on the opened fd), files on /proc or /sys. `within`: the file
    is a member of that folder and must really be in it (a link is followed only when its
    target is a file directly in the folder; the resolved name is opened without following).
    """
    path = Path(path)
    try:
        real = os.path.realpath(path)
    except ValueError as e:  # a NUL in the name
        raise FormatError(f"{path} cannot be read: {e}.") from None
    if within is not None and not _is_member(within, real):
        raise FormatError(f"{path} is a link to a file outside {within}; textinv reads only a folder's own files.",
                          "Copy the file into the folder instead of linking to it.")
    if on_special_fs(real):
        raise _refuse(path, "a file of a kernel file system (/proc, /sys)")
    target = real if within is not None else path
    try:
        st = os.stat(target)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, _kind(st.st_mode))
        flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                 | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        if within is not None:
            flags |= getattr(os, "O_NOFOLLOW", 0)  # swapped for a link since we resolved it: refused
        fd = os.open(target, flags)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        raise NotFoundError(f"{path} does not exist.") from None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO, errno.EISDIR):
            raise  # a permission or disk problem: app.report says what and where
        raise FormatError(f"{path} cannot be read: {e.strerror}.") from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise _refuse(path, _kind(fst.st_mode) if not stat.S_ISREG(fst.st_mode) else "a file that changed while read")
        if fst.st_dev in _special_devices():
            raise _refuse(path, "a file of a kernel file system (/proc, /sys)")
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


def read_capped(path: Path, max_bytes: int | None = DEFAULT_MAX_BYTES, *, within: Path | None = None) -> bytes:
    """Read a whole user file of at most `max_bytes` (None: no cap), through open_regular.

    The cap holds for the bytes actually read (at most max_bytes + 1 are), whatever st_size
    says; a file stat already shows too large is refused without reading it.
    """
    path = Path(path)
    fd, st = open_regular(path, within=within)
    try:
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(path, st.st_size, max_bytes)
        data = _read_upto(fd, st, None if max_bytes is None else max_bytes + 1)
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(path, None, max_bytes)
    return data


def read_head(path: Path, n: int, *, within: Path | None = None) -> bytes:
    """At most the first `n` bytes of a user file, through open_regular (a caller that wants
    at most k bytes asks for k + 1 and refuses a longer answer)."""
    fd, st = open_regular(Path(path), within=within)
    try:
        return _read_upto(fd, st, n)
    finally:
        os.close(fd)


def _read_upto(fd: int, st: os.stat_result, want: int | None) -> bytes:
    """Up to `want` bytes (None: to the end). One read when st_size is right; never trusts it."""
    chunks, total, ask = [], 0, st.st_size + 1
    while want is None or total < want:
        n = min(ask, _MAX_READ) if want is None else min(ask, _MAX_READ, want - total)
        chunk = os.read(fd, n)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        ask = _READ_CHUNK
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(path: Path, size: int | None, max_bytes: int) -> FormatError:
    if size is None:  # grew while read, or a file whose size the kernel does not report
        return FormatError(f"{path} is larger than {max_bytes / 2**20:.1f} MiB; an embedding is normally a few KB.",
                           "If this really is an embedding, pass a larger --max-size (MiB).")
    return FormatError(
        f"{path} is {size / 2**20:.1f} MiB; an embedding is normally a few KB.",
        f"If this really is an embedding, pass --max-size {size // 2**20 + 1} (MiB).")


def hash_file(path: Path, h=None, *, within: Path | None = None):
    """Feed a user file into the hash `h` (default a new sha256) and return it: through
    open_regular, so a hash never reads a device, a FIFO or a link leaving `within`."""
    h = hashlib.sha256() if h is None else h
    fd, _ = open_regular(path, within=within)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h


def folder_member(folder: Path, name: str) -> Path | None:
    """folder/name when it is a regular file in the folder, None when nothing is there.

    A member that is a link is accepted only when it leads to a regular file directly in the
    same folder (what the folder's own tools make); a link leaving the folder (to a token
    file, /proc/self/environ, /dev/zero), a dangling link, a FIFO, a device or a subfolder is
    refused: it is never silently skipped, so what the folder holds is never misread.
    """
    path = Path(folder) / name
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(path)
        if not _is_member(folder, real):
            raise FormatError(f"{path} is a link to a file outside {folder}; textinv reads only a folder's own files.",
                              "Copy the file into the folder instead of linking to it.")
        try:
            st = os.stat(real)
        except OSError:
            raise FormatError(f"{path} is a link to a file that does not exist.") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, _kind(st.st_mode))
    return path
