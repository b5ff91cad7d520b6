"""Data parallel over many devices and hosts, on the CPU.

One process with 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, in a
subprocess: the flag only works before JAX starts) trains the steps one device trains:
batch 8 sharded one sample per device, rows replicated, gradient clipping on (it needs the
all-reduced gradient; accumulation is the same scan on any device count, compared with
torch in test_jax_parity_train). Two processes of 4 devices each, joined by jax.distributed
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: the multi-host path of a TPU
pod), each drawing its half of the same global batch, train it too. The losses and rows equal the single-device run's
to float tolerance; a resume on 8 devices is bit-identical; a batch that does not split over
the devices is refused before a run folder exists; only process 0 writes; nothing imports
torch. The subprocesses and the single-device reference (in this process) run at the same
time: each compiles its own program, and compiling is one core's work.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from textinv_cli.engine.spec import TrainSpec

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

from textinv_jax.backend import JaxBackend, wants_distributed  # noqa: E402

SCRIPT = r"""
import json, os, shutil, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)  # quick compiles: these runs are 2 steps
from textinv_cli.errors import TextinvError
from textinv_cli.engine.spec import TrainSpec
from textinv_jax.backend import JaxBackend

args = json.loads(sys.argv[1])
root = args["root"]
JaxBackend().probe()  # as the CLI does first: joins jax.distributed where the environment says so

def spec(name, **kw):
    return TrainSpec(**{**args["spec"], "run_dir": os.path.join(root, name), **kw})

def summary(events):
    return {"started": {k: v for k, v in events[0].data.items() if k in ("device", "devices", "processes", "run_dir")},
            "losses": [e.data["loss"] for e in events if e.kind == "progress"],
            "rows": events[-1].data["vectors"]["clip_l"].tolist()}

out = {"device_count": jax.device_count(), "process": jax.process_index()}
if args["role"] == "host":  # each host plans its own folder name; process 0's is used
    out["run"] = summary(list(JaxBackend().train(spec(f"hosts-{jax.process_index()}", batch_size=4))))
else:
    out["run"] = summary(list(JaxBackend().train(spec("many"))))
    # the run as a crash after its step-1 checkpoint would leave it, resumed on all 8 devices
    shutil.copytree(os.path.join(root, "many"), os.path.join(root, "resumed"))
    shutil.rmtree(os.path.join(root, "resumed", "checkpoints", "step-000002"))
    os.remove(os.path.join(root, "resumed", "learned_embeds.safetensors"))
    out["resumed"] = summary(list(JaxBackend().train(spec("many"), os.path.join(root, "resumed"))))
    try:
        list(JaxBackend().train(spec("odd", batch_size=4, grad_accum=1)))
    except TextinvError as e:
        out["odd"] = str(e)
out["torch_imported"] = "torch" in sys.modules
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model, demo_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("multidevice")
    spec = dict(data_dir=str(demo_images), token="<cat-toy>", init=["toy"], model=str(tiny_model("sd1")),
                backend="jax", steps=2, batch_size=8, checkpoint_every=1, seed=5, lr=5e-2,
                max_grad_norm=0.05)  # clipping sees the all-reduced gradient
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TEXTINV_HOME": str(root / "home")}
    port = free_port()
    roles = {"many": {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}}
    for pid in (0, 1):
        roles[f"host{pid}"] = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                               "JAX_PROCESS_ID": str(pid)}
    procs = {}
    for role, env in roles.items():
        arg = json.dumps({"spec": spec, "root": str(root), "role": "host" if role.startswith("host") else role})
        procs[role] = subprocess.Popen([sys.executable, "-c", SCRIPT, arg], env={**base, **env},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the single-device reference, here, while the others run
        before = jax.config.values["jax_disable_most_optimizations"]
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            events = list(JaxBackend().train(TrainSpec(**spec, run_dir=str(root / "one"))))
        finally:
            jax.config.update("jax_disable_most_optimizations", before)
        out = {"one": {"started": events[0].data, "losses": [e.data["loss"] for e in events if e.kind == "progress"],
                       "rows": events[-1].data["vectors"]["clip_l"].tolist()}}
        for role, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{role}: {stderr[-4000:]}"
            out[role] = json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    out["root"] = root
    return out


def _close(a, b):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    np.testing.assert_allclose(a["rows"], b["rows"], rtol=0, atol=1e-5)


def test_eight_devices_train_what_one_device_trains(runs):
    many, one = runs["many"]["run"], runs["one"]
    assert runs["many"]["device_count"] == 8
    assert many["started"] == {"device": "8 x cpu", "devices": 8, "run_dir": str(runs["root"] / "many")}
    assert one["started"]["device"] == "cpu" and "devices" not in one["started"]
    print(f"\nlosses 8 devices {many['losses']} 1 device {one['losses']}; rows max |diff| "
          f"{np.abs(np.array(many['rows']) - np.array(one['rows'])).max():.2e}")
    _close(many, one)
    assert many["losses"][0] != many["losses"][1]  # two different steps were taken


def test_two_hosts_train_what_one_device_trains_and_only_process_0_writes(runs):
    hosts = [runs["host0"], runs["host1"]]
    assert [h["process"] for h in hosts] == [0, 1] and all(h["device_count"] == 8 for h in hosts)
    for h in hosts:  # both hosts use process 0's folder, and end with the same rows
        assert h["run"]["started"] == {"device": "8 x cpu", "devices": 8, "processes": 2,
                                       "run_dir": str(runs["root"] / "hosts-0")}
        _close(h["run"], runs["one"])
    assert hosts[0]["run"]["rows"] == hosts[1]["run"]["rows"]
    run = runs["root"] / "hosts-0"
    assert not (runs["root"] / "hosts-1").exists()
    lines = (run / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines].count("started") == 1  # written once, by process 0
    assert (run / "learned_embeds.safetensors").is_file() and (run / "checkpoints" / "step-000002").is_dir()


def test_resume_on_eight_devices_is_bit_identical(runs):
    assert runs["many"]["resumed"]["rows"] == runs["many"]["run"]["rows"]
    assert runs["many"]["resumed"]["losses"] == runs["many"]["run"]["losses"][1:]


def test_a_batch_that_does_not_split_is_refused(runs):
    assert "--batch-size 4 does not split evenly over the 8 cpu devices" in runs["many"]["odd"]
    assert not (runs["root"] / "odd").exists()


def test_the_jax_backend_never_imports_torch(runs):
    assert not any(runs[role]["torch_imported"] for role in ("many", "host0", "host1"))


def test_when_jax_distributed_is_initialized():
    assert not wants_distributed({})
    assert not wants_distributed({"TPU_WORKER_HOSTNAMES": "localhost", "SLURM_NTASKS": "1"})
    assert wants_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert wants_distributed({"TPU_WORKER_HOSTNAMES": "t1,t2"})
    assert wants_distributed({"SLURM_NTASKS": "4"})
    assert wants_distributed({"TEXTINV_JAX_DISTRIBUTED": "1"})
