"""The registry under load and under kill -9, through the real `textinv import` / `rm` code
(tests/support/registry_worker.py cli-loop: one process runs many commands, as many users' scripts do)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.support.helpers import random_embedding
from tests.support.registry_worker import assert_consistent, cli_command, run_cli, run_together, start_together
from textinv_cli.errors import NotFoundError
from textinv_cli.formats import read_embedding, write_embedding
from textinv_cli.registry.store import Registry

FORMATS = (("safetensors", ".safetensors"), ("a1111", ".pt"), ("kohya", ".safetensors"))  # kohya last


def _files(folder: Path, names: list[str], *, seed0: int, fmt_offset: int = 0) -> dict[str, tuple[Path, str]]:
    """One embedding file per name (formats rotate; SDXL ones are kohya, the one of these
    formats that holds SDXL); {name: (path, content sha256)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(names):
        family = "sdxl" if i % 7 == 3 else "sd1"  # content depends on the name only, never the format
        fmt, ext = FORMATS[2 if family == "sdxl" else (i + fmt_offset) % len(FORMATS)]
        emb = random_embedding(f"<{name}>", family, seed=seed0 + i)
        path = folder / f"{name}{ext}"
        write_embedding(emb, path, fmt)
        out[name] = (path, emb.content_sha256())
    return out


def _script(folder: Path, commands: list[list[str]]) -> list[str]:
    """A cli-loop job running these `textinv` command lines."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"script-{len(list(folder.iterdir()))}.json"
    path.write_text(json.dumps(commands))
    return ["cli-loop", str(path)]


def _imports(files: dict[str, tuple[Path, str]]) -> list[list[str]]:
    # --token: kohya files carry none (the file name would be used), and identical vectors
    # in two formats must be identical content
    return [["import", str(path), "--token", f"<{name}>", "--json"] for name, (path, _) in files.items()]


def _results(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _clean(results) -> list[list[dict]]:
    """Every worker exited 0 with nothing on stderr (no "database is locked", no traceback)."""
    for rc, _, err in results:
        assert rc == 0 and err == "", err
    return [_results(out) for _, out, _ in results]


def _blob_names(home: Path) -> set[str]:
    blobs = home / "blobs"
    return {p.name for p in blobs.iterdir()} if blobs.exists() else set()


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A folder on tmpfs where there is one, else tmp_path: the tests' own files are not
    what they test, and writing hundreds of them (fsync) on a busy CI disk is slow."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 256 * 2**20):
        yield tmp_path
        return
    fast = Path(tempfile.mkdtemp(prefix="textinv-load-", dir=shm))
    yield fast
    shutil.rmtree(fast, ignore_errors=True)


@pytest.fixture
def work(scratch, textinv_home, monkeypatch) -> Path:
    """scratch, with the registry (TEXTINV_HOME) in it too: the load tests are about the
    locking protocol, not the disk, and a busy disk would slow them and make them vary."""
    monkeypatch.setenv("TEXTINV_HOME", str(scratch / "home"))
    return scratch


def test_four_processes_import_200_each(work):
    home = work / "home"
    files = [_files(work / f"in{w}", [f"w{w}-{i}" for i in range(200)], seed0=1000 * w, fmt_offset=w)
             for w in range(4)]
    jobs = [_script(work / "scripts", _imports(f)) for f in files]
    outputs = _clean(run_together(jobs, work / "barrier", timeout=240))

    for worker, out in zip(files, outputs):
        assert len(out) == 200 and all(r["rc"] == 0 for r in out)
        docs = [json.loads(r["out"]) for r in out]
        assert all(d["created"] for d in docs)
        assert [d["entry"]["name"] for d in docs] == list(worker)
    expected = {name: sha for worker in files for name, (_, sha) in worker.items()}
    assert dict(assert_consistent(home)) == expected  # all 800, each with its own content
    # a run without crashes leaves no debris: exactly one blob per entry, no temp files
    assert _blob_names(home) == {f"{sha}.safetensors" for sha in expected.values()}


def test_identical_imports_and_removals_at_once(work):
    home = work / "home"
    doomed = [f"old-{i}" for i in range(60)]
    for i, name in enumerate(doomed):
        Registry().add(random_embedding(f"<{name}>", seed=5000 + i), source="imported", origin={})

    names = [f"same-{i}" for i in range(80)]
    same_a = _files(work / "a", names, seed0=7000)  # the same content twice, in other formats
    same_b = _files(work / "b", names, seed0=7000, fmt_offset=1)
    churn = _files(work / "churn", [f"churn-{i}" for i in range(40)], seed0=9000)
    churn_cmds = []
    for i, cmd in enumerate(_imports(churn)):
        churn_cmds.append(cmd)
        if i % 2:  # every other one is removed again at once, while the others import
            churn_cmds.append(["rm", f"churn-{i}", "--json"])
    jobs = [_script(work / "scripts", _imports(same_a)),
            _script(work / "scripts", _imports(same_b)),
            _script(work / "scripts", [["rm", name, "--json"] for name in doomed]),
            _script(work / "scripts", churn_cmds)]
    a, b, removed, churned = _clean(run_together(jobs, work / "barrier", timeout=240))

    assert all(r["rc"] == 0 for r in a + b + removed + churned)
    created = [[json.loads(r["out"])["created"] for r in out] for out in (a, b)]
    assert [x + y for x, y in zip(*created)] == [1] * 80  # each content registered exactly once
    assert [json.loads(r["out"])["removed"]["name"] for r in removed] == list(doomed)

    expected = {name: sha for name, (_, sha) in same_a.items()}
    expected.update({name: sha for i, (name, (_, sha)) in enumerate(churn.items()) if i % 2 == 0})
    assert dict(assert_consistent(home)) == expected
    assert _blob_names(home) == {f"{sha}.safetensors" for sha in expected.values()}


def _kill_after(proc, commands: int, delay_s: float) -> None:
    """SIGKILL `proc` `delay_s` after it reports its `commands`-th command (one stdout line
    each), then drain its stdout so it never blocks on a full pipe."""
    for done, _ in enumerate(proc.stdout, start=1):
        if done == commands:
            time.sleep(delay_s)
            proc.send_signal(signal.SIGKILL)


def test_kill_9_at_random_moments(scratch, textinv_home):
    """12 importers killed wherever they are (seeded moments, 4 at a time). After each round:
    a sound database, every row's blob intact, and any debris (orphan blobs, temp files)
    invisible: never listed, never loaded, never under a blob's name with wrong bytes.
    On the real disk, not tmpfs: there the fsyncs of the blob and of the commit take most
    of an import's time, so most kills land in the middle of a write."""
    work, home = scratch, textinv_home  # the files to import on tmpfs, the registry on disk
    rng = random.Random(20240501)
    reg = Registry()
    pool = _files(work / "pool", [f"k-{i}" for i in range(90)], seed0=300)
    names = list(pool)
    for round_ in range(3):
        # overlapping slices: the same content is imported by two workers at once
        # then reads, so that a fast machine that finishes its imports early is still alive
        # (and reading the registry) when its kill comes
        jobs = [_script(work / "scripts", _imports({n: pool[n] for n in names[15 * w:15 * w + 45]})
                        + [["list", "--json"]] * 1000) for w in range(4)]
        procs = start_together(jobs, work / f"barrier-{round_}")
        # each dies a seeded moment after its k-th command (k < 45: while it imports), timed by
        # its own progress rather than the clock, so a fast or slow machine kills as often mid-import
        killers = [threading.Thread(target=_kill_after, args=(proc, rng.randint(1, 44), rng.uniform(0, 0.01)))
                   for proc in procs]
        try:
            for t in killers:
                t.start()
            for t in killers:
                t.join(timeout=120)
        finally:
            for proc in procs:
                proc.kill()
            ends = [(proc.stderr.read(), proc.wait()) for proc in procs]
        assert ends == [("", -signal.SIGKILL)] * 4  # each was still at work when it died, without errors

        rows = dict(assert_consistent(home))
        assert all(pool[name][1] == sha for name, sha in rows.items())
        listed = {e.name: e.sha256 for e in reg.entries()}
        assert listed == rows
        for item in reg.blob_dir.glob("*"):  # (no blobs/ yet if all died early)
            if item.name.endswith(".safetensors"):  # orphan or not: whole, its bytes match its name
                assert hashlib.sha256(item.read_bytes()).hexdigest() + ".safetensors" == item.name
            else:  # a write cut short never has a blob's name
                assert item.name.startswith(".") and item.name.endswith(".tmp"), item.name
        for name in set(names) - set(rows):  # what was cut short is not there, whatever is on disk
            with pytest.raises(NotFoundError):
                reg.resolve(name)

    # Repair (no importer is alive now, so no grace period is needed) removes the debris only.
    before = dict(assert_consistent(home))
    report = reg.repair(grace_s=0)
    assert report.ok and report.damaged == [] and report.kept_recent == []
    assert dict(assert_consistent(home)) == before
    assert _blob_names(home) == {f"{sha}.safetensors" for sha in before.values()}
    # and an import that was cut short can simply be done again (some of them, here in-process)
    again = {name: pool[name] for name in names if name not in before}
    again = dict(list(again.items())[:20])
    assert again, "no importer was cut short"
    command = cli_command()
    for argv in _imports(again):
        assert run_cli(command, argv)[0] == 0
    assert dict(assert_consistent(home)) == {**before, **{name: sha for name, (_, sha) in again.items()}}


def test_repair_running_alongside_importers(work):
    """`list --repair` over and over while two processes import (partly the same content),
    with debris from earlier crashes lying around: old orphans (some with content being
    imported right now) and old temp files. No import fails, no repair ever sees damage.
    To make the race bite, every blob is aged past the grace period again and again, as if
    each importer were paused between writing its blob and taking the lock."""
    home = work / "home"
    pool = _files(work / "pool", [f"r-{i}" for i in range(160)], seed0=600)
    reg = Registry()
    for i in range(10):
        reg.add(random_embedding(f"<pre-{i}>", seed=i), source="imported", origin={})
    names = list(pool)
    old = time.time() - 3600
    orphans = []
    for name in names[60:100]:  # crashed earlier; the second importer starts with these
        path, sha = pool[name]
        orphan = reg.blob_path(sha)
        orphan.write_bytes(read_embedding(path, token=f"<{name}>").canonical_bytes())
        orphans.append(orphan)
    temps = [reg.blob_dir / f".{'ab' * 32}.safetensors.crash{i}.tmp" for i in range(5)]
    for temp in temps:
        temp.write_bytes(b"half")
    for item in orphans + temps:
        os.utime(item, (old, old))
    jobs = [_script(work / "scripts", _imports({n: pool[n] for n in names[:100]})),
            _script(work / "scripts", _imports({n: pool[n] for n in names[60:]})),
            _script(work / "scripts", [["list", "--repair", "--json"]] * 40)]
    with _aging(reg.blob_dir, old):
        a, b, repairs = _clean(run_together(jobs, work / "barrier", timeout=240))

    assert all(r["rc"] == 0 for r in a + b + repairs)  # repair exits 1 on any damage it sees
    docs = [json.loads(r["out"]) for r in repairs]
    assert all(d["ok"] and d["damaged"] == [] for d in docs)
    assert sorted(f for d in docs for f in d["removed_temp_files"]) == sorted(t.name for t in temps)
    expected = {e: sha for e, (_, sha) in pool.items()}
    expected.update({f"pre-{i}": random_embedding(f"<pre-{i}>", seed=i).content_sha256() for i in range(10)})
    assert dict(assert_consistent(home)) == expected
    assert _blob_names(home) == {f"{sha}.safetensors" for sha in expected.values()}


@contextlib.contextmanager
def _aging(folder: Path, mtime: float):
    """While the block runs, keep setting every blob's mtime back to `mtime` (not temp files:
    deleting one mid-write would fail an import twice over, a case repair's grace protects)."""
    import threading

    stop = threading.Event()

    def age():
        while not stop.wait(0.002):
            for blob in folder.glob("*.safetensors"):
                with contextlib.suppress(OSError):
                    os.utime(blob, (mtime, mtime))

    thread = threading.Thread(target=age, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
