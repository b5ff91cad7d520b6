"""Samplers by the names A1111 writes (engine/samplers.py): each name builds diffusers'
scheduler as diffusers' A1111 table says, PNG parameters blocks are read back
(`sample --params-from`), and the jax backend refuses the names it does not run before
any model loads."""

from __future__ import annotations

import importlib.util
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.support.a1111_samplers import A1111_SCHEDULERS
from textinv_cli.engine import checks, infotext, plugins, samplers
from textinv_cli.engine.spec import SampleRequest
from textinv_cli.errors import OptionError, TextinvError

HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None

EXPECTED = A1111_SCHEDULERS  # name -> (diffusers class, config that must hold)
OLD_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "dpm++": "DPM++ 2M", "unipc": "UniPC"}


def test_the_table_holds_the_names_a1111_writes():
    assert samplers.NAMES == tuple(EXPECTED) and checks.SCHEDULERS == samplers.KEYS
    for old, name in OLD_NAMES.items():  # today's names stay, as aliases
        assert samplers.get(old).name == name
    for spelling in ("euler a", "EULER A", "dpm++ 2m  karras", " DDIM ", "Dpm++ Sde Karras"):
        assert samplers.find(spelling) is not None, spelling
    assert samplers.find("DPM++ SDE") is None and samplers.find("plms") is None and samplers.find(None) is None
    assert len({s.key for s in samplers.TABLE}) == len(samplers.TABLE)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_name_builds_diffusers_scheduler(name):
    pytest.importorskip("diffusers")
    import diffusers
    from textinv_torch.sampling import make_scheduler

    model_config = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="v_prediction").config
    cls, config = EXPECTED[name]
    if samplers.get(name).needs and not HAS_TORCHSDE:
        with pytest.raises(TextinvError) as err:
            make_scheduler(name, model_config)
        assert "pip install torchsde" in err.value.hint
        return
    scheduler = make_scheduler(name.lower(), model_config)
    assert type(scheduler).__name__ == cls
    for key, value in config.items():
        assert scheduler.config[key] == value, key
    # the model's own betas and prediction type are kept
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "scaled_linear"


def test_unknown_names_are_refused_with_the_list():
    request = SampleRequest(prompt="a", model="tiny", out_dir="o", scheduler="k_dpm\x1b[31m_2")
    with pytest.raises(OptionError) as err:
        checks.check_sample_request(request)
    assert "Euler a, DPM++ 2M, DPM++ 2M Karras" in err.value.message and "\x1b" not in err.value.message


@pytest.mark.skipif(HAS_TORCHSDE, reason="torchsde is installed")
def test_dpm_sde_without_torchsde_is_refused_before_loading():
    request = SampleRequest(prompt="a", model="tiny", out_dir="o", scheduler="DPM++ SDE Karras")
    with pytest.raises(TextinvError) as err:
        checks.check_sample_request(request)
    assert "pip install torchsde" in err.value.hint


# -- reading parameters blocks back ------------------------------------------------------------

A1111_19 = ("a photo of <cat-toy>, on a \"table\"\nat dusk\nNegative prompt: blurry, bad\n"
            "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
            'Model hash: 6ce0161689, Model: v1-5, TI hashes: "cat-toy: 0123456789ab, x: 1", Version: v1.10.1')


def test_a1111_blocks_are_parsed_as_a1111_reads_them():
    prompt, negative, params = infotext.parse_infotext(A1111_19)
    assert prompt == 'a photo of <cat-toy>, on a "table"\nat dusk' and negative == "blurry, bad"
    assert params["TI hashes"] == "cat-toy: 0123456789ab, x: 1"
    found, problems = infotext.sample_options(A1111_19)
    assert problems == {}
    assert found == {"prompt": prompt, "negative": negative, "steps": 24, "scheduler": "DPM++ 2M Karras",
                     "guidance": 6.5, "seed": 1234, "width": 512, "height": 768}
    old = infotext.sample_options("x\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1, Size: 64x64")[0]
    assert old["scheduler"] == "DPM++ SDE Karras"
    assert infotext.sample_options("x\nSteps: 20, Sampler: Euler, Schedule type: Automatic, Seed: 1")[0][
        "scheduler"] == "Euler"
    # our own writer, read back
    written = infotext.infotext(SampleRequest(prompt="a: b, c", model="m", out_dir="", negative="n", steps=3,
                                              guidance=5.0, seed=9), seed=9, width=64, height=32,
                                model_name="m", sampler="DPM++ 2M Karras")
    assert infotext.sample_options(written) == ({"prompt": "a: b, c", "negative": "n", "steps": 3,
                                                 "scheduler": "DPM++ 2M Karras", "guidance": 5.0, "seed": 9,
                                                 "width": 64, "height": 32}, {})


