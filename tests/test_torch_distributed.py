"""Data-parallel training on the CPU with 2 gloo processes.

2 processes at --batch-size 1 see exactly the samples 1 process sees at --batch-size 2
(the batch plan numbers samples globally), and the rows' gradients are averaged across
processes before AdamW, so the final rows agree to float tolerance, and so do the losses.
Both entry routes are tested: `accelerate launch --multi_gpu` (torchrun underneath) and
`textinv train --num-processes 2`; Ctrl-C on the latter checkpoints at a step all ranks
agreed on, and resuming on a different number of processes continues the same run.

The subprocess tests take ~15 s each on 2 cores (mostly importing torch in each process).
"""

from __future__ import annotations

import json
import os
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
from textinv_cli.engine import launch as training
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.errors import TextinvError
from textinv_cli.registry.store import Registry

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from textinv_torch import distributed  # noqa: E402
from textinv_torch.backend import TorchBackend  # noqa: E402

TOKEN = "<cat-toy>"
# 2 processes on 2 cores: one thread each (tiny kernels gain nothing from more); every run on
# the CPU, also where there is a GPU (one GPU cannot host 2 ranks, and CPU vs GPU is not float noise)
CHILD_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TEXTINV_DEBUG": "", "CUDA_VISIBLE_DEVICES": ""}
# float noise only: per-rank losses averaged vs one batched loss (measured: ~1e-7 after 3 steps)
ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_args(data, model, *extra: str) -> list[str]:
    return ["train", str(data), "--token", TOKEN, "--init", "toy", "--model", str(model), "--resolution", "64",
            "--deterministic", "--json", *extra]


def run_cli(cmd: list[str], home: Path, cwd: Path, timeout: float = 120) -> tuple[int, list[dict], str]:
    env = dict(os.environ, TEXTINV_HOME=str(home), **CHILD_ENV)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p.returncode, lines, p.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(run: Path) -> np.ndarray:
    return load_file(run / runs.FINAL)[TOKEN]


def losses(lines: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in lines if e["event"] == "progress" and "loss" in e}


