"""Data parallel and sharded weights (--mesh) over many devices and hosts, on the CPU.

One process with 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, in a
subprocess: the flag only works before JAX starts) trains the steps one device trains:
batch 8 sharded one sample per device, rows replicated, gradient clipping on (it needs the
all-reduced gradient; accumulation is the same scan on any device count, compared with
torch in test_jax_parity_train). Two processes of 4 devices each, joined by jax.distributed
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: the multi-host path of a TPU
pod), each drawing its half of the same global batch, train it too, on a 4x2 mesh (each frozen
weight split over a pair of one host's devices). Another 8-device process trains on 4x2 and
2x4 meshes (textinv_jax/sharding.py). The losses and rows equal the single-device run's
to float tolerance; a resume on 8 devices is bit-identical, on a mesh too (from spec.json); a
batch that does not split over the devices, or a mesh that does not fit them, is refused
before a run folder exists; only process 0 writes; nothing imports torch. The subprocesses and the single-device reference (in this process) run at the same
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
pytestmark = pytest.mark.slow  # 8-device subprocesses: ~40 s of the suite

from textinv_jax.backend import JaxBackend, wants_distributed  # noqa: E402

SCRIPT = r"""
import json, os, shutil, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)  # quick compiles: these runs are 2 steps
from textinv_cli.errors import TextinvError
from textinv_cli.engine.spec import TrainSpec
from textinv_jax.backend import JaxBackend
from textinv_jax.sharding import device_bytes

args = json.loads(sys.argv[1])
root = args["root"]
JaxBackend().probe()  # as the CLI does first: joins jax.distributed where the environment says so

def spec(name, **kw):
    return TrainSpec(**{**args["spec"], "run_dir": os.path.join(root, name), **kw})

def summary(events):
    return {"started": {k: v for k, v in events[0].data.items() if k in ("device", "devices", "processes", "run_dir")},
            "losses": [e.data["loss"] for e in events if e.kind == "progress"],
            "rows": events[-1].data["vectors"]["clip_l"].tolist()}

kept = []  # the sessions, for what they placed where

class Keeping(JaxBackend):
    def open_session(self, spec):
        kept.append(super().open_session(spec))
        return kept[-1]

def placed(session):
    kernel = session.frozen["unet"]["down_blocks"][1]["resnets"][0]["conv2"]["kernel"]  # [3, 3, 64, 64]
    return {"kernel_spec": [str(a) for a in kernel.sharding.spec],
            "kernel_shards": sorted({str(s.index) for s in kernel.addressable_shards}),
            "rows_replicated": session.st[0]["clip_l"].sharding.is_fully_replicated,
            "unet_bytes": device_bytes(session.frozen["unet"]), "text_bytes": device_bytes(session.frozen["text_encoders"])}

out = {"device_count": jax.device_count(), "process": jax.process_index()}
if args["role"] == "host":  # each host plans its own folder name; process 0's is used
    # the weights split over pairs of one host's devices, the batch over both hosts' 8
    out["run"] = summary(list(Keeping().train(spec(f"hosts-{jax.process_index()}", batch_size=4, mesh="4x2"))))
    out["placed"] = placed(kept[-1])
elif args["role"] == "meshes":
    for mesh in args["meshes"]:  # the frozen weights split over 2 and 4 devices
        out[mesh] = summary(list(Keeping().train(spec(mesh, mesh=mesh))))
        out[mesh]["placed"] = placed(kept[-1])
    # the 4x2 run resumed from its step-1 checkpoint with the spec.json it wrote (as textinv resume does)
    again = os.path.join(root, "4x2-resumed")
    shutil.copytree(os.path.join(root, "4x2"), again)
    shutil.rmtree(os.path.join(again, "checkpoints", "step-000002"))
    os.remove(os.path.join(again, "learned_embeds.safetensors"))
    out["4x2 resumed"] = summary(list(JaxBackend().train(TrainSpec.load(again), again)))
    # and on another grid (textinv resume RUN --mesh 2x4): the checkpoint holds no layout
    other = os.path.join(root, "4x2-on-2x4")
    shutil.copytree(os.path.join(root, "4x2"), other)
    shutil.rmtree(os.path.join(other, "checkpoints", "step-000002"))
    os.remove(os.path.join(other, "learned_embeds.safetensors"))
    moved = TrainSpec.load(other)
    moved.mesh = "2x4"
    out["4x2 resumed on 2x4"] = summary(list(JaxBackend().train(moved, other)))
    for name, kw in {"3x2": {"mesh": "3x2"}, "1x7": {"mesh": "1x7", "devices": 7, "batch_size": 7}}.items():
        try:
            list(JaxBackend().train(spec(f"bad-{name}", **kw)))
        except TextinvError as e:
            out[f"bad {name}"] = str(e)
else:
    out["run"] = summary(list(Keeping().train(spec("many"))))
    out["run"]["placed"] = placed(kept[-1])
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


