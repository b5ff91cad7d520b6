"""A separate process that writes to the registry, for the concurrency and crash tests.

    python tests/support/registry_worker.py [--barrier DIR --id ID] add PREFIX SEED COUNT [--family F]
    python tests/support/registry_worker.py [--barrier DIR --id ID] churn TOKEN SEED COUNT [--remove]
    python tests/support/registry_worker.py [--barrier DIR --id ID] remove NAME
    python tests/support/registry_worker.py [--barrier DIR --id ID] cli ARGS...
    python tests/support/registry_worker.py [--barrier DIR --id ID] cli-loop SCRIPT.json

The registry is the one $TEXTINV_HOME names. With --barrier, the worker announces itself
(DIR/ready-ID) and then waits for DIR/go, so the test can release all workers at the same
moment after their (slow) imports are done. Results are JSON lines on stdout. The crash
tests set TEXTINV_REGISTRY_CRASH_AT to have the registry SIGKILL this process mid-write.

cli-loop runs each command line of SCRIPT.json (a list of argv lists, e.g. ["import", F,
"--json"]) through the real `textinv` CLI in this one process (a fresh process per command
would cost more than the command), printing {"rc", "out"} per command; stderr is the CLI's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path



def start_together(jobs: list[list[str]], barrier: Path, *, env: dict | None = None,
                   timeout: float = 60) -> list:
    """Start one worker per job and release them at once; the running Popen objects.
    The caller must see that they end (communicate, or kill and wait)."""
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
    except BaseException:
        _kill_all(procs)
        raise
    (barrier / "go").write_text("")
    return procs


def run_together(jobs: list[list[str]], barrier: Path, *, env: dict | None = None,
                 timeout: float = 60) -> list[tuple[int, str, str]]:
    """Start one worker per job, release them at once, return (returncode, stdout, stderr) each."""
    deadline = time.monotonic() + timeout
    procs = start_together(jobs, barrier, env=env, timeout=timeout)
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
        return results
    finally:
        _kill_all(procs)


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()  # reap it and close its pipes


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


def assert_consistent(root: Path) -> list[tuple]:
    """What must hold after anything, crashes included: a sound database, every row's blob
    present and hashing to the row's sha256. Returns the (name, sha256) rows."""
    import hashlib
    import sqlite3

    from textinv_cli.registry.store import Registry

    if not (root / "registry.db").exists():  # killed before the first row: still no registry
        return []
    with contextlib.closing(sqlite3.connect(root / "registry.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # killed while creating it
            return []  # (the registry reads this as empty too)
        rows = conn.execute("SELECT name, sha256 FROM embeddings ORDER BY name").fetchall()
    reg = Registry(root)
    for name, sha in rows:
        blob = reg.blob_path(sha)
        assert blob.is_file(), f"row {name} has no blob"
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha, f"row {name}: blob does not match"
        reg.load(name)
    return rows


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
    p.add_argument("mode", choices=["add", "churn", "remove", "cli", "cli-loop"])
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)

    # Every import happens before the barrier, so released workers really collide.
    from tests.support.helpers import random_embedding

    from textinv_cli.errors import NotFoundError
    from textinv_cli.registry.store import Registry

    if ns.mode == "cli":
        from textinv_cli.cli.app import main as cli_main
    if ns.mode == "cli-loop":
        script = json.loads(Path(ns.args[0]).read_text())
        command = cli_command()
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
    elif ns.mode == "cli-loop":
        for argv in script:
            rc, out = run_cli(command, argv)
            print(json.dumps({"rc": rc, "out": out}), flush=True)
    else:
        try:
            cli_main(ns.args)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
    return 0


def cli_command():
    """The `textinv` click command, built once (building it is most of a short command's cost)."""
    import typer.main

    from textinv_cli.cli.app import app

    return typer.main.get_command(app)


def run_cli(command, argv: list[str]) -> tuple[int, str]:
    """One `textinv ARGV` as main() runs it (error mapping included); (exit code, stdout)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            command.main(argv, prog_name="textinv")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.support.helpers
    sys.exit(main(sys.argv[1:]))
