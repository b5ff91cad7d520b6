"""kill -9 during training: a run SIGKILLed at ten moments -- inside checkpoint
writes (through the runs.CRASH_ENV hook), at random times measured from its --json events,
between the final write and registration, and inside the registry's write -- and resumed
each time, ends with the same embedding as an uninterrupted run, bit for bit.

After every kill: no incomplete checkpoint counts, every checkpoint that counts is whole,
nothing announced is lost, with --keep-checkpoints 1 a complete checkpoint exists from the
first one on, events.jsonl is whole lines, and nothing is registered. At the end: one
registry entry, and only the last checkpoint left in the run.

The processes are forked from one warm parent (tests/support/forked_cli.py), each running the CLI's
main() as `python -m textinv_cli` does, so thirteen of them cost one start-up. The kill plan
comes from a seeded RNG: CI replays the same plan (where a random-time kill lands within
its window still varies with the machine's speed; every check holds wherever it lands).
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from textinv_cli.engine import runs
from textinv_cli.engine.run_files import EVENTS, record_event
from textinv_cli.engine.spec import Event
from textinv_cli.registry.store import CRASH_ENV as REGISTRY_CRASH_ENV
from textinv_cli.registry.store import Registry

pytest.importorskip("torch")
pytest.importorskip("diffusers")


TOKEN, NAME = "<cat-toy>", "cat-toy"
STEPS, EVERY = 36, 2  # room for eight kills that each move the run on by up to two checkpoints
CHECKPOINT_STAGES = ("temp-partial", "before-rename", "after-rename", "after-complete", "during-retention")
SEED = 20240607
TIMEOUT = 120.0


class ForkedCli:
    """tests/support/forked_cli.py as a context manager: run(argv, env, kill=...) -> (status, events)."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "support" / "forked_cli.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.child = None
        threading.Thread(target=self._read, daemon=True).start()
        assert "ready" in self._next()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self) -> dict:
        line = self.lines.get(timeout=TIMEOUT)
        assert line is not None, "the fork server died"
        return json.loads(line)

    def run(self, argv: list, env: dict | None = None, kill=None) -> tuple[int, list[dict]]:
        """Run one CLI process to its end; kill(event) -> seconds means SIGKILL it that long
        after that event."""
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        pid = self.child = self._next()["forked"]
        events, killed = [], False
        while True:
            msg = self._next()
            if msg.get("exited") == pid:
                self.child = None
                return msg["status"], events
            events.append(msg)
            delay = None if killed or kill is None else kill(msg)
            if delay is not None:
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)  # the server only reaps it after we have read "exited"
                killed = True

    def close(self):
        if self.child is not None:  # the test failed while one ran
            os.kill(self.child, signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def on_disk(run: Path) -> dict:
    """What the checkpoints folder holds, read here without the code under test:
    {step: whole?} for step-N folders with a `complete` marker, and the names of the rest."""
    root = run / runs.CHECKPOINTS
    complete, other = {}, []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith("step-") and (p / runs.COMPLETE).is_file():
            step = int(p.name[5:])
            try:
                info = json.loads((p / "state.json").read_text())
                rows = load_file(p / "state.safetensors")
                complete[step] = info["step"] == step and rows["rows.clip_l"].shape == (1, 32)
            except Exception:  # noqa: BLE001 - missing, torn or foreign: not whole
                complete[step] = False
        else:
            other.append(p.name)
    return {"complete": complete, "other": other}


def killed_where_asked(stage: str, step: int, run: Path, base: int, after: dict) -> bool:
    """The hook fired at its stage: what that moment of a checkpoint write leaves on disk."""
    tmp, name = run / runs.CHECKPOINTS / f".step-{step:06d}.tmp", f"step-{step:06d}"
    older = base > 0 or step > EVERY  # a complete checkpoint before this one: retention's to retire
    return {
        "temp-partial": lambda: sorted(p.name for p in tmp.iterdir()) == ["state.safetensors"],
        "before-rename": lambda: sorted(p.name for p in tmp.iterdir()) == ["state.json", "state.safetensors"],
        "after-rename": lambda: name in after["other"] and step not in after["complete"],
        "after-complete": lambda: step in after["complete"] and len(after["complete"]) == 1 + older,
        "during-retention": lambda: step in after["complete"] and any(n.endswith(".old") for n in after["other"]),
    }[stage]()


def event_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / EVENTS).read_text().splitlines()]  # a torn line fails here


def kill_plan(rng: random.Random) -> list[tuple[str, str]]:
    """Ten kills: every checkpoint stage once and three random times, shuffled; then between
    the final write and registration; then inside the registry's own write."""
    plan = [("hook", s) for s in CHECKPOINT_STAGES] + [("random", "")] * 3
    rng.shuffle(plan)
    return plan + [("hook", "before-register"), ("registry", rng.choice(["after-blob", "before-commit"]))]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fork server needs os.fork")