MESHES = ("4x2", "2x4")  # trained by an 8-device process of their own


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
    # "meshes" (the 4x2 and 2x4 runs) beside "many" (8x1): each compiles its own programs, on its own core
    roles = {role: {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"} for role in ("many", "meshes")}
    for pid in (0, 1):
        roles[f"host{pid}"] = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                               "JAX_PROCESS_ID": str(pid)}
    procs = {}
    for role, env in roles.items():
        arg = json.dumps({"spec": spec, "root": str(root), "role": "host" if role.startswith("host") else role,
                          "meshes": MESHES})
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
        assert h["run"]["started"] == {"device": "8 x cpu, mesh 4x2", "devices": 8, "processes": 2,
                                       "run_dir": str(runs["root"] / "hosts-0")}
        _close(h["run"], runs["one"])
        # each host holds both halves of a split weight (the model axis is within a host)
        assert h["placed"]["kernel_spec"][-1] == "model" and len(h["placed"]["kernel_shards"]) == 2
    assert hosts[0]["run"]["rows"] == hosts[1]["run"]["rows"]
    run = runs["root"] / "hosts-0"
    assert not (runs["root"] / "hosts-1").exists()
    lines = (run / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines].count("started") == 1  # written once, by process 0
    assert (run / "learned_embeds.safetensors").is_file() and (run / "checkpoints" / "step-000002").is_dir()


def test_meshes_4x2_and_2x4_train_what_one_device_trains(runs):
    # float tolerance, not bit-identity: a gathered weight is the same numbers, but the batch
    # mean and the gradient are summed over devices in another order, and XLA partitions the
    # convolutions differently (observed: rows within 1e-6, losses within 1 ulp or 2)
    for mesh in MESHES:
        run = runs["meshes"][mesh]
        assert run["started"]["device"] == f"8 x cpu, mesh {mesh}"
        print(f"\nmesh {mesh}: losses {run['losses']} 1 device {runs['one']['losses']}; rows max |diff| "
              f"{np.abs(np.array(run['rows']) - np.array(runs['one']['rows'])).max():.2e}")
        _close(run, runs["one"])


def test_a_mesh_splits_the_frozen_weights_over_its_model_axis(runs):
    placed = {"8x1": runs["many"]["run"]["placed"], **{m: runs["meshes"][m]["placed"] for m in MESHES}}
    assert placed["8x1"]["kernel_spec"] == [] and len(placed["8x1"]["kernel_shards"]) == 1  # whole on every device
    for mesh, model in (("4x2", 2), ("2x4", 4)):  # split on its output channels, one piece per model device
        assert placed[mesh]["kernel_spec"] == ["None", "None", "None", "model"]
        assert len(placed[mesh]["kernel_shards"]) == model
    assert all(p["rows_replicated"] for p in placed.values())
    print("\nfrozen UNet bytes per device " + ", ".join(f"{m} {p['unet_bytes']}" for m, p in placed.items()))
    for part in ("unet_bytes", "text_bytes"):
        assert placed["8x1"][part] > placed["4x2"][part] > placed["2x4"][part]


def test_a_mesh_resumes_from_spec_json_bit_identical(runs):
    again, first = runs["meshes"]["4x2 resumed"], runs["meshes"]["4x2"]
    assert again["started"]["device"] == "8 x cpu, mesh 4x2"
    assert again["rows"] == first["rows"] and again["losses"] == first["losses"][1:]


def test_a_run_continues_on_another_mesh(runs):
    moved, first = runs["meshes"]["4x2 resumed on 2x4"], runs["meshes"]["4x2"]
    assert moved["started"]["device"] == "8 x cpu, mesh 2x4"
    np.testing.assert_allclose(moved["losses"], first["losses"][1:], rtol=1e-5)
    np.testing.assert_allclose(moved["rows"], first["rows"], rtol=0, atol=1e-5)


def test_a_mesh_that_does_not_fit_is_refused_before_a_run_folder_exists(runs):
    assert runs["meshes"]["bad 3x2"].startswith("--mesh 3x2 needs 6 devices; this run has 8 cpu device(s).")
    assert "Pass --mesh with a grid of 8 devices: 8x1, 4x2, 2x4, 1x8" in runs["meshes"]["bad 3x2"]
    assert runs["meshes"]["bad 1x7"].startswith("--mesh 1x7: no weight of the UNet has a dimension divisible by 7")
    assert not (runs["root"] / "bad-3x2").exists() and not (runs["root"] / "bad-1x7").exists()


def test_resume_on_eight_devices_is_bit_identical(runs):
    assert runs["many"]["resumed"]["rows"] == runs["many"]["run"]["rows"]
    assert runs["many"]["resumed"]["losses"] == runs["many"]["run"]["losses"][1:]


def test_a_batch_that_does_not_split_is_refused(runs):
    assert "--batch-size 4 does not split evenly over the 8 cpu devices" in runs["many"]["odd"]
    assert not (runs["root"] / "odd").exists()


def test_the_jax_backend_never_imports_torch(runs):
    assert not any(runs[role]["torch_imported"] for role in ("many", "meshes", "host0", "host1"))


def test_when_jax_distributed_is_initialized():
    assert not wants_distributed({})
    assert not wants_distributed({"TPU_WORKER_HOSTNAMES": "localhost", "SLURM_NTASKS": "1"})
    assert wants_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert wants_distributed({"TPU_WORKER_HOSTNAMES": "t1,t2"})
    assert wants_distributed({"SLURM_NTASKS": "4"})
    assert wants_distributed({"TEXTINV_JAX_DISTRIBUTED": "1"})
