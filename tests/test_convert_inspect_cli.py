"""convert and inspect through the CLI: every target, registry sources, refusals, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from textinv_cli import formats
from textinv_cli.embedding import Embedding
from textinv_cli.formats.safetensors_io import dump_safetensors
from tests.support.helpers import random_embedding


@pytest.fixture
def a1111_pt(tmp_path):
    emb = random_embedding("charturner", "sd1", n=2, meta={"step": "1500"})
    path = tmp_path / "charturner.pt"
    formats.write_embedding(emb, path, "a1111")
    return path, emb


@pytest.mark.parametrize("fmt", [f for f, info in formats.WRITERS.items() if "sd1" in info.families])
def test_convert_to_every_format_round_trips(cli, a1111_pt, tmp_path, fmt):
    src, emb = a1111_pt
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("convert", src, "--to", fmt, "-o", out_dir, "--json")
    assert r.exit_code == 0, r.output
    written = json.loads(r.stdout)["written"]
    assert len(written) == 1
    back = formats.read_embedding(__import__("pathlib").Path(written[0]), token="charturner")
    np.testing.assert_array_equal(back.vectors["clip_l"], emb.vectors["clip_l"])


def test_convert_defaults_beside_the_source_and_never_overwrites(cli, a1111_pt):
    src, _ = a1111_pt
    r = cli("convert", src, "--to", "safetensors")
    assert r.exit_code == 0, r.output
    target = src.parent / "charturner.safetensors"
    assert target.exists()
    before = target.read_bytes()
    again = cli("convert", src, "--to", "safetensors")
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    assert target.read_bytes() == before
    assert cli("convert", src, "--to", "safetensors", "--force").exit_code == 0


def test_sdxl_into_single_width_format_names_formats_that_can(cli, tmp_path):
    src = tmp_path / "xl.safetensors"
    formats.write_embedding(random_embedding("<xl>", "sdxl"), src, "kohya")
    r = cli("convert", src, "--to", "a1111", "-o", tmp_path / "xl.pt")
    assert r.exit_code == 1
    for name in ("kohya", "kohya-pt", "diffusers-sdxl"):
        assert name in r.output
    assert not (tmp_path / "xl.pt").exists()


def test_unknown_target_format_lists_known_ones(cli, a1111_pt):
    r = cli("convert", a1111_pt[0], "--to", "ckpt")
    assert r.exit_code == 1 and "Unknown format 'ckpt'" in r.output and "safetensors" in r.output


def test_convert_from_registry_name(cli, a1111_pt, tmp_path, monkeypatch):
    src, emb = a1111_pt
    assert cli("import", src, "--name", "turner").exit_code == 0
    monkeypatch.chdir(tmp_path)
    r = cli("convert", "turner", "--to", "kohya", "--json")
    assert r.exit_code == 0, r.output
    [written] = json.loads(r.stdout)["written"]
    back = formats.read_embedding(__import__("pathlib").Path(written))
    np.testing.assert_array_equal(back.vectors["clip_l"], emb.vectors["clip_l"])


def test_missing_source_is_a_clear_error(cli, tmp_path):
    r = cli("convert", tmp_path / "nope.pt", "--to", "kohya")
    assert r.exit_code == 1 and "does not exist" in r.output
    r = cli("inspect", "no-such-name")
    assert r.exit_code == 1 and "No embedding named 'no-such-name'" in r.output


def test_token_with_traversal_is_refused_as_output_name(cli, tmp_path):
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(dump_safetensors({"../../escape": np.ones((1, 768), np.float32)}))
    r = cli("convert", evil, "--to", "a1111")
    assert r.exit_code == 1
    assert not list(tmp_path.parent.glob("escape*")) and not list(tmp_path.glob("*.pt"))


def test_ambiguous_file_names_keys_and_option(cli, tmp_path):
    path = tmp_path / "two.safetensors"
    path.write_bytes(dump_safetensors({"<a>": np.ones((1, 768), np.float32), "<b>": np.zeros((1, 768), np.float32)}))
    r = cli("inspect", path)
    assert r.exit_code == 1 and "<a>" in r.output and "<b>" in r.output and "--key" in r.output
    r = cli("inspect", path, "--key", "<b>", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["token"] == "<b>"


def test_inspect_json_reports_everything(cli, a1111_pt):
    src, emb = a1111_pt
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    import hashlib

    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert rep["format"] == "a1111" and rep["container"] == "pickle"
    assert rep["token"] == "charturner" and rep["family"] == "sd1" and rep["vectors"] == 2
    assert rep["sha256"] == sha and rep["short_hash"] == sha[:12]
    assert rep["metadata"]["step"] == "1500"
    norms = np.linalg.norm(emb.vectors["clip_l"], axis=1)
    np.testing.assert_allclose(rep["slots"]["clip_l"]["norm"], norms, rtol=1e-5)
    assert rep["slots"]["clip_l"]["width"] == 768 and rep["finite"] is True


def test_inspect_text_output(cli, a1111_pt):
    r = cli("inspect", a1111_pt[0])
    assert r.exit_code == 0
    for needle in ("a1111", "charturner", "sd1", "short hash", "vector 1: norm"):
        assert needle in r.output


def test_inspect_nan_is_reported(cli, tmp_path):
    path = tmp_path / "nan.safetensors"
    v = np.ones((1, 768), np.float32)
    v[0, 3] = np.nan
    path.write_bytes(dump_safetensors({"<n>": v}))
    r = cli("inspect", path)
    assert r.exit_code == 1 and "NaN" in r.output


def _fake_model(root, words, width=768):
    """A diffusers-shaped folder with just what --model reads: token embeddings + vocab."""
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((len(words), width)).astype(np.float32)
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "text_encoder" / "model.safetensors").write_bytes(
        dump_safetensors({"text_model.embeddings.token_embedding.weight": matrix}))
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({w + "</w>": i for i, w in enumerate(words)}))
    return matrix


def test_inspect_nearest_tokens(cli, tmp_path):
    words = ["cat", "dog", "toy", "car", "tree"]
    matrix = _fake_model(tmp_path / "model", words)
    # vector 0 is "toy" plus a little noise, vector 1 is exactly "tree"
    vecs = np.stack([matrix[2] + 0.01, matrix[4]])
    path = tmp_path / "e.safetensors"
    formats.write_embedding(Embedding("<e>", {"clip_l": vecs}), path, "safetensors")
    r = cli("inspect", path, "--model", tmp_path / "model", "--top", "2", "--json")
    assert r.exit_code == 0, r.output
    near = json.loads(r.stdout)["nearest"]["clip_l"]
    assert near[0][0]["token"] == "toy" and near[1][0]["token"] == "tree"
    assert near[1][0]["similarity"] == pytest.approx(1.0, abs=1e-4) and len(near[0]) == 2


def test_inspect_nearest_width_mismatch_names_both(cli, tmp_path):
    _fake_model(tmp_path / "model", ["a", "b"], width=1024)
    path = tmp_path / "e.safetensors"
    formats.write_embedding(random_embedding("<e>", "sd1"), path, "safetensors")
    r = cli("inspect", path, "--model", tmp_path / "model")
    assert r.exit_code == 1 and "768" in r.output and "1024" in r.output