@pytest.fixture(scope="module")
def reference(tiny_model, demo_images, tmp_path_factory):
    """1 process at batch 2, here on the CPU, with the CLI's defaults (TrainSpec's): 12 steps,
    and the first 3 of them (the snapshot at step 3 is what a 3-step run ends with: the lr is
    constant and every draw is keyed by its step)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    spec = TrainSpec(data_dir=str(demo_images), token=TOKEN, init=["toy"], model=str(tiny_model("sd1")),
                     run_dir=str(run), resolution=64, deterministic=True, batch_size=2, steps=12, checkpoint_every=0,
                     save_every=3, extra={"device": "cpu"})
    events = list(TorchBackend().train(spec))
    every = {e.data["step"]: e.data["loss"] for e in events if e.kind == "progress"}
    assert every.keys() == set(range(1, 13))  # a loss at every step
    snapshot = load_file(run / "snapshots" / "step-000003.safetensors")[TOKEN]
    return {12: {"rows": rows_of(run), "losses": every},
            3: {"rows": snapshot, "losses": {s: every[s] for s in (1, 2, 3)}}}


def test_accelerate_launch_two_processes_match_one_process(tiny_model, demo_images, tmp_path, reference):
    home, cwd = tmp_path / "home", tmp_path / "work"
    cwd.mkdir()
    # --multi_gpu, not --cpu: with --cpu, accelerate starts ONE process unless under MPI; with
    # --multi_gpu it runs torchrun, and without a visible GPU every rank takes the CPU (gloo)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "textinv_cli"]
    # no --run-dir: each rank plans runs/<name>-<time> itself; rank 0's choice must win
    code, lines, err = run_cli(launch + train_args(demo_images, tiny_model("sd1"), "--batch-size", "1", "--steps", "3",
                                                   "--checkpoint-every", "2"), home, cwd)
    assert code == 0, err
    kinds = [e["event"] for e in lines]
    assert kinds == ["started", "progress", "progress", "checkpoint", "progress", "finished", "registered"], kinds
    assert lines[0]["processes"] == 2 and lines[0]["device"] == "cpu"
    (run,) = (cwd / "runs").iterdir()  # one run folder, not one per rank
    assert lines[0]["run_dir"] == str(run)
    got = rows_of(run)
    diff = float(np.abs(got - reference[3]["rows"]).max())
    print(f"max |rows(2 processes x batch 1) - rows(1 process x batch 2)| = {diff:.3g}")
    assert diff <= ATOL
    got_losses = losses(lines)
    assert got_losses.keys() == reference[3]["losses"].keys() == {1, 2, 3}
    for step, loss in got_losses.items():
        assert loss == pytest.approx(reference[3]["losses"][step], rel=1e-5, abs=1e-6), step

    # only rank 0 wrote: one event per step in the log, one spec, one checkpoint
    logged = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert logged == kinds[:-1]
    assert [s for s, _ in runs.complete_checkpoints(run)] == [2]
    spec = TrainSpec.load(run)
    assert spec.num_processes == 2 and spec.batch_size == 1 and spec.run_dir == str(run)
    # registered once, by rank 0
    entries = Registry(home).entries()
    assert [e.name for e in entries] == ["cat-toy"] and entries[0].origin["run"] == str(run)


def test_num_processes_option_ctrl_c_then_resume_on_one_process(tiny_model, demo_images, tmp_path, reference,
                                                                textinv_home):
    """`textinv train --num-processes 2`, SIGINT to the launcher: rank 0 checkpoints at the step
    both ranks agreed on and the launcher exits 130; then resuming on ONE process (batch 2 =
    the run's global batch) finishes the same run as the 1-process reference."""
    home, run = textinv_home, tmp_path / "run"
    env = dict(os.environ, TEXTINV_HOME=str(home), **CHILD_ENV)
    cmd = [sys.executable, "-m", "textinv_cli"] + train_args(
        demo_images, tiny_model("sd1"), "--batch-size", "1", "--steps", "12", "--checkpoint-every", "0",
        "--num-processes", "2", "--run-dir", str(run))
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(p.stderr), daemon=True)
    reader.start()
    lines = []
    try:
        for line in p.stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "progress" and lines[-1]["step"] == 1:
                p.send_signal(signal.SIGINT)  # to the launcher only, as a terminal's Ctrl-C would be
        code = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(timeout=5)
    err = "".join(err_lines)
    assert code == 130, err
    assert lines[0]["processes"] == 2
    stopped = lines[-1]
    assert stopped["event"] == "interrupted" and 1 <= stopped["step"] < 12, lines
    assert stopped["checkpoint"] == str(runs.checkpoint_dir(run, stopped["step"]))
    assert runs.latest_checkpoint(run) == (stopped["step"], runs.checkpoint_dir(run, stopped["step"]))
    assert f"textinv resume {run}" in err
    assert not (run / runs.FINAL).exists() and Registry(home).entries() == []
    for step, loss in losses(lines).items():
        assert loss == pytest.approx(reference[12]["losses"][step], rel=1e-5, abs=1e-6), step

    # resume here, in one process (so batch 2: the run's global batch), on the CPU
    spec = TrainSpec.load(run)
    assert (spec.batch_size, spec.num_processes) == (1, 2)
    spec.extra = {**spec.extra, "device": "cpu"}
    resumed = list(TorchBackend().train(spec, run))
    assert resumed[0].data["start_step"] == stopped["step"] and "processes" not in resumed[0].data
    assert resumed[-1].kind == "finished"
    got = rows_of(run)
    assert np.array_equal(got, resumed[-1].data["vectors"]["clip_l"])
    diff = float(np.abs(got - reference[12]["rows"]).max())
    print(f"max |rows(2 processes, Ctrl-C at step {stopped['step']}, resumed on 1) - rows(1 process)| = {diff:.3g}")
    assert diff <= 2 * ATOL


# -- the pieces, without training -----------------------------------------------------------

