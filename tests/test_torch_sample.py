"""`textinv sample` end to end on the tiny models (CPU, 64x64, 2 denoising steps).

The CLI reaches the sampler through an in-process backend registered as "torch", so these
tests need neither an installed entry point nor the rest of the torch backend.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from PIL import Image

from textinv_cli.embedding import Embedding
from textinv_cli.engine import plugins
from textinv_cli.engine.batch_sizes import batches, pick_batch_size
from textinv_cli.engine.spec import EmbeddingRef, SampleRequest
from textinv_cli.errors import TextinvError
from textinv_cli.models.tiny import TINY_WIDTHS
from textinv_cli.registry.store import Registry

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from textinv_torch import sampling, tokens  # noqa: E402
from textinv_torch.tiny import write_tiny_model  # noqa: E402

SLOTS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
A1111_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "dpm++": "DPM++ 2M", "unipc": "UniPC"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The three tiny models, built once; folder names are what messages call them."""
    root = tmp_path_factory.mktemp("models")
    return {fam: str(write_tiny_model(root / f"tiny-{fam}", fam)) for fam in ("sd1", "sd2", "sdxl")}


class InProcessTorch:
    """Stands in for TorchBackend: sample() is the real sampler; records the requests."""

    name = "torch"

    def __init__(self):
        self.requests = []

    def probe(self):
        return plugins.BackendInfo("torch", version=torch.__version__, devices=["cpu"])

    def train(self, spec, resume=None):
        raise NotImplementedError

    def sample(self, request):
        self.requests.append(request)
        return sampling.sample(request)


@pytest.fixture
def backend():
    inst = InProcessTorch()
    with plugins.registered("torch", lambda: inst):
        yield inst