def test_kill_9_at_ten_moments_then_resume_gives_the_uninterrupted_embedding(tiny_model, demo_images, tmp_path):
    rng = random.Random(SEED)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = ["train", demo_images, "--token", TOKEN, "--init", "toy", "--model", tiny_model("sd1"),
             "--steps", STEPS, "--checkpoint-every", EVERY, "--keep-checkpoints", 1,
             "--deterministic", "--seed", 3, "--lr", 0.05, "--json"]
    run, ref_run = tmp_path / "run", tmp_path / "ref"
    cli = ForkedCli(env)
    try:
        status, ref_events = cli.run([*train, "--run-dir", ref_run], {"TEXTINV_HOME": str(tmp_path / "ref-home")})
        assert status == 0 and ref_events[-1]["event"] == "registered", ref_events[-3:]

        announced, latest, leftovers_seen, first_rows = 0, None, 0, None
        for i, (kind, stage) in enumerate(kill_plan(rng)):
            base = latest or 0
            hook_env, kill, at = {}, None, None
            if kind == "hook" and stage in CHECKPOINT_STAGES:
                ahead = rng.choice([1, 2]) if stage != "during-retention" or latest else 2  # something to retire
                at = base + EVERY * ahead
                hook_env = {runs.CRASH_ENV: f"{stage}:{at}"}
            elif kind == "hook":
                hook_env = {runs.CRASH_ENV: stage}
            elif kind == "registry":
                hook_env = {REGISTRY_CRASH_ENV: stage}
            else:  # a random moment: shortly after a random step's progress event (or the start)
                at, delay = rng.randint(base, base + 3), rng.uniform(0.0, 0.03)

                def kill(ev, at=at, delay=delay):
                    hit = ev.get("step") == at if ev["event"] == "progress" else ev["event"] == "started" and at == base
                    return delay if hit else None

            before = on_disk(run)
            leftovers_seen += bool(before["other"])
            argv = train + ["--run-dir", run] if i == 0 else ["resume", run, "--json"]
            status, events = cli.run(argv, hook_env, kill)
            what = f"kill {i} ({kind} {stage} {at}) from step {base}"
            assert status == -signal.SIGKILL, (what, status, events[-3:])

            # the resumed process continued from the newest complete checkpoint, ignoring the rest
            started = next(e for e in events if e["event"] == "started")
            assert started["start_step"] == base, what
            assert started["resumed_from"] == (str(runs.checkpoint_dir(run, base)) if latest else None), what

            after = on_disk(run)
            if stage in CHECKPOINT_STAGES:
                assert killed_where_asked(stage, at, run, base, after), (what, after)
            announced = max([announced] + [e["step"] for e in events if e["event"] == "checkpoint"])
            assert all(after["complete"].values()), (what, after)  # whatever counts is whole
            if latest or announced:  # once one exists, one always exists (keep 1: old goes after new)
                assert after["complete"], (what, after)
            newest = max(after["complete"], default=None)
            assert (newest or 0) >= max(base, announced), (what, after, announced)  # nothing committed is lost
            assert len(after["complete"]) <= 2, (what, after)  # keep 1, plus one if killed before retention
            assert event_lines(run)
            assert Registry().get(NAME) is None, what  # nothing registered before the run finished
            latest = newest
            if first_rows is None and latest:
                first_rows = load_file(runs.checkpoint_dir(run, latest) / "state.safetensors")["rows.clip_l"]

        status, events = cli.run(["resume", run, "--json"])
        assert status == 0 and events[-1]["event"] == "registered", events[-3:]
        again, _ = cli.run(["resume", run, "--json"])  # finished and registered: refused, nothing changes
    finally:
        cli.close()

    assert again == 1
    got, want = run / runs.FINAL, ref_run / runs.FINAL
    assert got.read_bytes() == want.read_bytes()  # the same embedding, bit for bit
    assert not np.array_equal(load_file(got)[TOKEN], first_rows)  # it can fail: training moves the rows
    entries = Registry().entries()
    assert [(e.name, e.sha256) for e in entries] == [(NAME, ref_events[-1]["entry"]["sha256"])]
    assert on_disk(run) == {"complete": {STEPS: True}, "other": []}  # leftovers swept, retention done
    assert leftovers_seen >= 4  # resumes met half-written checkpoints (4 stages leave some) and ignored them
    assert sum(e["event"] == "started" for e in event_lines(run)) == 11


def test_a_torn_last_event_line_is_cut_before_the_next_append(tmp_path):
    (tmp_path / EVENTS).write_bytes(b'{"event": "started"}\n{"event": "progress", "st')  # killed mid-line
    record_event(tmp_path, Event("progress", {"step": 1}))
    lines = event_lines(tmp_path)
    assert [(d["event"], d.get("step")) for d in lines] == [("started", None), ("progress", 1)]
    (tmp_path / EVENTS).write_bytes(b'{"event": "sta')  # nothing whole at all
    record_event(tmp_path, Event("warning", {"message": "m"}))
    assert [d["event"] for d in event_lines(tmp_path)] == ["warning"]


def test_a_run_folder_left_by_a_kill_during_its_first_write_counts_as_empty(tmp_path):
    from textinv_cli.errors import OutputExistsError
    from textinv_cli.engine.run_files import check_new_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / ".spec.json.k2x9_a.tmp").write_bytes(b'{"tok')  # all a kill inside spec.json's write leaves
    check_new_run_dir(run)
    assert list(run.iterdir()) == []
    (run / ".spec.json.k2x9_a.tmp").write_bytes(b"{")
    (run / "notes.txt").write_text("mine")  # anything else is the user's: the folder stays refused
    with pytest.raises(OutputExistsError, match="already exists"):
        check_new_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [".spec.json.k2x9_a.tmp", "notes.txt"]
