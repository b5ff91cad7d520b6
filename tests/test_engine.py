"""The core's run engine, contract and checks, without torch or jax: a numpy backend whose
session the engine drives through the whole protocol (events, run folder, checkpoints,
resume, Ctrl-C), the option rules refused before anything loads (the same way on every
backend), the typed spec fields and events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.training import train_spec
from textinv_cli.engine import plugins
from textinv_cli.engine import runs
from textinv_cli.engine import checks
from textinv_cli.engine.contract import Backend, BackendInfo, Session
from textinv_cli.engine.loop import data_position, run
from textinv_cli.errors import TextinvError
from textinv_cli.formats.safetensors_io import dump_safetensors, load_safetensors
from textinv_cli.engine.spec import KINDS, Event, Progress, SampleRequest, Started, TrainSpec

TOKEN = "<x>"


class NumpySession(Session):
    """rows <- rows - lr * (rows - target): deterministic, so resume must be bit-identical."""

    name = "numpy"

    def __init__(self, spec: TrainSpec, stop_after: int | None = None):
        self.spec, self.warnings, self.stop_after, self.family = spec, ["numpy says hello"], stop_after, ""
        self.global_batch = spec.batch_size

    def load(self, images, captions):
        self.family = "sd1"
        self.rows = np.zeros((self.spec.vectors, 8), np.float32)
        self.target = np.arange(8, dtype=np.float32)[None].repeat(self.spec.vectors, 0)

    def restore(self, folder):
        tensors, _ = load_safetensors((folder / "rows.safetensors").read_bytes(), "rows")
        self.rows = tensors["rows.clip_l"].copy()
        return json.loads((folder / "state.json").read_text())["step"]

    def step(self, step, lr, stop, log):
        self.rows = self.rows - np.float32(lr) * (self.rows - self.target)
        if self.stop_after is not None and step + 1 == self.stop_after:
            stop.requested = True  # as if Ctrl-C came during this step
        return float(np.square(self.rows - self.target).mean()) if log else None

    def checkpoint_files(self, step, info):
        return {"rows.safetensors": dump_safetensors({"rows.clip_l": self.rows}, {}),
                "state.json": json.dumps({"step": step, **info}).encode()}

    def vectors(self):
        return {"clip_l": self.rows.copy()}

    def validate(self, run, step):
        return []


class NumpyBackend(Backend):
    name = "numpy"
    stop_after: int | None = None

    def probe(self):
        return BackendInfo(self.name)

    def train(self, spec, resume=None):
        return run(self, spec, resume)

    def open_session(self, spec):
        return NumpySession(spec, self.stop_after)


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    (folder / "notes.md").write_text("not an image")
    return folder


def make_spec(images, tmp_path, name="run", **kw) -> TrainSpec:
    return train_spec(images, "numpy", tmp_path / name, **{"token": TOKEN, "backend": "numpy", "seed": 0,
                                                           "checkpoint_every": 2, "keep_checkpoints": 1, "lr": 0.25,
                                                           "save_every": 3, **kw})


def test_the_engine_drives_a_session_through_the_whole_protocol(images, tmp_path):
    spec = make_spec(images, tmp_path)
    events = list(NumpyBackend().train(spec))
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["started", "warning", "warning"]
    assert events[1].data["message"].startswith("Skipped 1 file(s) that are not images: notes.md")
    assert events[2].data == {"message": "numpy says hello"}
    assert kinds.count("progress") == 6 and kinds.count("checkpoint") == 3 and kinds.count("snapshot") == 2
    assert kinds[-1] == "finished"
    started = events[0]
    assert isinstance(started.payload, Started) and list(started.data) == [
        "run_dir", "device", "family", "model", "images", "ignored", "total_steps", "start_step", "resumed_from"]
    assert started.data["images"] == 3 and started.data["ignored"] == ["notes.md"]
    run = Path(spec.run_dir)
    assert sorted(p.name for p in run.iterdir()) == [runs.LOCK, "checkpoints", "data.json", "events.jsonl", runs.FINAL,
                                                      "snapshots", "spec.json", "train.log"]
    assert runs.complete_checkpoints(run) == [(6, runs.checkpoint_dir(run, 6))]  # keep_checkpoints=1
    logged = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [line["event"] for line in logged] == kinds
    assert logged[-1]["vectors"] == {"clip_l": [1, 8]}  # arrays logged as their shapes
    info = json.loads((runs.checkpoint_dir(run, 6) / "state.json").read_text())
    assert info["data_position"] == data_position(6, 3, 1, 1) == {"epoch": 2, "index": 0, "samples_seen": 6}
    assert events[-1].data["meta"]["trained_with"] == "textinv numpy"


def test_ctrl_c_checkpoints_and_resume_is_bit_identical(images, tmp_path):
    straight = list(NumpyBackend().train(make_spec(images, tmp_path, "straight")))
    backend = NumpyBackend()
    backend.stop_after = 3
    spec = make_spec(images, tmp_path, "stopped")
    stopped = list(backend.train(spec))
    assert stopped[-1].kind == "interrupted" and stopped[-1].data == {
        "step": 3, "checkpoint": str(runs.checkpoint_dir(spec.run_dir, 3))}
    assert runs.latest_checkpoint(Path(spec.run_dir))[0] == 3
    resumed = list(NumpyBackend().train(TrainSpec.load(Path(spec.run_dir)), Path(spec.run_dir)))
    assert resumed[0].data["start_step"] == 3 and resumed[0].data["resumed_from"].endswith("step-000003")
    assert np.array_equal(resumed[-1].data["vectors"]["clip_l"], straight[-1].data["vectors"]["clip_l"])


def test_progress_carries_the_loss_only_at_log_steps():
    assert Event.of(Progress(step=1, total=3, lr=0.5)).to_json() == {"event": "progress", "step": 1, "total": 3,
                                                                      "lr": 0.5}
    assert list(Event.of(Progress(step=3, total=3, lr=0.5, loss=0.25)).data) == ["step", "total", "lr", "loss"]


def test_event_kinds_are_a_closed_set():
    assert {"started", "progress", "finished", "interrupted", "sample"} <= set(KINDS)
    with pytest.raises(ValueError, match="Unknown event kind 'finsihed'"):
        Event("finsihed", {})


def test_spec_fields_are_first_class_and_spec_json_keeps_its_shape(tmp_path):
    spec = TrainSpec(data_dir="d", token=TOKEN, init=["toy"], model="m", run_dir="r",
                     extra={"device": "cpu", "threads": 1, "custom": 3})
    assert (spec.device, spec.threads, spec.devices, spec.extra) == ("cpu", 1, None, {"custom": 3})
    spec.name, spec.model_name = "x", "tiny"
    data = spec.to_json()
    assert data["extra"] == {"name": "x", "model_name": "tiny", "device": "cpu", "threads": 1, "custom": 3}
    assert not {"name", "model_name", "device", "threads", "devices"} & set(data)
    spec.save(tmp_path)
    again = TrainSpec.load(tmp_path)
    assert (again.name, again.model_name, again.device, again.threads, again.extra) == ("x", "tiny", "cpu", 1,
                                                                                        {"custom": 3})


# -- the option rules: one place, before anything loads -----------------------------------------

def test_vectors_limit_is_the_same_in_help_and_checks(cli):
    assert checks.VECTORS_MAX == 64
    assert f"1 to {checks.VECTORS_MAX}" in " ".join(cli("train", "--help").output.split())


def test_out_of_range_vectors_is_refused_before_anything_loads(cli, images, monkeypatch):
    monkeypatch.setattr(plugins, "require_backend", lambda *a: pytest.fail("a backend was asked for"))
    t0 = time.monotonic()
    r = cli("train", images, "--token", TOKEN, "--init", "toy", "--vectors", "70")
    assert time.monotonic() - t0 < 1.0
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--vectors must be between 1 and 64, not 70." in r.output and len(r.output.strip().splitlines()) == 1


def test_the_cli_refuses_vectors_70_in_a_fresh_process_without_loading_a_framework(images, tmp_path):
    code = ("import sys\nfrom textinv_cli.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, sorted(m for m in ('torch', 'jax', 'diffusers') if m in sys.modules))\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, "train", str(images), "--token", TOKEN, "--init", "toy",
                          "--vectors", "70"], capture_output=True, text=True, env={**os.environ, "TEXTINV_DEBUG": ""},
                         timeout=60)
    print(f"refused in {time.monotonic() - t0:.2f} s including the interpreter's start")
    assert out.stdout.strip().splitlines()[-1] == "exit 2 []"
    assert "--vectors must be between 1 and 64" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field", ["steps", "vectors", "batch_size", "seed"])
def test_a_bool_is_no_count(images, tmp_path, field):
    spec = make_spec(images, tmp_path, **{field: True})
    with pytest.raises(TextinvError, match=f"--{field.replace('_', '-')} must .*, not True"):
        checks.check_train_spec(spec)
    with pytest.raises(TextinvError, match=f"--{field.replace('_', '-')} must"):
        list(NumpyBackend().train(spec))
    assert not Path(spec.run_dir).exists()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_bool_is_refused_the_same_way_on_every_backend(backend, images, tmp_path):
    if backend == "torch":
        pytest.importorskip("torch")
        from textinv_torch.backend import TorchBackend as Chosen
    else:
        pytest.importorskip("jax")
        from textinv_jax.backend import JaxBackend as Chosen
    spec = make_spec(images, tmp_path, steps=True, backend=backend)
    with pytest.raises(TextinvError) as e:
        list(Chosen().train(spec))
    assert e.value.message == "--steps must be at least 1, not True."
    request = SampleRequest(prompt="a", model="tiny", out_dir=str(tmp_path / "out"), n=True)
    with pytest.raises(TextinvError) as e:
        list(Chosen().sample(request))
    assert e.value.message == "-n must be at least 1, not True."
    assert not (tmp_path / "out").exists()


def test_backend_capabilities_are_refused_by_name(images, tmp_path):
    spec = make_spec(images, tmp_path, attention="xformers", num_processes=2)
    with pytest.raises(TextinvError, match="xformers is a PyTorch library; the numpy backend runs sdpa"):
        checks.check_train_backend(spec, NumpyBackend())
    spec.attention = "sdpa"
    with pytest.raises(TextinvError, match="--num-processes 2 is for --backend torch"):
        checks.check_train_backend(spec, NumpyBackend())
    request = SampleRequest(prompt="a", model="tiny", out_dir="o", scheduler="unipc")
    with pytest.raises(TextinvError, match="The numpy backend samples with DDIM, not 'UniPC'"):
        checks.check_sample_request(request, NumpyBackend())


def test_jax_declares_the_schedulers_its_sampler_runs():
    pytest.importorskip("jax")
    from textinv_jax import sampling
    from textinv_jax.backend import JaxBackend

    assert JaxBackend.schedulers == sampling.RUNS.schedulers == tuple(sampling.SCHEDULERS)


def test_the_engine_imports_neither_torch_nor_jax():
    code = ("import sys, textinv_cli.engine.loop, textinv_cli.engine.checks, textinv_cli.engine.plugins\n"
            "print(sorted(m for m in ('torch', 'jax', 'numpy.random_torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- watching a run: eval loss, summary, train.log, the lock, TensorBoard (issue 14) ---------------

class EvalSession(NumpySession):
    """The numpy session with an eval loss: the distance of the rows to the target."""

    evals = 0

    def eval_loss(self):
        type(self).evals += 1
        return float(np.square(self.rows - self.target).mean())


class EvalBackend(NumpyBackend):
    def open_session(self, spec):
        return EvalSession(spec, self.stop_after)


def test_eval_loss_every_n_steps_and_the_summary_in_finished(images, tmp_path):
    from textinv_cli.engine import run_log

    spec = make_spec(images, tmp_path, eval_every=4, steps=6)
    events = list(EvalBackend().train(spec))
    evals = [(e.data["step"], e.data["loss"]) for e in events if e.kind == "eval"]
    assert [s for s, _ in evals] == [0, 4, 6]  # the init rows, every 4 steps, the end
    assert evals[0][1] > evals[1][1] > evals[2][1]
    told = events[-1].data["summary"]
    assert (told["eval_first"], told["eval_last"]) == (evals[0][1], evals[-1][1])
    assert told["eval_first_step"] == 0 and told["eval_last_step"] == 6 and told["steps"] == 6
    losses = [e.data["loss"] for e in events if e.kind == "progress"]
    assert told["final_loss"] == losses[-1] and told["mean_loss"] == pytest.approx(sum(losses) / len(losses))
    assert told["steps_per_s"] > 0 and told["run_dir"] == spec.run_dir
    run = Path(spec.run_dir)
    log = (run / run_log.LOG_FILE).read_text()
    assert "step 4  eval loss" in log and "step 6/6  loss" in log and "Done: 6 steps in" in log
    assert f"eval loss {evals[0][1]:.4f} -> {evals[-1][1]:.4f}" in log
    assert runs.running_pid(run) is None  # released with the last event
    # no eval: no eval events, no eval call, the same rows (the eval reads, never moves them)
    EvalSession.evals = 0
    plain = list(EvalBackend().train(make_spec(images, tmp_path, "plain", steps=6)))
    assert EvalSession.evals == 0 and "eval" not in [e.kind for e in plain]
    assert "eval_first" not in plain[-1].data["summary"]
    assert np.array_equal(plain[-1].data["vectors"]["clip_l"], events[-1].data["vectors"]["clip_l"])


def test_a_running_run_holds_its_folder_and_a_second_resume_is_refused(images, tmp_path):
    from textinv_cli.engine.run_log import run_info

    spec = make_spec(images, tmp_path, steps=6)
    gen = NumpyBackend().train(spec)
    run = Path(spec.run_dir)
    for ev in gen:
        if ev.kind == "checkpoint":
            break
    assert runs.running_pid(run) == os.getpid() and run_info(run).status == "running"
    with pytest.raises(TextinvError, match="is training now"):
        list(NumpyBackend().train(TrainSpec.load(run), run))
    gen.close()  # killed: the lock goes with it
    assert runs.running_pid(run) is None and run_info(run).status == "failed"
    resumed = list(NumpyBackend().train(TrainSpec.load(run), run))
    info = run_info(run)
    assert info.status == "finished" and info.step == 6 and info.total == 6
    assert info.embedding == resumed[-1].data["embedding_path"]
    # the curve is the one the final rows went through: resumed at step 2, steps 3.. from the second session
    assert [s for s, _ in info.curve.loss] == [1, 2, 3, 4, 5, 6]
    assert info.last_loss == resumed[-1].data["summary"]["final_loss"]


class FailingSession(NumpySession):
    """The numpy session whose third step dies, as a backend does when a GPU runs out of memory."""

    def step(self, step, lr, stop, log):
        if step == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (token hf_" + "a" * 30 + ")")
        return super().step(step, lr, stop, log)


class FailingBackend(NumpyBackend):
    def open_session(self, spec):
        return FailingSession(spec, self.stop_after)


def test_a_run_that_dies_records_why_and_runs_shows_it(images, tmp_path, cli):
    from textinv_cli.engine.run_log import LOG_FILE, run_info

    spec = make_spec(images, tmp_path, steps=6)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(FailingBackend().train(spec))
    run = Path(spec.run_dir)
    info = run_info(run)
    assert info.status == "failed" and info.step == 2 and runs.running_pid(run) is None
    assert info.error.startswith("RuntimeError: CUDA out of memory.") and "hf_***" in info.error
    assert "hf_aaaa" not in (run / "events.jsonl").read_text()
    assert "failed after step 2: RuntimeError: CUDA out of memory." in (run / LOG_FILE).read_text()
    shown = cli("runs", "show", str(run))
    assert shown.exit_code == 0 and "Failed: RuntimeError: CUDA out of memory." in shown.stdout
    assert f"Continue it: textinv resume {run}" in shown.stdout
    resumed = list(NumpyBackend().train(TrainSpec.load(run), run))  # a later success is what counts
    assert resumed[-1].kind == "finished" and run_info(run).error is None and run_info(run).status == "finished"


def test_run_status_interrupted_and_new(images, tmp_path):
    from textinv_cli.engine.run_log import run_info

    backend = NumpyBackend()
    backend.stop_after = 3
    spec = make_spec(images, tmp_path)
    list(backend.train(spec))
    info = run_info(Path(spec.run_dir))
    assert info.status == "interrupted" and info.step == 3 and info.pid is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_info(empty).status == "new"


def test_report_to_tensorboard_writes_the_scalars(images, tmp_path, monkeypatch):
    from textinv_cli.engine import report_to

    written, closed = [], []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

        def close(self):
            closed.append(self.log_dir)

    monkeypatch.setattr(report_to, "_have_writer", lambda: True)
    monkeypatch.setattr(report_to, "_writer_class", lambda: Writer)
    spec = make_spec(images, tmp_path, steps=2, eval_every=2, report_to=["tensorboard"])
    events = list(EvalBackend().train(spec))
    assert ("train/loss", 1) in written and ("train/lr", 2) in written and ("eval/loss", 0) in written
    assert ("eval/loss", 2) in written
    assert closed == [str(Path(spec.run_dir) / "tensorboard")]
    assert events[-1].data["summary"]["tensorboard"] == closed[0]


def test_report_to_without_tensorboard_says_how_to_install_it(images, tmp_path, monkeypatch):
    from textinv_cli.engine import report_to
    from textinv_cli.errors import OptionError

    monkeypatch.setattr(report_to, "_have_writer", lambda: False)
    spec = make_spec(images, tmp_path, report_to=["tensorboard"])
    with pytest.raises(TextinvError, match="needs the TensorBoard writer") as e:
        list(NumpyBackend().train(spec))
    assert " -m pip install tensor" in e.value.hint and sys.executable in e.value.hint
    assert not Path(spec.run_dir).exists()  # refused before anything was written
    with pytest.raises(OptionError, match="--report-to wandb is not a known target"):
        list(NumpyBackend().train(make_spec(images, tmp_path, report_to=["wandb"])))
    with pytest.raises(OptionError, match="--eval-every must be 0 or more"):
        list(NumpyBackend().train(make_spec(images, tmp_path, eval_every=-1)))


def test_loss_readings_at_least_every_10_steps():
    from textinv_cli.engine.loop import is_log_step, log_interval

    assert log_interval(3000) == 10 and log_interval(200) == 4 and log_interval(7) == 1 and log_interval(9, 3) == 3
    assert [s for s in range(1, 3001) if is_log_step(s, 3000)][:3] == [10, 20, 30]
    assert [s for s in range(1, 11) if is_log_step(s, 10, 4)] == [4, 8, 10]


def test_a_spec_json_from_before_the_watch_options_still_loads(tmp_path):
    old = {"data_dir": "d", "token": TOKEN, "init": ["x"], "model": "tiny", "run_dir": str(tmp_path), "steps": 9,
           "extra": {"name": "x"}}
    (tmp_path / "spec.json").write_text(json.dumps(old))
    spec = TrainSpec.load(tmp_path)
    assert (spec.eval_every, spec.log_every, spec.report_to, spec.name) == (0, None, [], "x")
