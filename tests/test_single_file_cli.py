"""Single-file checkpoints from the command line (#15): train -> sample from a .safetensors on both
backends (converted once, the second run says nothing of it), a --vae override (the pixels of a
diffusers folder holding that VAE), what spec.json, the embedding's metadata and the PNG
parameters record, an SD 2.x file that does not say its prediction (the hint runs as printed),
resume of a single-file run after its conversion was pruned, and `textinv models`.

The checkpoints are the tiny models written in the original (LDM) layout by tests/support/ldm_writer.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
from tests.support.ldm_writer import write_ldm_checkpoint, write_ldm_vae  # noqa: E402

STEM = "v1-5-pruned-emaonly"
SAMPLE = ("--steps", "2", "--size", "64", "--seed", "5")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    """A1111-style folders: Stable-diffusion/ with the tiny SD 1.x as v1-5-pruned-emaonly.safetensors
    and the tiny SD 2.x as v2-1_768-ema-pruned.safetensors; VAE/ with another tiny model's VAE."""
    from textinv_cli.models.resolve import make_tiny_model

    root = tmp_path_factory.mktemp("webui")
    models = root / "Stable-diffusion"
    models.mkdir()
    write_ldm_checkpoint(tiny_model("sd1"), models / f"{STEM}.safetensors")
    write_ldm_checkpoint(tiny_model("sd2"), models / "v2-1_768-ema-pruned.safetensors")
    other = make_tiny_model(root / "other-sd1", "sd1", seed=7)
    (root / "VAE").mkdir()
    write_ldm_vae(other, root / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors")
    return {"models": models, "sd1": models / f"{STEM}.safetensors", "sd2": models / "v2-1_768-ema-pruned.safetensors",
            "vae": root / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors", "other": other,
            "sd1_folder": tiny_model("sd1")}


def _pixels(folder: Path) -> np.ndarray:
    from PIL import Image

    (png,) = sorted(Path(folder).glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def _parameters(folder: Path) -> str:
    from PIL import Image

    (png,) = sorted(Path(folder).glob("*.png"))
    return Image.open(png).text["parameters"]


def _backend(name: str) -> None:
    if name == "jax":
        pytest.importorskip("jax")
        from textinv_jax.backend import JaxBackend

        info = JaxBackend().probe()
        if not info.available:
            pytest.skip(f"the jax backend cannot run here: {info.reason}")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_train_then_sample_from_a_single_file(cli, files, demo_images, tmp_path, backend, textinv_home):
    from textinv_cli.formats import read_embedding
    from textinv_cli.models.checkpoints.hashes import sha256_of

    _backend(backend)
    sha = sha256_of(files["sd1"])
    r = cli("train", demo_images, "--token", f"<sf-{backend}>", "--init", "toy", "--model", files["sd1"],
            "--steps", "1", "--backend", backend, "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    started = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[0])
    assert started["event"] == "started" and started["model"] == str(files["sd1"])  # the file, not its conversion
    assert "Converting" in r.stderr and any((textinv_home / "models" / "checkpoints").iterdir())
    spec = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert spec["model_file"] == str(files["sd1"]) and spec["model_sha256"] == sha and spec["prediction"] == "epsilon"
    assert Path(spec["model"]).is_dir() and spec["extra"]["model_name"] == str(files["sd1"])
    meta = read_embedding(tmp_path / "run" / "learned_embeds.safetensors").meta
    assert meta["base_model"] == str(files["sd1"])
    assert (meta["sd_checkpoint"], meta["sd_checkpoint_name"]) == (sha[:10], STEM)  # A1111's fields
    # the closing hint samples on the model it was trained on (the default is the tiny model)
    (try_line,) = [line for line in r.stdout.splitlines() if line.startswith("Try: ")]
    assert try_line == f"Try: textinv sample 'a photo of <sf-{backend}>' --model {files['sd1']}"
    if backend == "torch":  # as printed (the jax case costs a compile more and proves nothing new)
        command = shlex.split(try_line.removeprefix("Try: textinv "))
        tried = cli(*command, "-o", tmp_path / "tried")
        assert tried.exit_code == 0, tried.output

    r = cli("sample", f"a <sf-{backend}>", "--model", files["sd1"], *SAMPLE, "--backend", backend,
            "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "Converting" not in r.stderr  # converted once, by train
    assert "is not in the Hugging Face cache" not in r.output
    assert f"Model hash: {sha[:10]}, Model: {STEM}," in _parameters(tmp_path / "out")
    assert f"with {STEM} on" in r.stdout
    _check_vae_override(cli, files, tmp_path, f"a <sf-{backend}>", ("--backend", backend))


def _check_vae_override(cli, files, tmp_path, prompt: str = "a cat", options=()) -> None:
    """sample --vae draws other pixels than the file's own VAE, the same as a diffusers folder
    whose vae/ is that VAE (the tiny SD 1.x converted from the file, other-sd1's vae/)."""
    r = cli("sample", prompt, "--model", files["sd1"], "--vae", files["vae"], *SAMPLE, *options, "-o", tmp_path / "vae")
    assert r.exit_code == 0, r.output
    assert cli("sample", prompt, "--model", files["sd1"], *SAMPLE, *options, "-o", tmp_path / "own").exit_code == 0
    swapped = tmp_path / "swapped"
    shutil.copytree(files["sd1_folder"], swapped)
    shutil.rmtree(swapped / "vae")
    shutil.copytree(files["other"] / "vae", swapped / "vae")
    assert cli("sample", prompt, "--model", swapped, *SAMPLE, *options, "-o", tmp_path / "folder").exit_code == 0
    with_vae = _pixels(tmp_path / "vae")
    assert not np.array_equal(with_vae, _pixels(tmp_path / "own"))
    assert np.array_equal(with_vae, _pixels(tmp_path / "folder"))


def test_the_first_use_says_the_conversion_and_a_file_samples_as_its_folder(cli, files, tiny_model, tmp_path):
    r = cli("sample", "a cat", "--model", files["sd1"], *SAMPLE, "-o", tmp_path / "file")
    assert r.exit_code == 0, r.output
    assert f"Converting {STEM}.safetensors (Stable Diffusion 1.x) to a diffusers folder once, cached under" in r.stderr
    assert cli("sample", "a cat", "--model", tiny_model("sd1"), *SAMPLE, "-o", tmp_path / "folder").exit_code == 0
    assert np.array_equal(_pixels(tmp_path / "file"), _pixels(tmp_path / "folder"))
    os.utime(files["sd1"], ns=(10**18, 10**18))  # touched: the remembered hash is stale, the conversion is not
    r = cli("sample", "a cat", "--model", files["sd1"], *SAMPLE, "-o", tmp_path / "touched")
    assert r.exit_code == 0, r.output
    assert f"Hashing {STEM}.safetensors (new to textinv, or changed since)" in r.stderr and "Converting" not in r.stderr


@pytest.mark.parametrize("family, more", [("sd2", ("--prediction", "v")), ("sdxl", ())])
def test_sd2_and_sdxl_files_sample_as_their_folders(cli, tiny_model, tmp_path, family, more):
    write_ldm_checkpoint(tiny_model(family), tmp_path / f"{family}.ckpt")  # a torch.save .ckpt, read by seeking
    r = cli("sample", "a cat", "--model", tmp_path / f"{family}.ckpt", *more, *SAMPLE, "-o", tmp_path / "file")
    assert r.exit_code == 0, r.output
    assert cli("sample", "a cat", "--model", tiny_model(family), *SAMPLE, "-o", tmp_path / "folder").exit_code == 0
    assert np.array_equal(_pixels(tmp_path / "file"), _pixels(tmp_path / "folder"))


def test_a_file_without_a_vae_takes_one(cli, files, tiny_model, tmp_path):
    write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "no-vae.safetensors", vae=False)
    r = cli("sample", "a cat", "--model", tmp_path / "no-vae.safetensors", *SAMPLE, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "--vae FILE" in r.stderr, r.output
    r = cli("sample", "a cat", "--model", tmp_path / "no-vae.safetensors", "--vae", files["vae"], *SAMPLE,
            "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output


def test_a_vae_override_draws_what_a_folder_with_that_vae_draws(cli, files, tiny_model, tmp_path):
    from textinv_cli.models.checkpoints.hashes import sha256_of

    _check_vae_override(cli, files, tmp_path)
    with_vae = _pixels(tmp_path / "vae")
    params = _parameters(tmp_path / "vae")
    assert f"VAE hash: {sha256_of(files['vae'])[:10]}, VAE: vae-ft-mse-840000-ema-pruned.safetensors" in params

    # a diffusers folder takes a VAE file too; --params-from says which VAE the picture used
    png = next((tmp_path / "vae").glob("*.png"))
    r = cli("sample", "--params-from", png, "--model", tiny_model("sd1"), "--vae", files["vae"], "-o", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert np.array_equal(_pixels(tmp_path / "again"), with_vae)
    r = cli("sample", "--params-from", png, "--model", tiny_model("sd1"), "-o", tmp_path / "noted")
    assert r.exit_code == 0 and "made with the VAE vae-ft-mse-840000-ema-pruned.safetensors" in r.stderr


def test_an_sd2_file_without_its_prediction_says_the_command(cli, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(files["sd2"], tmp_path / "v2.safetensors")
    r = cli("sample", "a cat", "--model", "v2.safetensors", "--steps", "1", "--size", "64", "-o", "out")
    assert r.exit_code == 1 and "does not say whether it predicts" in r.stderr, r.output
    assert not (tmp_path / "out").exists()
    command = re.search(r"run: (textinv .*?--prediction v) \(", r.stderr).group(1)
    r = cli(*shlex.split(command)[1:])
    assert r.exit_code == 0, r.output
    # kohya's flag means the same
    r = cli("sample", "a cat", "--model", "v2.safetensors", "--steps", "1", "--size", "64", "-o", "out2",
            "--v_parameterization")
    assert r.exit_code == 0, r.output
    r = cli("sample", "a cat", "--prediction", "v", "--steps", "1", "-o", "out3")  # a folder says its own
    assert r.exit_code == 2 and "--prediction is for single-file checkpoints" in r.stderr
    assert cli("sample", "a cat", "--prediction", "x").exit_code == 2


def test_resume_of_a_single_file_run_after_a_prune(cli, files, demo_images, tmp_path, monkeypatch):
    from textinv_cli.engine import plugins

    real = plugins.require_backend

    class CtrlC:  # Ctrl-C once the first step is reported, as from a terminal
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def train(self, *a, **k):
            for event in self._backend.train(*a, **k):
                if event.kind == "progress":
                    os.kill(os.getpid(), signal.SIGINT)
                yield event

    monkeypatch.setattr(plugins, "require_backend", lambda *a, **k: CtrlC(real(*a, **k)))
    r = cli("train", demo_images, "--token", "<sf-resume>", "--init", "toy", "--model", files["sd1"], "--vae",
            files["vae"], "--steps", "3", "--checkpoint-every", "1", "--run-dir", tmp_path / "run")
    assert r.exit_code == 130 and "textinv resume" in r.output, r.output
    monkeypatch.setattr(plugins, "require_backend", real)
    spec = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert spec["vae"] == str(files["vae"]) and spec["vae_sha256"]
    assert cli("models", "--prune").exit_code == 0
    assert not Path(spec["model"]).exists()
    r = cli("resume", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "Registered as sf-resume" in r.stdout and Path(spec["model"]).is_dir()  # made again, same place


def test_models_lists_hashes_conversions_and_prunes(cli, files, tmp_path, monkeypatch):
    from textinv_cli.models.checkpoints.hashes import sha256_of

    monkeypatch.setenv("TEXTINV_MODEL_DIRS", str(files["models"]))
    r = cli("models")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(STEM))
    assert "SD 1.x" in line and sha256_of(files["sd1"])[:10] in line
    assert "v2-1_768-ema-pruned" in r.stdout and f"Hashing {STEM}.safetensors" in r.stderr
    assert "Hashing" not in cli("models").stderr  # remembered: the second listing reads no file whole
    (tmp_path / "new.safetensors").write_bytes(files["sd1"].read_bytes())
    shutil.move(tmp_path / "new.safetensors", files["models"] / "new.safetensors")  # never hashed
    quick = json.loads(cli("models", "--no-hash", "--json").stdout)["models"]
    assert {m["name"]: m["short_hash"] for m in quick}["new"] is None  # --no-hash reads no file whole...
    assert {m["name"]: m["short_hash"] for m in quick}[STEM] == sha256_of(files["sd1"])[:10]  # ...known ones shown
    (files["models"] / "new.safetensors").unlink()
    r = cli("sample", "a cat", "--model", STEM, *SAMPLE, "-o", tmp_path / "out")  # found by name
    assert r.exit_code == 0, r.output
    png = next((tmp_path / "out").glob("*.png"))  # its Model is found in the folders again
    r = cli("sample", "--params-from", png, "-o", tmp_path / "again")
    assert r.exit_code == 0 and f"Model {STEM} (Model hash {sha256_of(files['sd1'])[:10]}) is" in r.stderr, r.output
    assert np.array_equal(_pixels(tmp_path / "again"), _pixels(tmp_path / "out"))
    listed = json.loads(cli("models", "--json").stdout)
    mine = next(m for m in listed["models"] if m["name"] == STEM)
    assert mine["family"] == "sd1" and mine["short_hash"] == sha256_of(files["sd1"])[:10] and mine["converted"]
    assert mine["size"] == files["sd1"].stat().st_size and listed["model_dirs"][0]["exists"]
    r = cli("models", "--prune")
    assert r.exit_code == 0 and r.stdout.startswith("Freed ") and "cached conversion" in r.stdout
    assert not json.loads(cli("models", "--json").stdout)["conversions"]
    assert cli("models", "--prune").stdout.strip() == "No cached conversions to free."


def test_a_family_mismatch_is_refused_before_converting(cli, files, demo_images, tmp_path, textinv_home):
    from textinv_cli import formats
    from tests.support.helpers import random_embedding

    formats.write_embedding(random_embedding("<xl-toy>", family="sdxl", seed=1), tmp_path / "xl.safetensors", "kohya")
    assert cli("import", tmp_path / "xl.safetensors", "--name", "xl-toy").exit_code == 0
    r = cli("train", demo_images, "--from", "xl-toy", "--model", files["sd1"], "--steps", "1",
            "--run-dir", tmp_path / "run")
    assert r.exit_code == 1 and f"{STEM}.safetensors is Stable Diffusion 1.x" in r.stderr, r.output
    r = cli("sample", "a <xl-toy>", "--model", files["sd1"], "-o", tmp_path / "out")
    assert r.exit_code == 1 and "<xl-toy> is a Stable Diffusion XL embedding" in r.stderr, r.output
    assert "Converting" not in r.stderr and not (textinv_home / "models" / "checkpoints").exists()


def test_a_folder_trained_with_a_vae_records_the_folder(cli, files, tiny_model, demo_images, tmp_path):
    from textinv_cli.formats import read_embedding

    r = cli("train", demo_images, "--token", "<vae-toy>", "--init", "toy", "--model", tiny_model("sd1"), "--vae",
            files["vae"], "--steps", "1", "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert spec["vae"] == str(files["vae"]) and spec["model_file"] is None and "views" in spec["model"]
    meta = read_embedding(tmp_path / "run" / "learned_embeds.safetensors").meta
    assert meta["base_model"] == str(Path(tiny_model("sd1")).resolve()) and "sd_checkpoint" not in meta
    shown = cli("runs", "show", tmp_path / "run").stdout  # the settings name the VAE the run used
    assert f"vae {files['vae']}" in shown and "clip-skip" not in shown
