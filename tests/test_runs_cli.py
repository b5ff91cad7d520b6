"""`textinv runs` and `runs show` through the real entry point, on a run `train` made with the
tiny model: the list (status, step, loss, eval loss, registry entry), the loss curve as a
sparkline and a PNG beside the run, settings and validation images; the lines training prints
when stderr is not a terminal and the summary it ends with; a run killed mid-way, one held by
a running process, and RUN names that match nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from textinv_cli.engine import runs
from textinv_cli.engine.spec import TrainSpec


def test_train_then_runs_and_runs_show(cli, tiny_model, demo_images, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    r = cli("train", demo_images, "--token", "<run-toy>", "--init", "toy", "--model", tiny_model("sd1"),
            "--steps", "2", "--eval-every", "1", "--checkpoint-every", "0", "--lr", "0.05", "--seed", "3")
    assert r.exit_code == 0, r.output
    # not a terminal: a line per loss reading and eval (rich would print nothing until the end)
    assert "step 1/2  loss " in r.stderr and "step 0  eval loss " in r.stderr and " it/s " in r.stderr
    assert "Done: 2 steps in " in r.stdout and "eval loss " in r.stdout.split("Done:")[1]
    (run,) = (tmp_path / "runs").iterdir()
    log = (run / "train.log").read_text()
    assert "step 2/2  loss " in log and "step 2  eval loss " in log and "Done: 2 steps" in log

    listed = cli("runs", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["run"] == str(run) and row["status"] == "finished" and (row["step"], row["total"]) == (2, 2)
    assert row["entry"] == "run-toy" and row["token"] == "<run-toy>" and row["eval_first"] > row["eval_last"]
    table = cli("runs")
    assert table.exit_code == 0 and "runs/" + run.name in table.stdout and "finished" in table.stdout
    assert f"{row['eval_first']:.4f} -> {row['eval_last']:.4f}" in table.stdout and "run-toy" in table.stdout

    for name in ("run-toy", run.name, str(run)):  # the registry name, the folder's name, its path
        shown = cli("runs", "show", name)
        assert shown.exit_code == 0, shown.output
        assert f"Run {run}: finished, step 2/2" in shown.stdout and "Registry entry: run-toy" in shown.stdout
    out = shown.stdout
    eval_line = next(line for line in out.splitlines() if line.startswith("eval loss"))
    assert "(steps 0-2, 3 readings)" in eval_line and any(c in eval_line for c in "▁▂▃▄▅▆▇█")
    assert f"Loss curve: {run / 'loss.png'}" in out and "lr 0.05" in out and "seed 3" in out
    with Image.open(run / "loss.png") as im:
        assert im.size == (720, 360) and len(set(im.convert("RGB").getdata())) > 3  # drawn, not blank
    data = json.loads(cli("runs", "show", "run-toy", "--json", "--png", tmp_path / "c.png").stdout)
    assert [s for s, _ in data["eval"]] == [0, 1, 2] and data["settings"]["eval_every"] == 1
    assert data["png"] == str(tmp_path / "c.png") and (tmp_path / "c.png").is_file()


def _fake_run(folder: Path, events: list[dict], steps: int = 10) -> Path:
    folder.mkdir(parents=True)
    TrainSpec(data_dir="d", token="<f>", init=["x"], model="tiny", run_dir=str(folder), steps=steps).save(folder)
    (folder / "events.jsonl").write_text("".join(json.dumps({"time": 1.0e9 + i, **e}) + "\n"
                                                 for i, e in enumerate(events)))
    return folder


def test_runs_tells_failed_running_and_interrupted_apart(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = {"event": "started", "start_step": 0, "total_steps": 10}
    _fake_run(tmp_path / "runs" / "killed", [start, {"event": "progress", "step": 4, "total": 10, "lr": 1, "loss": 0.5},
                                             {"event": "progress", "step": 5, "total": 10, "lr": 1}])
    with open(tmp_path / "runs" / "killed" / "events.jsonl", "a") as f:
        f.write('{"event": "progress", "st')  # a kill mid-line
    live = _fake_run(tmp_path / "runs" / "live", [start])
    held = runs.hold_run(live)
    _fake_run(tmp_path / "elsewhere" / "stopped", [start, {"event": "validation", "step": 2, "paths": ["s/a.png"]},
                                                   {"event": "interrupted", "step": 3, "checkpoint": "c"}])
    try:
        rows = {Path(r["run"]).name: r for r in json.loads(cli("runs", "--json", "--in", tmp_path / "elsewhere").stdout)}
    finally:
        held.close()
    assert rows["killed"]["status"] == "failed" and rows["killed"]["step"] == 5 and rows["killed"]["last_loss"] == 0.5
    assert rows["live"]["status"] == "running" and rows["live"]["pid"] == os.getpid()
    assert rows["stopped"]["status"] == "interrupted" and rows["stopped"]["step"] == 3
    shown = cli("runs", "show", "killed")
    assert shown.exit_code == 0 and "failed, step 5/10" in shown.stdout
    assert f"Continue it: textinv resume {tmp_path / 'runs' / 'killed'}" in shown.stdout
    assert "Validation images: none" in shown.stdout
    shown = cli("runs", "show", tmp_path / "elsewhere" / "stopped")
    assert "interrupted, step 3/10" in shown.stdout and "Validation images:\n  s/a.png" in shown.stdout


def test_runs_show_names_that_match_nothing_or_several(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("runs", "show", "nope")
    assert r.exit_code == 1 and "No run nope" in r.stderr and "textinv runs" in r.stderr
    for name in ("cat-1", "cat-2"):
        _fake_run(tmp_path / "runs" / name, [])
    r = cli("runs", "show", "cat")
    assert r.exit_code == 1 and "matches 2 runs" in r.stderr
    assert f"textinv runs show {tmp_path / 'runs' / 'cat-1'}" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert "No training runs found" in cli("runs").stdout


def test_without_a_terminal_a_slow_run_still_prints_a_line_every_30_seconds(monkeypatch):
    from textinv_cli.cli import training

    lines = training._Lines()
    lines.start(0)
    assert not lines.due()
    lines.last -= training._Lines.EVERY_S  # half a minute without a loss reading
    assert lines.due()
    line = lines.progress({"event": "progress", "step": 3, "total": 10, "lr": 0.1})
    assert line.startswith("step 3/10  ") and " it/s " in line and not lines.due()


def test_eval_every_defaults_and_bad_values(cli, demo_images, tmp_path, monkeypatch):
    from textinv_cli.cli.commands.train_cmd import default_eval_every

    assert default_eval_every(None, 3000) == 150 and default_eval_every(None, 49) == 0
    assert default_eval_every(None, 100) == 50  # an eval costs ~4 steps: a few % of a run
    assert default_eval_every(0, 3000) == 0 and default_eval_every(7, 10) == 7
    monkeypatch.chdir(tmp_path)
    for args, said in ((["--eval-every", "-1"], "--eval-every must be 0 or more"),
                       (["--log-every", "0"], "--log-every must be at least 1"),
                       (["--report-to", "wandb"], "--report-to wandb is not a known target")):
        r = cli("train", demo_images, "--token", "<x-toy>", "--init", "toy", *args)
        assert r.exit_code == 2 and said in r.stderr, (args, r.output)
    assert not (tmp_path / "runs").exists()
