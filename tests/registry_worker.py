"""A separate process that writes to the registry, for the concurrency and crash tests.

    python tests/registry_worker.py [--barrier DIR --id ID] add PREFIX SEED COUNT [--family F]
    python tests/registry_worker.py [--barrier DIR --id ID] churn TOKEN SEED COUNT [--remove]
    python tests/registry_worker.py [--barrier DIR --id ID] remove NAME
    python tests/registry_worker.py [--barrier DIR --id ID] cli ARGS...

The registry is the one $TEXTINV_HOME names. With --barrier, the worker announces itself
(DIR/ready-ID) and then waits for DIR/go, so the test can release all workers at the same
moment after their (slow) imports are done. Results are JSON lines on stdout. The crash
tests set TEXTINV_REGISTRY_CRASH_AT to have the registry SIGKILL this process mid-write.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path



def run_together(jobs: list[list[str]], barrier: Path, *, env: dict | None = None,
                 timeout: float = 60) -> list[tuple[int, str, str]]:
    """Start one worker per job, release them at once, return (returncode, stdout, stderr) each."""
    import os
    import subprocess

    barrier.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--barrier", str(barrier),
                               "--id", str(i), *job], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})})
             for i, job in enumerate(jobs)]
    try:
        deadline = time.monotonic() + timeout
        while not all((barrier / f"ready-{i}").exists() for i in range(len(jobs))):
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError("a worker never reached the barrier: "
                                   + " | ".join(p.communicate()[1] for p in dead))
            time.sleep(0.005)
        (barrier / "go").write_text("")
        results = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def rows_without_blob(reg) -> list[str]:
    """Rows whose blob is missing, checked while holding the write lock: the registry only
    adds rows and deletes blobs under that lock, so a violation seen here is real."""
    import sqlite3

    conn = sqlite3.connect(reg.db_path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("SELECT name, sha256 FROM embeddings").fetchall()
        bad = [name for name, sha in rows if not reg.blob_path(sha).is_file()]
        conn.execute("COMMIT")
        return bad
    finally:
        conn.close()


def _wait_for_go(barrier: Path, ident: str) -> None:
    (barrier / f"ready-{ident}").write_text("")
    deadline = time.monotonic() + 60
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("barrier: no go signal")
        time.sleep(0.001)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--barrier", type=Path)
    p.add_argument("--id", default="0")
    p.add_argument("mode", choices=["add", "churn", "remove", "cli"])
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)

    # Every import happens before the barrier, so released workers really collide.
    from tests.helpers import random_embedding

    from textinv_cli.errors import NotFoundError
    from textinv_cli.registry import Registry

    if ns.mode == "cli":
        from textinv_cli.app import main as cli_main
    if ns.barrier:
        _wait_for_go(ns.barrier, ns.id)

    reg = Registry()
    if ns.mode == "add":
        prefix, seed, count, *rest = ns.args
        family = rest[rest.index("--family") + 1] if "--family" in rest else "sd1"
        for i in range(int(count)):
            emb = random_embedding(f"<{prefix}-{i}>", family, seed=int(seed) + i)
            entry, created = reg.add(emb, source="imported", origin={"worker": ns.id})
            print(json.dumps({"name": entry.name, "created": created}), flush=True)
    elif ns.mode == "churn":
        # The same content over and over, optionally removed again each time: races an
        # `add` in one process against an `rm` in another.
        token, seed, count, *rest = ns.args
        emb = random_embedding(token, seed=int(seed))
        blobless = []
        for _ in range(int(count)):
            entry, created = reg.add(emb, source="imported", origin={"worker": ns.id})
            blobless += rows_without_blob(reg)
            if "--remove" in rest:
                try:
                    reg.remove(entry.name)
                except NotFoundError:
                    pass  # the other worker removed it first
                blobless += rows_without_blob(reg)
        print(json.dumps({"blobless": blobless}), flush=True)
    elif ns.mode == "remove":
        entry = reg.remove(ns.args[0])
        print(json.dumps({"removed": entry.name}), flush=True)
    else:
        try:
            cli_main(ns.args)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.helpers
    sys.exit(main(sys.argv[1:]))
