"""Data-parallel processes on this machine, for every backend: which rank this process is,
and `textinv train --num-processes N`'s launcher and supervisor (what torchrun does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def process_rank() -> int:
    """This process's rank among those a launcher started (torch's RANK, JAX's JAX_PROCESS_ID), 0 alone."""
    try:
        return int(os.environ.get("RANK") or os.environ.get("JAX_PROCESS_ID") or "0")
    except ValueError:
        return 0


def launched_world() -> int:
    """How many processes a launcher started (WORLD_SIZE), 1 when not launched."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# After rank 0 ends, the others get KILL_GRACE_MAIN seconds to end too; after another process
# fails, rank 0 gets KILL_GRACE_OTHER (it may be finishing a checkpoint, or be stuck waiting
# for the dead one). Then SIGTERM, and SIGKILL 5 s later.
KILL_GRACE_MAIN = 10.0
KILL_GRACE_OTHER = 30.0


def launch_processes(args: list[str], n: int, *, program: list[str] | None = None) -> int:
    """Run `python -m textinv_cli ARGS` (or PROGRAM ARGS) as n data-parallel processes on this
    machine; return rank 0's exit code (130 when interrupted).

    Each child gets what torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the backend reads those, not this launcher.
    Rank 0 writes to our stdout/stderr as it goes (its progress bar included); the others
    print nothing, and their stderr is shown only when one of them fails first.

    The children run in their own session and we forward SIGINT/SIGTERM, so one Ctrl-C
    reaches each of them exactly once. A process that fails makes us stop the others (after
    a grace period, so rank 0 can finish a checkpoint), as torchrun does; otherwise a rank
    could wait forever for a peer that is gone.
    """
    import socket
    import tempfile

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n),
                LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", NODE_RANK="0")
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # n processes share the cores
    cmd = [*(program or [sys.executable, "-m", "textinv_cli"]), *args]
    procs: list[subprocess.Popen] = []
    logs: list = [None]
    copiers: list[threading.Thread] = []
    preexec = _parent_death_signal()
    try:
        for rank in range(n):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            if rank == 0:
                (out, out_copy), (err, err_copy) = _sink(sys.stdout), _sink(sys.stderr)
            else:
                logs.append(tempfile.TemporaryFile())
                out, err, out_copy, err_copy = subprocess.DEVNULL, logs[-1], None, None
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True,
                                 preexec_fn=preexec)
            procs.append(p)
            for pipe, stream in ((p.stdout, out_copy), (p.stderr, err_copy)):
                if stream is not None:
                    copiers.append(threading.Thread(target=_copy, args=(pipe, stream), daemon=True))
                    copiers[-1].start()
        codes, first_failed, killed = _supervise(procs)
    finally:
        for p in procs:  # still running only if we leave by an exception of our own
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in copiers:
            t.join(timeout=5)
    if first_failed not in (None, 0) and codes[first_failed] != 130:
        from ..cli.console import err_console  # the failed rank's stderr, escaped like all output

        log = logs[first_failed]
        log.seek(0)
        tail = log.read()[-4000:].decode("utf-8", "replace").rstrip()
        err_console.print(f"Process {first_failed} of {n} failed (exit code {codes[first_failed]}):", markup=False)
        for line in tail.splitlines():  # one print per line: the console escapes a newline inside one
            err_console.print(line, markup=False, highlight=False)
    for log in logs[1:]:
        log.close()
    if 0 in killed and first_failed not in (None, 0):
        return codes[first_failed] if codes[first_failed] > 0 else 1
    return codes[0] if codes[0] >= 0 else 128 - codes[0]


def _supervise(procs: list[subprocess.Popen]) -> tuple[list[int], int | None, set[int]]:
    """Wait for every process, forwarding Ctrl-C; stop the rest when one ends badly.
    Returns (exit codes, the first rank that failed, the ranks we had to stop)."""
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    first_failed, deadline, term_at, killed = None, None, None, set()
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes, first_failed, killed
            now = time.monotonic()
            if first_failed is None:
                first_failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if deadline is None:
                if codes[0] is not None:
                    deadline = now + KILL_GRACE_MAIN
                elif first_failed is not None:
                    deadline = now + KILL_GRACE_OTHER
            if deadline is not None and now > deadline:
                term_at = now if term_at is None else term_at
                sig = signal.SIGTERM if now < term_at + 5 else signal.SIGKILL
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        killed.add(rank)
                        p.send_signal(sig)
                deadline = now + 1  # re-send once a second until they are gone
            time.sleep(0.05)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _sink(stream):
    """Where a child's output goes: our own file descriptor when the stream has one (the
    child then sees the terminal itself), else a pipe that a thread copies into `stream`."""
    try:
        fd = stream.fileno()
        stream.flush()
        return fd, None
    except (AttributeError, OSError, ValueError):
        return subprocess.PIPE, stream


def _copy(pipe, stream) -> None:
    for line in iter(pipe.readline, b""):
        try:
            stream.write(line.decode("utf-8", "replace"))
            stream.flush()
        except (OSError, ValueError):
            pass
    pipe.close()


def _parent_death_signal():
    """A preexec_fn (Linux) that gives the child SIGTERM when the launcher dies, even by SIGKILL.
    libc is loaded here, in the parent: between fork and exec the child must not import."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except Exception:  # noqa: BLE001 - not Linux: the children outlive a killed launcher, as under torchrun
        return None

    def preexec():
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec
