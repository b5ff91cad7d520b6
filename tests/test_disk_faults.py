"""A read-only or full disk: every command that writes says so in one or two lines
(exit 1, no traceback, no "Internal error"), leaves nothing half-written where it writes and
registers nothing. The faults come from tests/support/disk_faults.py (real chmod where it stops this
process, injected errors otherwise).
"""

from __future__ import annotations

import errno
import sqlite3

import pytest

from tests.support.disk_faults import Disk
from tests.support.helpers import random_embedding
from tests.support.hub_server import concept_repo, hub  # noqa: F401 - fixtures
from textinv_cli.formats import WRITERS
from textinv_cli.registry.store import Registry

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

FULL, READ_ONLY = "full", "read-only"
# A command may see a read-only folder first through its own "is it writable?" check, or only
# when a write is refused: either way it says so.
SAYS = {FULL: ("no space left on the device",),
        READ_ONLY: ("permission denied", "not a writable folder", "is not writable")}
WAY_OUT = ("write somewhere else", "pick another folder", "pick a writable place")


@pytest.fixture
def disk(monkeypatch):
    """disk(folder, FULL | READ_ONLY) -> the Disk fault, undone after the test."""
    made = []

    def make(folder, fault: str, budget: int = 0) -> Disk:
        d = Disk(monkeypatch, folder)
        made.append(d)
        return d.full(budget) if fault == FULL else d.read_only()

    yield make
    for d in made:
        d.undo()


def refused(r, fault: str, *needles: str) -> str:
    """Exit 1 with one or two lines naming the problem and what to do."""
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "Internal error" not in r.output, r.output
    assert "Error: " in r.stderr, r.output
    text = r.stderr[r.stderr.index("Error: "):]  # after any progress shown before the fault
    assert 1 <= len(text.strip().splitlines()) <= 2, text
    assert any(s in text for s in SAYS[fault]), text
    assert any(w in text.lower() for w in WAY_OUT), text
    for n in needles:
        assert n in text, text
    return text


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def embedding_file(tmp_path, family="sd1"):
    from textinv_cli.formats import write_embedding

    src = tmp_path / "src" / f"cat-{family}.safetensors"
    src.parent.mkdir(exist_ok=True)
    write_embedding(random_embedding("<cat-toy>", family=family), src, "kohya")
    return src


FORMATS = [(fmt, "sdxl" if "sd1" not in info.families else "sd1") for fmt, info in WRITERS.items()]


@pytest.mark.parametrize("fault", [FULL, READ_ONLY])
@pytest.mark.parametrize("fmt, family", FORMATS, ids=[f for f, _ in FORMATS])
def test_convert_to_every_format(cli, disk, tmp_path, fmt, family, fault):
    src = embedding_file(tmp_path, family)
    out = tmp_path / "out"
    out.mkdir()
    d = disk(out, fault, budget=100)  # full: the first 100 bytes fit, then ENOSPC mid-file
    refused(cli("convert", src, "--to", fmt, "-o", out / "cat"), fault, str(out / "cat"))
    assert fault != FULL or d.hits
    d.undo()
    assert leftovers(out) == []  # no half file, no temp file, no temp folder


@pytest.mark.parametrize("fmt", ["kohya", "sd-concepts"])
def test_convert_force_over_an_existing_output_keeps_the_old_one(cli, disk, tmp_path, fmt):
    src = embedding_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert cli("convert", src, "--to", fmt, "-o", out / "cat").exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    disk(out, FULL, budget=100)
    refused(cli("convert", src, "--to", fmt, "-o", out / "cat", "--token", "<other>", "--force"), FULL)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("fault", [FULL, READ_ONLY])
def test_import_into_a_faulty_registry_registers_nothing(cli, disk, tmp_path, textinv_home, fault):
    src = embedding_file(tmp_path)
    assert cli("list").exit_code == 0  # a registry that exists (its database and folders)
    before = files(textinv_home)
    d = disk(textinv_home, fault)
    r = cli("import", src)
    assert r.exit_code == 1 and "Traceback" not in r.output and "Internal error" not in r.output, r.output
    assert 1 <= len(r.output.strip().splitlines()) <= 2, r.output
    d.undo()
    assert Registry().entries() == []
    assert [n for n in files(textinv_home) if n not in before and not n.startswith("registry.db")] == []


