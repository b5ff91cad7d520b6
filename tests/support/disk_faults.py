"""Make a folder read-only or full, for the disk-fault tests.

The real thing is used where this machine allows it: a folder chmod'ed 0o500 refuses writes,
except to root (the tests often run as root), so `read_only` checks whether a probe write is
refused and otherwise injects the error the kernel would give. A full disk is always injected:
writes under the folder fail with ENOSPC once a byte budget is spent, after really writing the
bytes that fit, so a half-written file exists on disk until the code under test cleans it up.

What is patched: the Python-level doors to the file system (open/io.open, os.open, os.fdopen,
os.write, os.mkdir, os.rename/replace, os.link/symlink, and os.access, which a read-only folder
answers "no"), only for paths under the folder.
Writes done in C (SQLite, safetensors' Rust writer, torch.save to a path) go through none of
them: a test that needs those covered must use a real read-only or full file system.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import stat
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path, root: str) -> bool:
    if isinstance(path, int) or path is None:
        return False
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class Disk:
    """Faults for one folder; installed with monkeypatch, so undone after the test."""

    def __init__(self, monkeypatch, root: Path):
        self.mp, self.root = monkeypatch, os.path.realpath(root)
        self.refuse: int | None = None     # errno for any write (read-only / forbidden)
        self.budget: int | None = None     # bytes that still fit (full disk)
        self.hits = 0                      # faults raised: a test can check it was exercised

    # -- the two faults ---------------------------------------------------------------
    def read_only(self, code: int = errno.EACCES) -> Disk:
        """Writes under the folder are refused: chmod 0o500 where that stops this process
        (not root), else the error injected (EACCES, as chmod gives; EROFS for a read-only mount)."""
        if code == errno.EACCES and _chmod_refuses(Path(self.root)):
            self._mode = stat.S_IMODE(os.stat(self.root).st_mode)
            os.chmod(self.root, 0o500)
            return self
        self.refuse = code
        return self._install()

    def full(self, budget: int = 0) -> Disk:
        """Writes under the folder fail with ENOSPC once `budget` bytes in all are written."""
        self.budget = budget
        return self._install()

    def undo(self) -> None:
        """The disk works again (the patches pass everything through until monkeypatch removes them)."""
        self.refuse = self.budget = None
        if getattr(self, "_mode", None) is not None:
            os.chmod(self.root, self._mode)
            self._mode = None

    # -- plumbing --------------------------------------------------------------------------
    def _error(self, code: int, path=None) -> OSError:
        self.hits += 1
        return OSError(code, os.strerror(code), *([os.fsdecode(path)] if path is not None else []))

    def _take(self, n: int) -> int:
        if self.budget is None:
            return n
        fits = min(n, self.budget)
        self.budget -= fits
        return fits

    def _install(self) -> Disk:
        real_open, real_os_open, real_fdopen, real_write = builtins.open, os.open, os.fdopen, os.write
        real_access = os.access
        disk = self

        def guarded_open(file, mode="r", *args, **kwargs):
            if _writing(mode) and _under(file, disk.root):
                if disk.refuse is not None:
                    raise disk._error(disk.refuse, file)
                return _Budgeted(real_open(file, mode, *args, **kwargs), disk)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS and disk.refuse is not None and _under(path, disk.root):
                raise disk._error(disk.refuse, path)
            return real_os_open(path, flags, *args, **kwargs)

        def guarded_fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            return _Budgeted(f, disk) if _writing(mode) and _under(_fd_path(fd), disk.root) else f

        def guarded_write(fd, data):
            if _under(_fd_path(fd), disk.root):
                fits = disk._take(len(data))
                if fits < len(data):
                    if fits:
                        real_write(fd, data[:fits])
                    raise disk._error(errno.ENOSPC)
            return real_write(fd, data)

        def guarded_access(path, mode, *args, **kwargs):
            # what a read-only or chmod'ed folder answers, so "is it writable?" checks see it too
            if disk.refuse is not None and mode & os.W_OK and _under(path, disk.root):
                return False
            return real_access(path, mode, *args, **kwargs)

        def refusing(name):
            real = getattr(os, name)

            def guarded(*paths, **kwargs):
                if disk.refuse is not None:
                    for p in paths[:2]:
                        if _under(p, disk.root) or _under(os.path.dirname(os.fsdecode(p)), disk.root):
                            raise disk._error(disk.refuse, p)
                return real(*paths, **kwargs)

            return guarded

        for target in (builtins, io):
            self.mp.setattr(target, "open", guarded_open)
        self.mp.setattr(os, "open", guarded_os_open)
        self.mp.setattr(os, "fdopen", guarded_fdopen)
        self.mp.setattr(os, "write", guarded_write)
        self.mp.setattr(os, "access", guarded_access)
        for name in ("mkdir", "rename", "replace", "link", "symlink"):
            self.mp.setattr(os, name, refusing(name))
        return self


class _Budgeted:
    """A file opened for writing on the faulty disk: writes what fits, then ENOSPC."""

    def __init__(self, f, disk: Disk):
        self._f, self._disk = f, disk

    def write(self, data):
        fits = self._disk._take(len(data))
        if fits < len(data):
            if fits:
                self._f.write(data[:fits])
            self._f.flush()
            raise self._disk._error(errno.ENOSPC)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _chmod_refuses(folder: Path) -> bool:
    """Does a 0o500 folder refuse this process's writes? (Not for root.)"""
    probe = folder / ".chmod-probe"
    probe.mkdir()
    mode = os.stat(probe).st_mode
    try:
        os.chmod(probe, 0o500)
        try:
            (probe / "x").write_bytes(b"")
        except PermissionError:
            return True
        os.unlink(probe / "x")
        return False
    finally:
        os.chmod(probe, stat.S_IMODE(mode))
        os.rmdir(probe)