def _png(text: str | None = None, *, chunk: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    meta = PngInfo()
    if text is not None:
        meta.add_text("parameters", text, zip=len(text) > 200)
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=meta)
    data = buf.getvalue()
    if chunk is not None:  # inserted right after IHDR (8 signature + 25 IHDR bytes)
        data = data[:33] + chunk + data[33:]
    return data


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_parameters_are_read_capped(tmp_path):
    ok = tmp_path / "ok.png"
    ok.write_bytes(_png(A1111_19))
    assert infotext.read_png_parameters(ok) == A1111_19
    long = "word " * 100 + "\nSteps: 2, Sampler: Euler, Seed: 3"
    (tmp_path / "z.png").write_bytes(_png(long))  # zTXt (PIL compresses with zip=True)
    assert infotext.read_png_parameters(tmp_path / "z.png") == long
    itxt = _chunk(b"iTXt", b"parameters\0\0\0\0\0" + "pr\u00f6mpt\nSteps: 1, Seed: 2, CFG scale: 3".encode())
    (tmp_path / "i.png").write_bytes(_png(chunk=itxt))
    assert infotext.read_png_parameters(tmp_path / "i.png").startswith("pr\u00f6mpt")

    huge = _chunk(b"tEXt", b"parameters\0" + b"a" * (infotext.PARAMS_MAX + 1))
    (tmp_path / "huge.png").write_bytes(_png(chunk=huge))
    with pytest.raises(TextinvError, match="at most"):
        infotext.read_png_parameters(tmp_path / "huge.png")
    bomb = _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * 50_000_000))
    (tmp_path / "bomb.png").write_bytes(_png(chunk=bomb))
    with pytest.raises(TextinvError, match="expands to more than"):
        infotext.read_png_parameters(tmp_path / "bomb.png")
    (tmp_path / "none.png").write_bytes(_png())
    with pytest.raises(TextinvError, match="no 'parameters' text chunk"):
        infotext.read_png_parameters(tmp_path / "none.png")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    with pytest.raises(TextinvError, match="not a PNG"):
        infotext.read_png_parameters(tmp_path / "x.jpg")


class _Captured(TextinvError):
    pass


@pytest.fixture
def captured(monkeypatch):
    """The SampleRequest `sample` builds, caught at its first check (nothing loads)."""
    seen = {}

    def capture(request, *a, **k):
        seen["request"] = request
        raise _Captured("captured")

    monkeypatch.setattr(checks, "check_sample_request", capture)
    return seen


