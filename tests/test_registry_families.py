"""The registry with SD3 and Flux embeddings: rows, the family column and filter, the declared
family kept in the blob, and SD 1.x/2.x/XL rows and hashes as they were."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from textinv_cli import formats
from textinv_cli.embedding import Embedding
from textinv_cli.formats.safetensors_io import load_safetensors
from textinv_cli.registry.db import decode_row
from textinv_cli.registry.store import Registry

from .support.family_embeddings import family_embedding
from .test_sd3_flux_layouts import PINNED, _pinned_vectors


@pytest.fixture
def reg() -> Registry:
    return Registry()


def _add_all(reg):
    embs = {"sd3-full": family_embedding("<a>", "sd3", seed=1),
            "sd3-lg": family_embedding("<b>", "sd3", seed=2, slots=("clip_l", "clip_g")),
            "flux-l": family_embedding("<c>", "flux", seed=3, slots=("clip_l",)),
            "xl": family_embedding("<d>", "sdxl", seed=4)}
    for name, emb in embs.items():
        reg.add(emb, name=name, source="imported", origin={})
    return embs


def test_sd3_and_flux_register_filter_and_load_back(reg):
    embs = _add_all(reg)
    assert [e.name for e in reg.entries(family="sd3")] == ["sd3-full", "sd3-lg"]
    assert [e.name for e in reg.entries(family="flux")] == ["flux-l"]
    assert [e.name for e in reg.entries(family="sdxl")] == ["xl"]  # clip_l + clip_g declared sd3 is not SDXL
    for name, emb in embs.items():
        entry = reg.get(name)
        back = reg.load(name)
        assert entry.family == back.family == emb.family and entry.widths == emb.widths
        assert back.content_sha256() == entry.sha256 == emb.content_sha256()
        assert all(np.array_equal(back.vectors[s], v) for s, v in emb.vectors.items())
        _, blob_meta = load_safetensors(reg.blob_path(entry.sha256).read_bytes())
        assert blob_meta.get("textinv.family") == emb.declared_family  # only where slots do not say it


def test_the_same_vectors_declared_otherwise_are_other_content(reg):
    sd1 = family_embedding("<e>", "sd1", seed=5)
    flux = sd1.with_family("flux")
    a, new_a = reg.add(sd1, name="as-sd1", source="imported", origin={})
    b, new_b = reg.add(flux, name="as-flux", source="imported", origin={})
    assert new_a and new_b and a.sha256 != b.sha256 and (a.family, b.family) == ("sd1", "flux")


def test_the_blob_restores_the_family_when_the_row_meta_lost_it(reg, textinv_home):
    reg.add(family_embedding("<b>", "sd3", slots=("clip_l", "clip_g")), name="lg", source="imported", origin={})
    with sqlite3.connect(textinv_home / "registry.db") as conn:
        conn.execute("UPDATE embeddings SET meta = '{}' WHERE name = 'lg'")
    assert Registry().load("lg").family == "sd3"


@pytest.mark.parametrize("family", sorted(PINNED))
def test_existing_families_register_under_the_hashes_they_always_had(reg, family):
    entry, _ = reg.add(Embedding("<pinned>", _pinned_vectors(family)), name=family, source="imported", origin={})
    assert entry.sha256 == PINNED[family] and "textinv.family" not in entry.meta
    assert reg.load(family).family == family


def test_rows_accept_every_family_and_flag_unknown_ones(reg, textinv_home):
    _add_all(reg)
    with sqlite3.connect(textinv_home / "registry.db") as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["name"]: r for r in conn.execute("SELECT * FROM embeddings")}
    assert all(decode_row(r)[1] is None for r in rows.values())
    bad = dict(rows["flux-l"])
    bad["family"] = "sd4"
    assert "family is unknown" in decode_row(bad)[1]


def test_cli_imports_and_lists_an_sd3_file(cli, tmp_path):
    path = tmp_path / "lg.safetensors"
    formats.write_embedding(family_embedding("<lg>", "sd3", slots=("clip_l", "clip_g")), path, "comfyui")
    r = cli("import", path)
    assert r.exit_code == 0 and "sd3" in r.stdout, r.output
    docs = json.loads(cli("list", "--family", "sd3", "--json").stdout)
    assert [d["family"] for d in docs] == ["sd3"]
    assert json.loads(cli("list", "--family", "sdxl", "--json").stdout) == []