@pytest.mark.parametrize("where, fault, says", [
    ("cache", FULL, "Could not store me/cat@main in the Hugging Face cache"),
    ("cache", READ_ONLY, "Could not store me/cat@main in the Hugging Face cache"),
    ("registry", FULL, "the disk is full"),
])
def test_pull_onto_a_faulty_disk_registers_nothing(cli, disk, hub, textinv_home, where, fault, says):
    hub.seed("me/cat", concept_repo()[1])
    folder = hub.hf_home if where == "cache" else textinv_home
    folder.mkdir(parents=True, exist_ok=True)
    d = disk(folder, fault)
    r = cli("pull", "me/cat")
    assert r.exit_code == 1 and "Traceback" not in r.output and "Internal error" not in r.output, r.output
    assert 1 <= len(r.output.strip().splitlines()) <= 2 and says in r.output, r.output
    assert "nothing was registered" in r.output
    d.undo()
    assert Registry().entries() == []
    assert not [p for p in textinv_home.rglob("*") if p.suffix == ".tmp"]
    if where == "cache":  # nothing in it that a later pull (or offline use) would take for the file
        assert not [p for p in hub.hf_home.glob("hub/*/snapshots/**/*") if p.is_file()]
        assert not [p for p in hub.hf_home.glob("hub/*/blobs/*") if not p.name.endswith(".incomplete")]
    assert cli("pull", "me/cat").exit_code == 0  # with the disk fixed it just works


def test_push_writes_nothing_locally(cli, disk, hub, textinv_home, tmp_path, monkeypatch):
    """push builds the commit in memory: a full home, cache and working folder do not matter."""
    Registry().add(random_embedding("<cat-toy>"), source="imported", origin={})
    hub.hf_home.mkdir(parents=True, exist_ok=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    faults = [disk(folder, FULL) for folder in (textinv_home, hub.hf_home, tmp_path / "work")]
    r = cli("push", "cat-toy", "--repo", "me/cat-toy")
    assert r.exit_code == 0, r.output
    assert sum(d.hits for d in faults) == 0 and "README.md" in hub.head("me/cat-toy").files


@pytest.mark.parametrize("fault", [FULL, READ_ONLY])
def test_tiny_model_leaves_no_half_model(cli, disk, tmp_path, fault):
    pytest.importorskip("torch")
    parent = tmp_path / "models"
    parent.mkdir()
    disk(parent, fault)
    r = cli("tiny-model", parent / "tiny")
    refused(r, fault, str(parent / 'tiny'))
    assert leftovers(parent) == []


@pytest.fixture
def trained(tiny_model, demo_images):
    return tiny_model("sd1"), demo_images


@pytest.mark.parametrize("fault", [FULL, READ_ONLY])
def test_train_cannot_write_its_run_folder(cli, disk, tmp_path, trained, fault):
    model, images = trained
    runs = tmp_path / "runs"
    runs.mkdir()
    disk(runs, fault)
    r = cli("train", images, "--token", "<cat-toy>", "--init", "toy", "--model", model, "--steps", "2",
            "--run-dir", runs / "run")
    refused(r, fault)
    assert Registry().entries() == []


def test_train_disk_full_at_a_checkpoint(cli, disk, tmp_path, trained):
    """The run folder was written; the disk fills when the first checkpoint is: no complete
    checkpoint may claim to be one, nothing is registered."""
    from textinv_cli.engine.runs import complete_checkpoints

    model, images = trained
    run = tmp_path / "run"
    d = disk(run / "checkpoints", FULL)  # the folder appears when training writes it
    r = cli("train", images, "--token", "<cat-toy>", "--init", "toy", "--model", model, "--steps", "2",
            "--checkpoint-every", "1", "--run-dir", run)
    refused(r, FULL)
    assert d.hits
    assert complete_checkpoints(run) == [] and Registry().entries() == []
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("fault", [FULL, READ_ONLY])
def test_sample_cannot_write_its_images(cli, disk, tmp_path, trained, fault):
    model, _ = trained
    out = tmp_path / "samples"
    out.mkdir()
    disk(out, fault, budget=100)
    r = cli("sample", "a toy", "--model", model, "--steps", "1", "-o", out)
    refused(r, fault, str(out))
    assert leftovers(out) == []


# -- the messages themselves -------------------------------------------------------------------

@pytest.mark.parametrize("exc, says, hint", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.pt"), "no space left on the device (/data/x.pt)",
     "Free some space, or write somewhere else (another output folder)"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is used up", "TEXTINV_HOME for the registry"),
    (OSError(errno.EFBIG, "File too large"), "too large for this file system", "Free some space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "the file system is read-only (/ro/x)",
     "Write somewhere else (another output folder)"),
    (PermissionError(errno.EACCES, "Permission denied", "/home/x"), "permission denied (/home/x)",
     "Check the folder's permissions"),
    (OSError(errno.EPERM, "Operation not permitted"), "permission denied", "Check the folder's permissions"),
    (OSError(errno.EIO, "Input/output error"), "input/output error", "Check the disk"),
    (sqlite3.OperationalError("database or disk is full"), "no space left on the device (the registry's database)",
     "set TEXTINV_HOME to a folder on another disk"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "read-only (the registry's database)",
     "Set TEXTINV_HOME to a folder on another disk"),
    ("blob", "no space left on the device", "set TEXTINV_HOME to a folder on another disk"),
])
def test_report_names_the_disk_problem_and_the_way_out(capsys, textinv_home, exc, says, hint):
    from textinv_cli.cli.app import report

    if exc == "blob":  # a file inside the registry: the way out is another TEXTINV_HOME, not -o
        exc = OSError(errno.ENOSPC, "No space left on device", str(textinv_home / "blobs" / "x.safetensors"))
    assert report(exc) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 2 and "Internal error" not in err, err
    assert hint in err.splitlines()[1], err