def test_params_from_fills_what_the_command_line_leaves_out(cli, captured, tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(_png(A1111_19))
    cli("sample", "--params-from", png, "--seed", "7", "-o", tmp_path / "o")
    r = captured["request"]
    assert (r.prompt, r.negative, r.steps, r.scheduler, r.guidance, r.seed, r.width, r.height) == (
        'a photo of <cat-toy>, on a "table"\nat dusk', "blurry, bad", 24, "dpm++-karras", 6.5, 7, 512, 768)
    cli("sample", "my prompt", "--params-from", png, "--scheduler", "euler a", "--size", "64", "--steps", "3",
        "-o", tmp_path / "o")
    r = captured["request"]
    assert (r.prompt, r.negative, r.steps, r.scheduler, r.seed, r.width) == (
        "my prompt", "blurry, bad", 3, "euler-a", 1234, 64)


def test_params_from_refuses_unknown_samplers_escaped(cli, tmp_path):
    png = tmp_path / "evil.png"
    png.write_bytes(_png("p\nSteps: 2, Sampler: DPM adaptive\x1b[2J, CFG scale: 7, Seed: x1, Size: 64x64"))
    r = cli("sample", "--params-from", png)
    assert r.exit_code == 2 and "\x1b" not in r.output and "Traceback" not in r.output
    assert "DPM adaptive" in r.output and "DPM++ 2M Karras" in r.output and "Seed must be a number" in r.output
    assert "--scheduler" in r.output  # the way out: give it on the command line
    r = cli("sample", "--params-from", png, "--scheduler", "Euler", "--seed", "1", "--steps", "0")
    assert r.exit_code == 2 and "--steps must be at least 1" in r.output and "DPM adaptive" not in r.output


def test_prompt_or_params_from_is_required(cli):
    r = cli("sample")
    assert r.exit_code == 2 and "Missing argument 'PROMPT'" in r.output and "--params-from" in r.output


# -- the torch sampler with an A1111 name, and a picture reproduced from its PNG -----------------

def test_torch_euler_a_and_params_from_reproduce_the_picture(cli, tiny_model, tmp_path):
    pytest.importorskip("diffusers")
    from textinv_torch import sampling

    class InProcessTorch:  # the real torch sampler, without the entry point
        name = "torch"
        schedulers = samplers.NAMES

        def probe(self):
            return plugins.BackendInfo("torch", devices=["cpu"])

        def sample(self, request):
            return sampling.sample(request)

    model = str(tiny_model("sd1"))
    with plugins.registered("torch", InProcessTorch):
        r = cli("sample", "a red toy", "--scheduler", "Euler a", "--steps", "2", "--seed", "11", "--guidance", "5",
                "--negative", "blurry", "--model", model, "-o", tmp_path / "first")
        assert r.exit_code == 0, r.output
        first = tmp_path / "first" / "00000-11.png"
        assert "Sampler: Euler a, CFG scale: 5.0, Seed: 11" in infotext.read_png_parameters(first)
        r = cli("sample", "--params-from", first, "--model", model, "-o", tmp_path / "again")
        assert r.exit_code == 0, r.output
    again = tmp_path / "again" / "00000-11.png"
    assert infotext.read_png_parameters(again) == infotext.read_png_parameters(first)
    with Image.open(first) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


# -- the jax backend: A1111's names it does not run, refused before loading ---------------------

def test_jax_refuses_names_it_does_not_run_before_loading(cli, tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("jax")
    from textinv_jax.backend import JaxBackend

    class NoLoad(JaxBackend):
        def sample(self, request):
            raise AssertionError("loaded")

    monkeypatch.setattr("textinv_cli.models.resolve.resolve_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model resolved")))
    with plugins.registered("jax", NoLoad):
        r = cli("sample", "a toy", "--backend", "jax", "--scheduler", "Heun", "--model", tiny_model("sd1"),
                "-o", tmp_path / "o")
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert ("The jax backend samples with Euler, Euler a, DPM++ 2M, DPM++ 2M Karras or DDIM, not 'Heun'."
                in r.output)
        assert "Pass --scheduler Euler, or --backend torch" in r.output
        assert not (tmp_path / "o").exists()
    # the hint works: every name the jax backend runs (any spelling) passes its check
    for name in ("Euler", "euler", "Euler a", "euler-a", "DPM++ 2M", "dpm++", "DPM++ 2M Karras", "dpm++-2m-karras",
                 "DDIM", "ddim"):
        request = SampleRequest(prompt="a", model="tiny", out_dir="o", scheduler=name)
        checks.check_sample_request(request, JaxBackend())
    for name in ("DPM++ SDE Karras", "Heun", "LMS", "UniPC"):
        with pytest.raises(TextinvError, match="--backend torch"):
            checks.check_sample_request(SampleRequest(prompt="a", model="tiny", out_dir="o", scheduler=name),
                                        JaxBackend())