def vectors(family: str, n: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {s: (rng.standard_normal((n, TINY_WIDTHS[s])) * 0.5).astype(np.float32) for s in SLOTS[family]}


def add(token: str, family: str = "sd1", n: int = 1, seed: int = 0, meta: dict | None = None):
    entry, created = Registry().add(Embedding(token, vectors(family, n, seed), meta or {}),
                                    source="imported", origin={})
    assert created
    return entry


def parameters(path) -> str:
    with Image.open(path) as im:
        return im.info["parameters"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def sample_args(model, out, *extra):
    return ["sample", *extra, "--model", model, "-o", out, "--steps", "2"]


# -- the CLI on each family ------------------------------------------------------------------

def test_sd1_one_embedding_writes_png_with_a1111_parameters(cli, backend, models, tmp_path):
    entry = add("<cat-toy>")
    out = tmp_path / "samples"
    r = cli(*sample_args(models["sd1"], out, "A <cat-toy>, backpack", "--seed", "1234", "-n", "2",
                         "--negative", "blurry, ugly"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["00000-1234.png", "00001-1235.png"]
    assert "Wrote" in r.output and "00001-1235.png" in r.output
    text = parameters(out / "00000-1234.png")
    prompt, negative, params = text.split("\n")
    assert prompt == "A <cat-toy>, backpack"
    assert negative == "Negative prompt: blurry, ugly"
    assert params.startswith("Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model: tiny-sd1, ")
    assert f'TI hashes: "cat-toy: {entry.sha256[:12]}"' in params
    assert params.endswith("Version: textinv 0.1.0")
    assert "Seed: 1235" in parameters(out / "00001-1235.png")
    (req,) = backend.requests
    assert [(e.token, e.name, e.vectors["clip_l"].shape) for e in req.embeddings] == [("<cat-toy>", "cat-toy", (1, 32))]

    # Numbering continues after the files already there, as A1111 does.
    r = cli(*sample_args(models["sd1"], out, "A <cat-toy> backpack", "--seed", "7"))
    assert r.exit_code == 0, r.output
    assert (out / "00002-7.png").is_file()


def test_ti_hash_is_the_original_files_sha256(cli, backend, models, tmp_path):
    file_sha = "ab12" * 16
    add("<cat-toy>", meta={"file_sha256": file_sha})
    r = cli(*sample_args(models["sd1"], tmp_path, "A <cat-toy>"))
    assert r.exit_code == 0, r.output
    assert 'TI hashes: "cat-toy: ab12ab12ab12"' in parameters(tmp_path / "00000-0.png")


def test_two_embeddings_one_multi_vector(cli, backend, models, tmp_path):
    cat, style = add("<cat-toy>", n=1, seed=1), add("<ink-style>", n=3, seed=2)
    r = cli(*sample_args(models["sd1"], tmp_path, "A <cat-toy> in <ink-style> style", "--json"))
    assert r.exit_code == 0, r.output
    started = json.loads(r.stdout.splitlines()[0])
    assert started["embeddings"] == [{"name": "cat-toy", "token": "<cat-toy>", "vectors": 1},
                                     {"name": "ink-style", "token": "<ink-style>", "vectors": 3}]
    params = parameters(tmp_path / "00000-0.png").splitlines()[-1]
    assert f'TI hashes: "cat-toy: {cat.sha256[:12]}, ink-style: {style.sha256[:12]}"' in params


def test_sd2_embedding_on_sd2_model(cli, backend, models, tmp_path):
    add("<wide>", "sd2", n=2)
    r = cli(*sample_args(models["sd2"], tmp_path, "a <wide> house", "--scheduler", "euler"))
    assert r.exit_code == 0, r.output
    assert "Model: tiny-sd2" in parameters(tmp_path / "00000-0.png")
    assert backend.requests[0].embeddings[0].vectors["clip_h"].shape == (2, 48)


def test_sdxl_embedding_loads_clip_l_and_clip_g(cli, backend, models, tmp_path):
    add("<xl-toy>", "sdxl", n=2)
    r = cli(*sample_args(models["sdxl"], tmp_path, "a <xl-toy> on a shelf", "--size", "64x48"))
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "00000-0.png") as im:
        assert im.size == (64, 48)
    assert "Size: 64x48" in parameters(tmp_path / "00000-0.png")
    assert set(backend.requests[0].embeddings[0].vectors) == {"clip_l", "clip_g"}


@pytest.mark.parametrize("scheduler", list(A1111_SAMPLERS))
def test_each_scheduler_produces_an_image(cli, backend, models, tmp_path, scheduler):
    r = cli(*sample_args(models["sd1"], tmp_path, "a red toy", "--scheduler", scheduler))
    assert r.exit_code == 0, r.output
    path = tmp_path / "00000-0.png"
    assert f"Sampler: {A1111_SAMPLERS[scheduler]}," in parameters(path)
    assert pixels(path).std() > 0  # an image, not a blank canvas
    assert "TI hashes" not in parameters(path)  # no embedding used, none listed


def test_json_events(cli, backend, models, tmp_path):
    add("<cat-toy>")
    r = cli(*sample_args(models["sd1"], tmp_path, "A <cat-toy>", "-n", "3", "--batch-size", "2", "--json"))
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    # a batch of 2 (one pipeline call: its steps, then its 2 images), then a batch of 1
    assert kinds == ["started", "progress", "progress", "sample", "sample", "progress", "progress", "sample",
                     "finished"]
    assert events[0]["total"] == 6 and events[0]["device"] == "cpu" and events[0]["sampler"] == "DDIM"
    assert events[0]["batch_size"] == 2
    progress = [e for e in events if e["event"] == "progress"]
    assert [(e["image"], e["batch"], e["done"]) for e in progress] == [(0, 2, 2), (0, 2, 4), (2, 1, 5), (2, 1, 6)]
    samples = [e for e in events if e["event"] == "sample"]
    assert [(s["index"], s["seed"]) for s in samples] == [(0, 0), (1, 1), (2, 2)]
    assert events[-1]["paths"] == [s["path"] for s in samples]


def test_default_batch_holds_all_images_up_to_eight_at_512():
    assert pick_batch_size(3, None, 64, 64) == 3  # the tiny model: all at once
    assert pick_batch_size(20, None, 512, 512) == 8
    assert pick_batch_size(20, None, 768, 768) == 3 and pick_batch_size(20, None, 1024, 1024) == 2
    assert pick_batch_size(20, None, 4096, 4096) == 1
    assert pick_batch_size(3, 5, 512, 512) == 3 and pick_batch_size(9, 4, 1024, 1024) == 4  # asked: as asked, <= n
    assert batches(5, 2) == [(0, 2), (2, 2), (4, 1)] and batches(2, 8) == [(0, 2)]


# Batched kernels round differently from single-image ones; on the CPU the 8-bit pixels of
# the same image alone and in a batch differ by at most 1 (measured), another seed by ~200.
SAME_IMAGE_ATOL = 3


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])  # euler-a draws fresh noise every step
def test_each_image_is_the_same_alone_or_in_a_batch(cli, backend, models, tmp_path, scheduler):
    add("<cat-toy>")
    args = ("A <cat-toy>", "--scheduler", scheduler)
    r = cli(*sample_args(models["sd1"], tmp_path / "b", *args, "--seed", "5", "-n", "3", "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["batch_size"] == 3  # the default: all 3 in one pipeline call
    batched = sorted((tmp_path / "b").iterdir())
    assert [p.name for p in batched] == ["00000-5.png", "00001-6.png", "00002-7.png"]
    for i, path in enumerate(batched):
        assert f"Seed: {5 + i}, " in parameters(path)  # each PNG's infotext names its own seed
        alone = tmp_path / f"alone-{i}"
        assert cli(*sample_args(models["sd1"], alone, *args, "--seed", str(5 + i))).exit_code == 0
        diff = np.abs(pixels(path).astype(int) - pixels(alone / f"00000-{5 + i}.png").astype(int))
        assert diff.max() <= SAME_IMAGE_ATOL, (i, diff.max())
    assert np.abs(pixels(batched[0]).astype(int) - pixels(batched[1]).astype(int)).max() > 10 * SAME_IMAGE_ATOL


def test_same_seed_same_pixels(cli, backend, models, tmp_path):
    add("<cat-toy>")
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(*sample_args(models["sd1"], a, "A <cat-toy>", "--seed", "5", "-n", "2")).exit_code == 0
    assert cli(*sample_args(models["sd1"], b, "A <cat-toy>", "--seed", "5", "-n", "2")).exit_code == 0
    for name in ("00000-5.png", "00001-6.png"):
        assert np.array_equal(pixels(a / name), pixels(b / name))
    assert not np.array_equal(pixels(a / "00000-5.png"), pixels(a / "00001-6.png"))


# -- refusals ---------------------------------------------------------------------------------

def test_unknown_token_lists_close_names(cli, backend, models, tmp_path):
    add("<cat-toy>")
    r = cli(*sample_args(models["sd1"], tmp_path, "A <cat-tyo> backpack"))
    assert r.exit_code == 1
    assert "Unknown embedding <cat-tyo> in the prompt." in r.output
    assert "Did you mean: <cat-toy>" in r.output and "textinv list" in r.output
    assert backend.requests == [] and not any(tmp_path.iterdir())


def test_family_mismatch_is_refused_before_the_backend(cli, backend, models, tmp_path):
    add("<wide>", "sd2")
    r = cli(*sample_args(models["sd1"], tmp_path, "a <wide> house"))
    assert r.exit_code == 1
    assert "<wide> is a Stable Diffusion 2.x embedding but tiny-sd1 is Stable Diffusion 1.x." in r.output
    assert backend.requests == []


def test_backend_checks_widths_itself(models, tmp_path):
    """What a Hub model gets, whose family the CLI cannot read: the loaded encoders decide."""
    def run(family, **kw):
        ref = EmbeddingRef("<x>", kw.get("vectors") or vectors(family), "0" * 12, "x")
        req = SampleRequest(prompt="a <x>", model=models["sd1"], out_dir=str(tmp_path), embeddings=[ref], steps=1)
        list(sampling.sample(req))

    with pytest.raises(TextinvError, match=r"<x> is a Stable Diffusion XL embedding but tiny-sd1 is Stable Diffusion 1\.x"):
        run("sdxl")
    with pytest.raises(TextinvError) as err:  # a real SD 1.5 embedding (768 wide) on the tiny SD 1 model
        run("sd1", vectors={"clip_l": np.zeros((1, 768), np.float32)})
    assert "does not fit tiny-sd1" in err.value.message and "768" in err.value.message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--guidance", "-1"], "--guidance must be 0 or more"),
    (["--size", "65"], "--size must be a positive multiple of 8"),
    (["--size", "64x60"], "--size must be a positive multiple of 8"),
    (["--scheduler", "plms"], "--scheduler must be one of Euler, Euler a, DPM++ 2M, DPM++ 2M Karras"),
    (["--precision", "fp8"], "--precision must be one of"),
])
def test_bad_options_are_refused_before_work(cli, backend, tmp_path, args, message):
    r = cli("sample", "a toy", "-o", tmp_path / "out", *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert backend.requests == [] and not (tmp_path / "out").exists()


def test_wrong_type_is_a_usage_error(cli, backend):
    assert cli("sample", "a toy", "--steps", "many").exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on CUDA")
def test_fp16_on_cpu_is_a_clear_error(cli, backend, models, tmp_path):
    r = cli(*sample_args(models["sd1"], tmp_path, "a toy", "--precision", "fp16"))
    assert r.exit_code == 1 and "fp16 sampling needs a CUDA GPU" in r.output and "--precision fp32" in r.output


def test_uncached_hub_model_offline_names_the_way_out(cli, backend, tmp_path):
    r = cli("sample", "a toy", "--model", "textinv-tests/not-a-real-model", "-o", tmp_path)
    assert r.exit_code == 1
    assert "textinv-tests/not-a-real-model is not in the Hugging Face cache" in r.output
    assert "--model" in r.output and "--model tiny" in r.output


# -- the vectors really get in -------------------------------------------------------------------

def _encode(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]


def test_loaded_vectors_reach_the_text_encoder(models):
    pipe, info = sampling.load_pipeline(models["sd1"])
    vecs = vectors("sd1", n=3, seed=3)
    before = _encode(pipe, "a <cat-toy> backpack")  # not loaded yet: the token is plain text
    tokens.add_embeddings(pipe, [EmbeddingRef("<cat-toy>", vecs, "", "cat-toy")], info)
    rows = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"])
    assert torch.equal(rows[ids], torch.from_numpy(vecs["clip_l"]))
    assert "<cat-toy>_2" in pipe.maybe_convert_prompt("a <cat-toy> backpack", pipe.tokenizer)
    with_token = _encode(pipe, "a <cat-toy> backpack")
    assert not torch.allclose(with_token, before)
    assert not torch.allclose(with_token, _encode(pipe, "a backpack"))

    # Other vectors under the same token give another encoding: the output depends on them.
    other, _ = sampling.load_pipeline(models["sd1"])
    tokens.add_embeddings(other, [EmbeddingRef("<cat-toy>", vectors("sd1", n=3, seed=4), "", "cat-toy")], info)
    assert not torch.allclose(with_token, _encode(other, "a <cat-toy> backpack"))


def test_sdxl_vectors_go_to_both_encoders(models):
    pipe, info = sampling.load_pipeline(models["sdxl"])
    vecs = vectors("sdxl", n=2, seed=5)
    tokens.add_embeddings(pipe, [EmbeddingRef("<xl>", vecs, "", "xl")], info)
    for slot, tok, enc in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok.convert_tokens_to_ids(["<xl>", "<xl>_1"])
        assert torch.equal(enc.get_input_embeddings().weight[ids], torch.from_numpy(vecs[slot]))


def test_token_already_in_the_vocabulary_is_refused(models):
    pipe, info = sampling.load_pipeline(models["sd1"])
    word = next(w for w in pipe.tokenizer.get_vocab() if re.fullmatch(r"[a-z]{3,}", w))
    with pytest.raises(TextinvError, match="already in tiny-sd1's vocabulary"):
        tokens.add_embeddings(pipe, [EmbeddingRef(word, vectors("sd1"), "", word)], info)


def test_closing_the_event_stream_stops_the_worker(models, tmp_path):
    req = SampleRequest(prompt="a toy", model=models["sd1"], out_dir=str(tmp_path), steps=50)
    events = sampling.sample(req)
    assert next(events).kind == "started"
    assert next(events).kind == "progress"
    events.close()  # what Ctrl-C in the CLI amounts to
    assert not [t for t in threading.enumerate() if t.name == "textinv-sample"]
    assert not list(tmp_path.glob("*.png"))