def test_a_folder_swap_that_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    """--force over a folder: the old one is moved aside, the new one moved in; if that second
    rename fails (EXDEV, EIO...), the old folder must be back under its name."""
    import os

    from textinv_cli import fsutil, writes

    target = tmp_path / "concept"
    writes.atomic_write_dir(target, {"a.txt": b"old"})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(OSError) as info:
        writes.atomic_write_dir(target, {"a.txt": b"new"}, force=True)
    assert info.value.filename == str(target)
    assert (target / "a.txt").read_bytes() == b"old" and files(tmp_path) == ["a.txt"]


# -- the real thing, where this machine lets a test mount a file system ------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A real 512 KiB tmpfs: root with the right to mount (a container may lack it: then skipped)."""
    import os
    import shutil
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder) -> None:
    """Write until the file system says ENOSPC."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_really_full_then_read_only_file_system(cli, tmp_path, small_fs, monkeypatch):
    import subprocess

    src = embedding_file(tmp_path)
    home = small_fs / "home"
    monkeypatch.setenv("TEXTINV_HOME", str(home))
    assert cli("list").exit_code == 0  # the registry exists before the disk fills up
    _fill(small_fs)
    before = files(small_fs)
    for fmt in ("kohya", "sd-concepts"):
        refused(cli("convert", src, "--to", fmt, "-o", small_fs / "cat"), FULL, str(small_fs / "cat"))
    r = cli("import", src)
    assert r.exit_code == 1 and "Traceback" not in r.output and "Internal error" not in r.output, r.output
    assert 1 <= len(r.output.strip().splitlines()) <= 2 and "full" in r.output, r.output
    assert files(small_fs) == before
    (small_fs / "filler").unlink()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
    r = cli("convert", src, "--to", "kohya", "-o", small_fs / "cat")
    assert r.exit_code == 1 and "the file system is read-only" in r.output and "Traceback" not in r.output, r.output
    monkeypatch.setenv("TEXTINV_HOME", str(small_fs / "home"))
    r = cli("import", src)
    assert r.exit_code == 1 and "Traceback" not in r.output and "Internal error" not in r.output, r.output
    assert files(small_fs) == [n for n in before if n != "filler"]
    assert Registry().entries() == []
