"""--family on the commands that read an embedding: an SD3/Flux file holding only some
encoders (a lone T5 block, a lone CLIP-L) says which model it is for only when told."""

from __future__ import annotations

import json

import numpy as np

from textinv_cli.formats import read_embedding
from textinv_cli.formats.safetensors_io import dump_safetensors


def _t5_only(tmp_path):
    path = tmp_path / "t5-toy.safetensors"
    path.write_bytes(dump_safetensors({"t5": np.ones((2, 4096), np.float32)}))
    return path


def test_a_lone_t5_block_needs_family_and_then_converts(cli, tmp_path):
    src = _t5_only(tmp_path)
    r = cli("convert", src, "--to", "comfyui", "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 1 and "--family sd3 or --family flux" in r.stderr, r.output
    assert not (tmp_path / "out.safetensors").exists()
    r = cli("convert", src, "--to", "comfyui", "--family", "flux", "-o", tmp_path / "out.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["family"] == "flux"
    back = read_embedding(tmp_path / "out.safetensors")  # the written file says its family itself
    assert back.family == "flux" and set(back.vectors) == {"t5"}


def test_family_reaches_inspect_and_the_registry(cli, tmp_path):
    src = tmp_path / "l-toy.safetensors"
    src.write_bytes(dump_safetensors({"<l-toy>": np.ones((1, 768), np.float32)}))
    shown = json.loads(cli("inspect", src, "--family", "sd3", "--json").stdout)
    assert shown["family"] == "sd3" and shown.get("family_source") == "--family", shown
    assert json.loads(cli("inspect", src, "--json").stdout)["family"] == "sd1"
    r = cli("import", src, "--family", "sd3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["entry"]["family"] == "sd3", r.output
    r = cli("convert", "l-toy", "--to", "a1111", "-o", tmp_path / "x.pt")  # A1111 has no SD3 layout
    assert r.exit_code == 1 and "cannot hold" in r.stderr, r.output


def test_a_family_that_cannot_hold_the_slots_or_none_at_all(cli, tmp_path):
    src = _t5_only(tmp_path)
    r = cli("inspect", src, "--family", "sdxl")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    r = cli("inspect", src, "--family", "sd4")
    assert r.exit_code == 2 and "sd1, sd2, sdxl, sd3, flux" in r.output
