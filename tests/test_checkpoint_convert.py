"""Single-file checkpoints (LDM layout) -> diffusers folders: exact weights, cache, refusals.

The LDM files are written by tests/support/ldm_writer.py from the tiny diffusers models;
converting them must give back exactly the tiny folder (every tensor, the configs, the
tokenizers). diffusers' own single-file loader checks the mapping independently in
test_checkpoint_vs_diffusers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.support.ldm_writer import (  # noqa: E402
    ldm_state_dict, save_checkpoint, write_ldm_checkpoint, write_ldm_vae)
from textinv_cli.errors import FormatError, OptionError, TextinvError  # noqa: E402
from textinv_cli.models import tiny  # noqa: E402
from textinv_cli.models.checkpoints import architectures, cache, convert  # noqa: E402
from textinv_cli.models.checkpoints import plan as plan_mod  # noqa: E402

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
CAST = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def assert_same_weights(tiny_folder: Path, folder: Path, dtype: str = "fp32", components=None) -> None:
    for comp, name in WEIGHTS.items():
        if components is not None and comp not in components:
            continue
        ref_file = tiny_folder / comp / name
        if not ref_file.exists():
            assert not (folder / comp).exists(), comp
            continue
        ref, got = load_file(str(ref_file)), load_file(str(folder / comp / name))
        assert set(ref) == set(got), (comp, sorted(set(ref) ^ set(got))[:5])
        for key, t in ref.items():
            want = t.to(CAST[dtype])  # fp16/bf16 files: the originals rounded as the writer stored them
            assert got[key].dtype == want.dtype and got[key].shape == want.shape, (comp, key)
            assert torch.equal(got[key], want), (comp, key)


@pytest.mark.parametrize("family,dtype,suffix,ema", [
    ("sd1", "fp32", ".safetensors", False), ("sd1", "fp16", ".ckpt", True), ("sd1", "bf16", ".safetensors", False),
    ("sd2", "fp16", ".safetensors", True), ("sd2", "fp32", ".ckpt", False),
    ("sdxl", "fp32", ".safetensors", True), ("sdxl", "fp16", ".ckpt", False),
])
def test_converts_back_to_the_tiny_folder(tiny_model, tmp_path, family, dtype, suffix, ema):
    folder = tiny_model(family)
    src = write_ldm_checkpoint(folder, tmp_path / f"model{suffix}", dtype, ema=ema)
    calls = []
    prepared = convert.prepare(src, progress=lambda done, total, phase: calls.append((done, total, phase)))
    assert (prepared.family, prepared.architecture, prepared.has_vae) == (family, f"tiny {family}", True)
    assert prepared.prediction == ("v" if family == "sd2" else "epsilon")  # the tiny recipe's
    assert prepared.folder.parent == cache.root() and prepared.folder.name == f"{prepared.sha256[:16]}-" \
                                                                               f"{prepared.prediction}"
    assert_same_weights(folder, prepared.folder, dtype)  # EMA copies (other values) were not taken
    expected = tiny.recipe_files(family)
    for rel, data in expected.items():
        got = (prepared.folder / rel).read_bytes()
        if dtype != "fp32" and rel.startswith("text_encoder"):
            assert json.loads(got)["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
        else:
            assert got == data, rel
    for sub in tiny.TOKENIZER_PADS[family]:
        for f in (folder / sub).iterdir():
            assert (prepared.folder / sub / f.name).read_bytes() == f.read_bytes()
    marker = json.loads((prepared.folder / cache.MARKER).read_text())
    assert marker["sha256"] == prepared.sha256 and marker["source"] == str(src.absolute())
    assert marker["family"] == family and marker["converter"] == cache.CONVERTER
    assert calls and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)
    phases = [c[2] for c in calls]  # hashing first, then converting, each said once it starts
    assert phases == sorted(phases, key=("hashing", "converting").index) and set(phases) == {"hashing", "converting"}


def test_legacy_clip_names_without_text_model(tiny_model, tmp_path):
    folder = tiny_model("sd1")
    src = write_ldm_checkpoint(folder, tmp_path / "old.safetensors", legacy_clip=True)
    assert_same_weights(folder, convert.prepare(src).folder)


def test_sd2_without_the_unused_last_openclip_block(tiny_model, tmp_path):
    folder = tiny_model("sd2")
    src = write_ldm_checkpoint(folder, tmp_path / "m.safetensors", sd2_last_block=False)
    assert_same_weights(folder, convert.prepare(src).folder)


def test_a_second_prepare_converts_nothing(tiny_model, tmp_path, monkeypatch):
    src = write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "m.safetensors")
    first = convert.prepare(src)
    marker = first.folder / cache.MARKER
    before = marker.stat()

    def no_write(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "write", no_write)
    monkeypatch.setattr(cache, "build", no_write)
    second = convert.prepare(src)
    assert second == first
    after = marker.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_outdated_or_damaged_cache_entry_is_rebuilt(tiny_model, tmp_path):
    folder = tiny_model("sd1")
    src = write_ldm_checkpoint(folder, tmp_path / "m.safetensors")
    out = convert.prepare(src).folder
    unet = out / "unet" / WEIGHTS["unet"]
    unet.write_bytes(unet.read_bytes()[:-8])  # truncated: the marker's size no longer matches
    assert not cache.usable(out, json.loads((out / cache.MARKER).read_text())["sha256"])
    assert_same_weights(folder, convert.prepare(src).folder)


def test_two_conversions_at_once_share_one_folder(tiny_model, tmp_path, monkeypatch):
    src = write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "m.safetensors")
    barrier = threading.Barrier(2, timeout=30)
    real_write = plan_mod.write

    def slow_write(ck, moves, out, done=None):
        if out.parent.name == "unet":
            barrier.wait()  # both are mid-conversion before either publishes
        real_write(ck, moves, out, done)

    monkeypatch.setattr(convert, "write", slow_write)
    results, errors = [], []

    def run():
        try:
            results.append(convert.prepare(src))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and results[0].folder == results[1].folder
    assert cache.usable(results[0].folder, results[0].sha256)
    assert [p.name for p in cache.root().iterdir()] == [results[0].folder.name]  # no temp folder left


def test_prediction_argument_beats_the_file_and_keys_the_cache(tiny_model, tmp_path):
    src = write_ldm_checkpoint(tiny_model("sd2"), tmp_path / "m.safetensors")
    eps = convert.prepare(src, prediction="epsilon")
    v = convert.prepare(src)
    assert eps.folder != v.folder and (eps.prediction, v.prediction) == ("epsilon", "v")
    sched = json.loads((eps.folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"
    # the file's own word (modelspec metadata) beats the default, the argument beats the file
    sd = load_file(str(src))
    said = tmp_path / "said.safetensors"
    save_file(sd, str(said), metadata={"modelspec.prediction_type": "epsilon"})
    assert convert.prepare(said).prediction == "epsilon"
    assert convert.prepare(said, prediction="v_prediction").prediction == "v"
    with pytest.raises(OptionError):
        convert.prepare(src, prediction="x0")


def test_sd2_that_does_not_say_its_prediction_is_refused(tiny_model, tmp_path, monkeypatch):
    # Real SD 2.x has no default (512 base: epsilon, 768: v); the tiny SD 2.x stands in for it here.
    archs = tuple(dataclasses.replace(a, default_prediction=None) if a.name == "tiny sd2" else a
                  for a in architectures.ARCHITECTURES)
    monkeypatch.setattr(architectures, "ARCHITECTURES", archs)
    src = write_ldm_checkpoint(tiny_model("sd2"), tmp_path / "m.safetensors")
    with pytest.raises(TextinvError) as e:
        convert.prepare(src)
    assert "--prediction v" in str(e.value) and "--prediction epsilon" in str(e.value)
    assert convert.prepare(src, prediction="v").prediction == "v"


def test_a_file_without_vae_needs_one(tiny_model, tmp_path):
    folder = tiny_model("sdxl")
    src = write_ldm_checkpoint(folder, tmp_path / "novae.safetensors", vae=False)
    with pytest.raises(FormatError, match="--vae FILE"):
        convert.prepare(src)
    prepared = convert.prepare(src, vae_given=True)
    assert not prepared.has_vae and not (prepared.folder / "vae").exists()
    assert_same_weights(folder, prepared.folder, components=("unet", "text_encoder", "text_encoder_2"))


def _edited(tiny_folder, tmp_path, edit):
    sd = ldm_state_dict(tiny_folder)
    edit(sd)
    return save_checkpoint(sd, tmp_path / "edited.safetensors")


def test_an_unknown_tensor_under_a_mapped_prefix_is_refused_not_dropped(tiny_model, tmp_path):
    folder = tiny_model("sd1")
    for name in ("model.diffusion_model.input_blocks.1.0.extra.weight", "first_stage_model.encoder.extra",
                 "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc3.weight"):
        src = _edited(folder, tmp_path, lambda sd: sd.__setitem__(name, torch.zeros(2)))
        with pytest.raises(FormatError) as e:
            convert.prepare(src)
        assert name[:60] in str(e.value) and "never dropping" in str(e.value)


def test_an_unknown_top_level_prefix_is_ignored(tiny_model, tmp_path):
    folder = tiny_model("sd1")
    src = _edited(folder, tmp_path, lambda sd: sd.update({"lvlb_weights": torch.zeros(3),
                                                           "somebody.else.weight": torch.zeros(2)}))
    assert_same_weights(folder, convert.prepare(src).folder)


def test_wrong_shapes_missing_tensors_and_dtypes_are_refused(tiny_model, tmp_path):
    folder = tiny_model("sd1")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"

    def transpose(sd):
        sd["model.diffusion_model.out.2.weight"] = sd["model.diffusion_model.out.2.weight"].transpose(0, 1).contiguous()

    for edit, words in ((transpose, "has shape"), (lambda sd: sd.pop(key), "lacks 1 tensor"),
                        (lambda sd: sd.__setitem__(key, sd[key].to(torch.int32)), "holds I32")):
        with pytest.raises(FormatError, match=words):
            convert.prepare(_edited(folder, tmp_path, edit))
    assert not cache.root().exists() or not any(cache.root().iterdir())  # refused before anything is written


def test_a_hostile_tensor_name_is_shown_escaped(tiny_model, tmp_path):
    name = "model.diffusion_model.\x1b[31mred\u202e.weight"
    src = _edited(tiny_model("sd1"), tmp_path, lambda sd: sd.__setitem__(name, torch.zeros(1)))
    with pytest.raises(FormatError) as e:
        convert.prepare(src)
    assert "\x1b" not in str(e.value) and "\u202e" not in str(e.value) and "\\x1b" in str(e.value)


def test_an_unknown_architecture_names_the_closest_and_the_difference(tiny_model, tmp_path):
    emb = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    src = _edited(tiny_model("sd1"), tmp_path, lambda sd: sd.__setitem__(emb, sd[emb][:900].clone()))
    with pytest.raises(FormatError) as e:
        convert.prepare(src)
    assert "closest is tiny sd1" in str(e.value)
    assert "vocabulary 900 (expected width 32, 3 layers, vocabulary 933)" in str(e.value)


@pytest.mark.parametrize("layout,prefixed,suffix", [("ldm", False, ".safetensors"), ("ldm", True, ".ckpt"),
                                                    ("diffusers", False, ".safetensors")])
def test_a_standalone_vae_file(tiny_model, tmp_path, layout, prefixed, suffix):
    folder = tiny_model("sdxl")
    src = write_ldm_vae(folder, tmp_path / f"vae{suffix}", prefixed=prefixed, layout=layout, dtype="fp16")
    prepared = convert.prepare_vae(src, "sdxl")
    assert prepared.folder.name == f"vae-{prepared.sha256[:16]}-sdxl"
    ref = load_file(str(folder / "vae" / WEIGHTS["vae"]))
    got = load_file(str(prepared.folder / WEIGHTS["vae"]))
    assert set(ref) == set(got) and all(torch.equal(got[k], t.half()) for k, t in ref.items())
    config = json.loads((prepared.folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == 0.13025
    assert convert.prepare_vae(src, "sdxl") == prepared
    sd1 = convert.prepare_vae(src, "sd1")  # same weights, the family's config
    assert json.loads((sd1.folder / "config.json").read_text())["scaling_factor"] == 0.18215


def test_a_vae_file_that_is_none_is_refused(tiny_model, tmp_path):
    folder = tiny_model("sd1")
    sd = load_file(str(folder / "vae" / WEIGHTS["vae"]))
    sd["encoder.down_blocks.0.resnets.0.mystery"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(FormatError, match="mystery"):
        convert.prepare_vae(bad, "sd1")
    unet = tmp_path / "unet.safetensors"
    save_file(load_file(str(folder / "unet" / WEIGHTS["unet"])), str(unet))
    with pytest.raises(FormatError, match="holds no VAE"):
        convert.prepare_vae(unet, "sd1")


def test_cached_conversions_and_prune(tiny_model, tmp_path):
    a = write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "a.safetensors")
    b = write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "b.ckpt", seed=1)  # other EMA-free extras: other hash
    v = write_ldm_vae(tiny_model("sd1"), tmp_path / "v.safetensors")
    pa, pb, pv = convert.prepare(a), convert.prepare(b), convert.prepare_vae(v, "sd1")
    listed = {e["folder"]: e for e in cache.cached_conversions()}
    assert set(listed) == {pa.folder, pb.folder, pv.folder}
    assert listed[pv.folder]["kind"] == "vae" and listed[pa.folder]["kind"] == "model"
    assert listed[pa.folder]["source"] == str(a.absolute()) and listed[pa.folder]["family"] == "sd1"
    assert all(e["complete"] and e["source_exists"] and e["size"] > 0 and e["last_used"] > 0
               for e in listed.values())
    moved = tmp_path / "moved.safetensors"
    os.rename(a, moved)  # the same file elsewhere: its conversion is reused and now belongs there
    assert convert.prepare(moved).folder == pa.folder
    assert [e["source"] for e in cache.cached_conversions() if e["folder"] == pa.folder] == [str(moved.absolute())]
    os.unlink(b)
    (cache.root() / ".stale.trash").mkdir()
    freed = cache.prune(only_missing_sources=True)
    assert freed >= listed[pb.folder]["size"] and not pb.folder.exists() and pa.folder.exists()
    assert not (cache.root() / ".stale.trash").exists()
    left = cache.cached_conversions()
    assert {e["folder"] for e in left} == {pa.folder, pv.folder}
    assert cache.prune() == sum(e["size"] for e in left)
    assert cache.cached_conversions() == [] and cache.prune() == 0


# Digests of the real CLIP tokenizer files as SD's tokenizer/ folders ship them (vocab.json
# compared as sorted JSON, merges.txt byte for byte), taken once from a copy of
# openai/clip-vit-large-patch14's files; the vocabulary built from the shipped merges must match.
REAL_VOCAB_SHA256 = "f3494b2b345fa180ca51ec80ab47d1bbb0218d60089264d5ee9bb0619af4a4b7"
REAL_MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"


def test_the_shipped_merges_build_the_real_clip_tokenizer(tmp_path):
    import hashlib

    from textinv_cli.models.checkpoints import clip_vocab

    files = clip_vocab.tokenizer_files("!")
    vocab = json.loads(files["vocab.json"])
    canonical = json.dumps(vocab, sort_keys=True, ensure_ascii=False).encode()
    assert hashlib.sha256(canonical).hexdigest() == REAL_VOCAB_SHA256
    assert hashlib.sha256(files["merges.txt"]).hexdigest() == REAL_MERGES_SHA256
    transformers = pytest.importorskip("transformers")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 0 and len(tok) == 49408


def test_conversion_imports_no_ml_framework(tiny_model, tmp_path):
    from tests.support.checkpoint_files import assert_imports_no_framework

    src = write_ldm_checkpoint(tiny_model("sdxl"), tmp_path / "m.safetensors", "fp16")
    vae = write_ldm_vae(tiny_model("sdxl"), tmp_path / "vae.safetensors")
    assert_imports_no_framework(
        "from textinv_cli.models.checkpoints import convert\n"
        f"p = convert.prepare({str(src)!r}); convert.prepare_vae({str(vae)!r}, 'sdxl')\n"
        "assert (p.folder / 'unet' / 'diffusion_pytorch_model.safetensors').is_file()", tmp_path / "home")


def test_a_file_replaced_while_it_converts_is_not_cached_under_the_new_hash(tmp_path, monkeypatch, tiny_model):
    """The hash reads the file by name, the conversion through the open file: a file renamed over
    the path in between (a download finishing) must not publish the old weights under the new hash."""
    from textinv_cli.models.checkpoints import cache, convert, hashes

    path = write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "m.safetensors")
    other = write_ldm_checkpoint(tiny_model("sd1"), tmp_path / "other.safetensors", dtype="fp16")
    real = hashes.sha256_of

    def swapping(p, progress=None):
        os.replace(other, path)  # the file at the path is now another one
        return real(p, progress=progress)

    monkeypatch.setattr(hashes, "sha256_of", swapping)
    with pytest.raises(TextinvError, match="changed while textinv was reading it"):
        convert.prepare(path)
    monkeypatch.setattr(hashes, "sha256_of", real)
    assert cache.cached_conversions() == []  # nothing published
    prepared = convert.prepare(path)  # the new file, converted as itself
    assert prepared.sha256 == real(path)