def test_local_batch_splits_the_global_batch():
    spec = TrainSpec(data_dir="d", token=TOKEN, init=["toy"], model="m", run_dir="r", batch_size=2, num_processes=2)
    assert [distributed.local_batch(spec, w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(TextinvError, match=r"global batch is 4 .* 3 processes cannot split it"):
        distributed.local_batch(spec, 3)


def test_child_command_is_the_same_command(monkeypatch, cli, tiny_model, demo_images, tmp_path):
    seen = {}

    def fake_launch(args, n, **kw):
        seen.update(args=args, n=n)
        return 0

    monkeypatch.setattr(training, "launch_processes", fake_launch)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # CPU processes, also on a machine with one GPU
    monkeypatch.chdir(tmp_path)
    result = cli("train", demo_images, "--token", TOKEN, "--init", "toy figure", "--vectors", "2",
                 "--model", tiny_model("sd1"), "--num-processes", "2", "--center-crop", "--steps", "5", "--lr", "0.001",
                 "--validate", "a", "--validate", "b c")
    assert result.exit_code == 0, result.output
    assert seen["n"] == 2
    args = seen["args"]
    assert args[0] == "train" and "--num-processes" not in args
    assert args[-2:] == ["--", str(demo_images)]
    run = Path(args[args.index("--run-dir") + 1])
    assert run.parent == tmp_path / "runs" and run.name.startswith("cat-toy-") and not run.exists()
    opts = args[1:args.index("--run-dir")]
    assert opts == ["--token", TOKEN, "--init", "toy figure", "--model", str(tiny_model("sd1")), "--vectors", "2", "--center-crop",
                    "--steps", "5", "--lr", "0.001", "--validate", "a", "--validate", "b c"]


def test_num_processes_must_match_the_launcher(monkeypatch, cli, tiny_model, demo_images):
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = cli("train", demo_images, "--token", TOKEN, "--init", "toy", "--model", tiny_model("sd1"),
                 "--num-processes", "2")
    assert result.exit_code == 1 and "does not match the 3 processes" in result.stderr


def _program(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_launcher_stops_the_others_when_one_fails(monkeypatch, capsys):
    monkeypatch.setattr(training, "KILL_GRACE_OTHER", 0.5)
    # rank 1 fails; rank 0 would wait for it forever (as in a collective)
    code = ("import os, sys, time\n"
            "if os.environ['RANK'] == '1':\n"
            "    sys.stderr.write('rank 1 broke: ' + os.environ['WORLD_SIZE'] + ' ' + os.environ['LOCAL_RANK'])\n"
            "    sys.exit(3)\n"
            "time.sleep(60)\n")
    t0 = time.monotonic()
    assert training.launch_processes([], 2, program=_program(code)) == 3
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert "Process 1 of 2 failed (exit code 3)" in err and "rank 1 broke: 2 1" in err


def test_launcher_forwards_ctrl_c_and_returns_rank_0s_code(tmp_path, monkeypatch):
    code = ("import os, signal, sys, time\n"
            "rank = int(os.environ['RANK'])\n"
            "signal.signal(signal.SIGINT, lambda *a: sys.exit(130 if rank == 0 else 0))\n"
            f"open(os.path.join({str(tmp_path)!r}, 'ready-%d' % rank), 'w').close()\n"
            "print('rank', rank, 'says hi', flush=True)\n"
            "time.sleep(60)\n")

    def interrupt_when_ready():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(tmp_path.glob("ready-*"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    timer = threading.Thread(target=interrupt_when_ready, daemon=True)
    timer.start()
    with open(tmp_path / "stdout", "w") as out:
        monkeypatch.setattr(sys, "stdout", out)  # a real file: rank 0 writes to it directly
        assert training.launch_processes([], 2, program=_program(code)) == 130
    timer.join(timeout=5)
    assert (tmp_path / "stdout").read_text() == "rank 0 says hi\n"  # rank 0 streamed, the others silent
    assert signal.getsignal(signal.SIGINT) is before
