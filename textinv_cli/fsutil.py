"""The file system doors for reading user files: bounded reads that never leave the place they
were asked to read (writes: writes.py).

Every read of a user's file goes through open_regular() (regular files only: no FIFO,
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
import stat
from pathlib import Path

from .errors import FormatError, NotFoundError, TextinvError

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


# -- kernel file systems -----------------------------------------------------------------

def on_special_fs(path) -> bool:
    """True for a path in /proc or /sys (after resolving links)."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + "/") for r in _SPECIAL_ROOTS)


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


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file (one pread may return less)."""
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, min(size - got, 1 << 26), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


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
