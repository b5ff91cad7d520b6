"""--mesh DATAxMODEL, in this process (no devices needed): the option's form and its backend
rule (engine/checks.py), spec.json keeping it, and the JAX partition rule
(textinv_jax/sharding.weight_spec) on real SD 1.5 and SDXL UNet shapes. The 8-device runs on
4x2 and 2x4 meshes are in test_jax_multidevice.py."""

from __future__ import annotations

import math

import pytest

from textinv_cli.engine.checks import check_train_backend, check_train_spec, parse_mesh
from textinv_cli.engine.contract import Backend
from textinv_cli.engine.spec import TrainSpec
from textinv_cli.errors import OptionError, TextinvError
from tests.support.training import train_spec


def test_the_option_is_data_by_model():
    assert parse_mesh("4x2") == (4, 2) and parse_mesh(" 2X4 ") == (2, 4) and parse_mesh("8x1") == (8, 1)
    for bad in ("4by2", "0x2", "4x0", "8", "x2", "4x2x1", "-4x2", "4.0x2", "", 8, None):
        with pytest.raises(OptionError, match="--mesh must be DATAxMODEL, two positive whole numbers"):
            parse_mesh(bad)
    with pytest.raises(OptionError, match="--mesh must be DATAxMODEL"):
        check_train_spec(train_spec("d", "m", "r", mesh="4by2"))
    check_train_spec(train_spec("d", "m", "r", mesh="4x2"))


def test_a_backend_that_does_not_declare_it_refuses_it():
    class Plain(Backend):
        name = "plain"

    with pytest.raises(TextinvError, match="--mesh 4x2 is for --backend jax"):
        check_train_backend(train_spec("d", "m", "r", mesh="4x2"), Plain())
    check_train_backend(train_spec("d", "m", "r"), Plain())  # no --mesh: nothing to refuse
    pytest.importorskip("jax")
    from textinv_jax.backend import JaxBackend

    check_train_backend(train_spec("d", "m", "r", mesh="4x2"), JaxBackend())


def test_spec_json_keeps_the_mesh_and_older_runs_have_none(tmp_path):
    spec = TrainSpec(data_dir="d", token="<t>", init=["toy"], model="m", run_dir="r", mesh="4x2")
    spec.save(tmp_path)
    assert TrainSpec.load(tmp_path).mesh == "4x2"
    data = spec.to_json()
    del data["mesh"]  # a spec.json written before --mesh existed
    assert TrainSpec.from_json(data).mesh is None


def _unet_weights(family_config):
    from flax import nnx

    from textinv_jax.layers import split
    from textinv_jax.unet import UNet2DConditionModel, unet_config

    model = nnx.eval_shape(lambda: UNet2DConditionModel(unet_config(family_config)))  # shapes only
    return split(model)[1]


@pytest.mark.parametrize("name", ["UNET_SD1", "UNET_SDXL"])
def test_the_rule_splits_nearly_all_of_a_real_unet(name):
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    from jax.sharding import PartitionSpec as P

    from textinv_cli.models.checkpoints import architectures
    from textinv_jax.sharding import MIN_SPLIT_BYTES, weight_spec

    leaves = jax.tree.leaves(_unet_weights(getattr(architectures, name)))
    total = sum(math.prod(a.shape) * 4 for a in leaves)
    for model in (2, 4, 8):
        specs = [weight_spec(tuple(a.shape), 4, model) for a in leaves]
        split = sum(math.prod(a.shape) * 4 for a, s in zip(leaves, specs) if s != P())
        assert split / total > 0.99, (model, split / total)  # the whole ones are norms, biases, conv_in/out
        for a, s in zip(leaves, specs):
            if s != P():  # one axis named, and that axis divides evenly
                (axis,) = [i for i, n in enumerate(s) if n == "model"]
                assert len(s) == len(a.shape) and a.shape[axis] % model == 0
            else:
                assert len(a.shape) < 2 or math.prod(a.shape) * 4 < MIN_SPLIT_BYTES or \
                    all(n % model for n in a.shape)


def test_the_rule_on_single_weights():
    pytest.importorskip("jax")
    from jax.sharding import PartitionSpec as P

    from textinv_jax.sharding import weight_spec

    assert weight_spec((3, 3, 320, 640), 4, 2) == P(None, None, None, "model")  # a conv: its output channels
    assert weight_spec((3, 3, 320, 320), 4, 2) == P(None, None, None, "model")  # a tie: the later axis
    assert weight_spec((768, 320), 4, 4) == P("model", None)          # a linear: its wider side
    assert weight_spec((49408, 768), 4, 8) == P("model", None)        # CLIP's token table: the vocabulary
    assert weight_spec((1280, 320), 4, 3) == P()                     # 3 divides neither side: whole
    assert weight_spec((1280,), 4, 2) == P()                          # a bias or norm scale
    assert weight_spec((3, 3, 32, 32), 4, 2) == P()                   # 36 KiB: whole
    assert weight_spec((3, 3, 320, 640), 4, 1) == P()                 # no model axis


def test_the_cli_refuses_a_malformed_mesh_before_a_backend_is_asked(cli, tmp_path, monkeypatch):
    from PIL import Image

    from textinv_cli.engine import plugins

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    monkeypatch.setattr(plugins, "require_backend", lambda *a: pytest.fail("a backend was asked for"))
    r = cli("train", tmp_path / "imgs", "--token", "<x>", "--init", "toy", "--mesh", "4by2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--mesh must be DATAxMODEL, two positive whole numbers, not '4by2'." in r.output
    assert "--mesh GRID jax: the devices as a DATAxMODEL grid" in " ".join(cli("train", "--help").output.split())


def test_resume_takes_another_mesh_checked_before_anything_loads(cli, tmp_path, monkeypatch):
    from textinv_cli.engine import plugins

    TrainSpec(data_dir="d", token="<t>", init=["toy"], model="m", run_dir=str(tmp_path), mesh="4x2").save(tmp_path)
    monkeypatch.setattr(plugins, "require_backend", lambda *a: pytest.fail("a backend was asked for"))
    r = cli("resume", tmp_path, "--mesh", "4by2")
    assert r.exit_code == 2 and "--mesh must be DATAxMODEL, two positive whole numbers, not '4by2'." in r.output
    assert "--mesh GRID jax: continue on another DATAxMODEL device grid" in " ".join(cli("resume", "--help").output.split())
