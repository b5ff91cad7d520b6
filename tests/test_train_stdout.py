"""`textinv train --json` whose stdout reader goes away (`| tee log` then Ctrl-C, a `jq` that
quits): the run goes on, says so on stderr, and ends as it would have -- registered when it
finishes; on Ctrl-C with its checkpoint and the resume command on stderr, exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _start(tiny_model, demo_images, tmp_path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "TEXTINV_HOME": str(tmp_path / "home")}
    argv = [sys.executable, "-m", "textinv_cli", "train", str(demo_images), "--token", "<pipe-toy>", "--init", "toy",
            "--model", str(tiny_model("sd1")), "--steps", str(steps), "--checkpoint-every", "1",
            "--run-dir", str(tmp_path / "run"), "--json"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_reader_leaving_does_not_stop_training(tiny_model, demo_images, tmp_path):
    proc = _start(tiny_model, demo_images, tmp_path, steps=3)
    assert json.loads(proc.stdout.readline())["event"] == "started"
    proc.stdout.close()  # the reader leaves
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 0, err
    assert "standard output was closed" in err and "Registered as pipe-toy (<pipe-toy>)" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "finished"


def test_ctrl_c_after_the_reader_left_keeps_a_checkpoint(tiny_model, demo_images, tmp_path):
    proc = _start(tiny_model, demo_images, tmp_path, steps=100_000)
    seen = [json.loads(proc.stdout.readline())["event"] for _ in range(2)]
    while seen[-1] != "checkpoint":  # a checkpoint every step: wait for the first
        seen.append(json.loads(proc.stdout.readline())["event"])
    proc.stdout.close()  # `| tee`: the pipe's reader dies first ...
    proc.send_signal(signal.SIGINT)  # ... then the training gets the same Ctrl-C
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 130, err
    assert f"Resume with: textinv resume {tmp_path / 'run'}" in err
    assert "checkpoint saved in" in err and "Traceback" not in err
    events = [json.loads(x)["event"] for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1] == "interrupted" and "finished" not in events
