"""inspect's notes on how a token and a family were decided (meta family_source, a1111_name)."""

from __future__ import annotations

import json
import shutil

from textinv_cli import formats
from tests.support.helpers import random_embedding


def test_inspect_says_how_the_family_was_decided(cli, tmp_path):
    path = tmp_path / "x.safetensors"
    formats.write_embedding(random_embedding("<x>", "sdxl"), path, "kohya")
    r = cli("inspect", path)
    assert r.exit_code == 0 and "family      sdxl (Stable Diffusion XL, from slots)" in r.output
    j = json.loads(cli("inspect", path, "--json").stdout)
    assert j["family_source"] == "slots" and "family_source" not in j["metadata"]


def test_inspect_names_an_a1111_files_internal_name_once(cli, tmp_path):
    src = tmp_path / "charturner.pt"
    formats.write_embedding(random_embedding("charturner", "sd1"), src, "a1111")
    renamed = tmp_path / "turner.pt"
    shutil.copy(src, renamed)
    r = cli("inspect", renamed)
    assert r.exit_code == 0, r.output
    assert "token       turner" in r.output
    assert "file's name charturner (A1111 ignores it and uses the file name)" in r.output
    assert "a1111_name" not in r.output  # said once, in its own line
    assert "file's name" not in cli("inspect", src).output


def test_a_width_no_text_encoder_has_is_said(cli, tmp_path):
    import numpy as np

    from textinv_cli.formats.safetensors_io import dump_safetensors

    src = tmp_path / "odd.safetensors"
    src.write_bytes(dump_safetensors({"<odd>": np.ones((1, 777), np.float32)}))
    r = cli("inspect", src)
    assert r.exit_code == 0 and "777 (clip_l) is not any known text encoder" in r.stdout, r.output
    assert "not any known" in json.loads(cli("inspect", src, "--json").stdout)["width_note"]
