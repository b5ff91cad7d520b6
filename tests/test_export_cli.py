"""`textinv export NAME... --for UI DIR` and `textinv list --uis` through the CLI: the files each
UI loads (checked with tests/support/loader_facts.py), what to type, skips, --force, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.support import loader_facts as lf
from tests.support.helpers import random_embedding
from textinv_cli.embedding import Embedding
from textinv_cli.families import FAMILY_SLOTS, SLOT_WIDTHS
from textinv_cli.formats.a1111_names import a1111_word
from textinv_cli.formats.detect import read_decoded
from textinv_cli.registry.store import Registry


def _add(emb, name=None):
    Registry().add(emb, name=name, source="imported", origin={"path": "/x", "file_sha256": "0" * 64})


@pytest.fixture
def entries():
    _add(random_embedding("<cat-toy>", "sd1"))
    _add(random_embedding("<xl>", "sdxl", n=3))


def _sd3():
    if "sd3" not in FAMILY_SLOTS:
        pytest.skip("this textinv has no SD3 family")
    vectors = {s: np.full((2, SLOT_WIDTHS[s]), 0.01, np.float32) for s in FAMILY_SLOTS["sd3"]}
    _add(Embedding(token="<three>", vectors=vectors))


def test_export_for_a1111_writes_files_a1111_loads_under_the_token(cli, tmp_path, entries):
    out = tmp_path / "webui" / "embeddings"   # created, parents too
    r = cli("export", "cat-toy", "xl", "--for", "a1111", out)
    assert r.exit_code == 0, r.output
    assert f"Wrote {out / 'cat-toy.safetensors'} (sd1, 2 vector(s)): type cat-toy" in r.stdout
    assert f"Wrote {out / 'xl.safetensors'} (sdxl, 3 vector(s)): type xl" in r.stdout
    for name, family in (("cat-toy", "sd1"), ("xl", "sdxl")):
        path = out / f"{name}.safetensors"
        loaded = lf.a1111_load(read_decoded(path).obj, path.name, model=family)
        want = Registry().load(name).vectors
        assert loaded.trigger == name == a1111_word(Registry().get(name).token)  # convert's word too
        assert set(loaded.vectors) == set(want)
        assert all(np.array_equal(loaded.vectors[s], want[s]) for s in want)


@pytest.mark.parametrize("ui,typed", [("forge", "cat-toy"), ("comfyui", "embedding:cat-toy"),
                                      ("invokeai", "<cat-toy>"), ("diffusers", "<cat-toy>")])
def test_export_prints_what_to_type_in_each_ui(cli, tmp_path, entries, ui, typed):
    r = cli("export", "cat-toy", "--for", ui, tmp_path, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    (w,) = doc["written"]
    assert (doc["for"], w["name"], w["type"], doc["skipped"], doc["failed"]) == (ui, "cat-toy", typed, [], [])
    path = w["file"]
    obj = read_decoded(path).obj
    if ui == "comfyui":
        assert lf.comfyui_finds(typed, os.path.basename(path))
        assert set(lf.comfyui_load(obj, path, model="sd1").vectors) == {"clip_l"}
    elif ui == "invokeai":
        assert lf.invokeai_load(obj, path, model="sd1").trigger == typed
    elif ui == "diffusers":
        assert lf.diffusers_load(obj, family="sd1").trigger == typed and "load_textual_inversion" in w["load"]


def test_export_sdxl_for_diffusers_is_the_pair_folder(cli, tmp_path, entries):
    r = cli("export", "xl", "--for", "diffusers", tmp_path)
    assert r.exit_code == 0, r.output
    folder = tmp_path / "xl-sdxl"
    loaded = lf.diffusers_load(read_decoded(folder / "learned_embeds.safetensors").obj, family="sdxl",
                               second=read_decoded(folder / "learned_embeds_2.safetensors").obj)
    assert loaded.trigger == "<xl>" and "text_encoder_2" in r.stdout


def test_all_skips_what_the_ui_cannot_load_and_says_why(cli, tmp_path, entries):
    _sd3()
    r = cli("export", "--all", "--for", "a1111", tmp_path)
    assert r.exit_code == 0, r.output  # --all: a family A1111 cannot load is an expected skip
    assert "Skipped three (sd3): AUTOMATIC1111 loads SD 1.x, 2.x and XL embeddings only" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["cat-toy.safetensors", "xl.safetensors"]
    r = cli("export", "three", "--for", "a1111", tmp_path / "b")
    assert r.exit_code == 1 and "1 of 1 embedding(s) not exported for AUTOMATIC1111" in r.stderr
    assert "textinv list --uis" in r.stderr and not os.listdir(tmp_path / "b")
    r = cli("export", "three", "--for", "comfyui", tmp_path / "c")
    assert r.exit_code == 0 and "type embedding:three" in r.stdout, r.output
    got = lf.comfyui_load(read_decoded(tmp_path / "c" / "three.safetensors").obj, "three.safetensors", model="sd3")
    assert set(got.vectors) == set(FAMILY_SLOTS["sd3"])


def test_existing_files_need_force(cli, tmp_path, entries):
    assert cli("export", "cat-toy", "--for", "a1111", tmp_path).exit_code == 0
    target = tmp_path / "cat-toy.safetensors"
    target.write_bytes(b"old")
    r = cli("export", "cat-toy", "--for", "a1111", tmp_path)
    assert r.exit_code == 1 and "already exists. Pass --force to replace it." in r.stdout
    assert "Pass --force" in r.stderr and target.read_bytes() == b"old"
    r = cli("export", "cat-toy", "--for", "a1111", tmp_path, "--force")
    assert r.exit_code == 0 and read_decoded(target).container == "safetensors"
    (tmp_path / "xl.safetensors").mkdir()  # a folder is never replaced by a file, --force or not
    r = cli("export", "xl", "--for", "a1111", tmp_path, "--force")
    assert r.exit_code == 1 and "is a folder" in r.stdout


def test_a_name_a_ui_cannot_type_is_not_written(cli, tmp_path):
    _add(random_embedding("<my cat>", "sd1"), name="my-cat")
    r = cli("export", "my-cat", "--for", "comfyui", tmp_path)
    assert r.exit_code == 1 and "splits prompts on spaces" in r.stdout and not os.listdir(tmp_path)
    r = cli("export", "my-cat", "--for", "a1111", tmp_path)  # A1111 tokenizes the name: fine
    assert r.exit_code == 0 and "type my cat" in r.stdout


def test_usage_and_lookup_errors(cli, tmp_path, entries):
    assert cli("export", "--for", "a1111", tmp_path).exit_code == 2              # neither NAMEs nor --all
    assert cli("export", "cat-toy", "--all", "--for", "a1111", tmp_path).exit_code == 2
    assert cli("export", "cat-toy", "--for", "paint", tmp_path).exit_code == 2
    r = cli("export", "nope", "--for", "a1111", tmp_path / "n")
    assert r.exit_code == 1 and "nope" in r.stderr and not (tmp_path / "n").exists()
    (tmp_path / "f").write_text("x")
    r = cli("export", "cat-toy", "--for", "a1111", tmp_path / "f")
    assert r.exit_code == 1 and "not a folder" in r.stderr
    r = cli("export", "<cat-toy>", "--for", "a1111", tmp_path / "t")  # by token, as other commands
    assert r.exit_code == 0 and (tmp_path / "t" / "cat-toy.safetensors").is_file()


def test_empty_registry(cli, tmp_path):
    r = cli("export", "--all", "--for", "a1111", tmp_path)
    assert r.exit_code == 1 and "nothing to export" in r.stderr


def test_list_shows_where_each_entry_can_go(cli, entries):
    _sd3()
    r = cli("list", "--uis")
    assert r.exit_code == 0, r.output
    assert "exports to" in r.stdout
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert lines["cat-toy"].rstrip().endswith("a1111 forge comfyui invokeai diffusers")
    assert lines["three"].rstrip().endswith("comfyui")
    docs = {d["name"]: d for d in json.loads(cli("list", "--json", "--uis").stdout)}
    assert docs["xl"]["uis"] == ["a1111", "forge", "comfyui", "invokeai", "diffusers"]
    assert docs["three"]["uis"] == ["comfyui"]
    assert "uis" not in json.loads(cli("list", "--json").stdout)[0]  # the default JSON is unchanged
    assert "exports to" not in cli("list").stdout


def test_export_never_imports_torch_or_jax(tmp_path, entries):  # writes both files: formats load
    code = textwrap.dedent(f"""
        from textinv_cli.cli.app import main
        try:
            main(["export", "--all", "--for", "comfyui", {str(tmp_path)!r}])
        except SystemExit:
            pass
        import sys, json; print(json.dumps(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TEXTINV_DEBUG": ""})
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert sorted(os.listdir(tmp_path)) == ["cat-toy.safetensors", "xl.safetensors"]  # it did the work
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "jax", "jaxlib")}


def test_a_declared_family_decides_where_an_entry_goes(cli, tmp_path):
    """A Flux embedding of CLIP-L alone looks like SD 1.x by its slots; its declared family
    keeps it out of A1111 and sends it to ComfyUI's Flux encoders."""
    if "flux" not in FAMILY_SLOTS:
        pytest.skip("this textinv has no Flux family")
    _add(Embedding("<f>", {"clip_l": np.full((1, 768), 0.5, np.float32)}, {}, "flux"))
    assert Registry().get("f").family == "flux"
    r = cli("export", "f", "--for", "a1111", tmp_path)
    assert r.exit_code == 1 and "Skipped f (flux)" in r.stdout
    r = cli("export", "f", "--for", "comfyui", tmp_path)
    assert r.exit_code == 0 and "type embedding:f" in r.stdout, r.output
    got = lf.comfyui_load(read_decoded(tmp_path / "f.safetensors").obj, "f.safetensors", model="flux")
    assert set(got.vectors) == {"clip_l"}


def test_two_entries_with_one_trigger_are_not_both_written(cli, tmp_path):
    _add(random_embedding("<Cat>", "sd1", seed=1), name="one")
    _add(random_embedding("cat", "sd1", seed=2), name="two")  # a folded-case file system holds one file
    r = cli("export", "--all", "--for", "a1111", tmp_path)
    assert r.exit_code == 1 and "one is exported as Cat.safetensors already" in r.stdout, r.output
    assert os.listdir(tmp_path) == ["Cat.safetensors"]


@pytest.mark.parametrize("damage", [("family", "sd9\x1b[31m"), ("widths", '{"clip_l": -1}')])
def test_a_damaged_entry_is_not_exported_and_the_rest_are(cli, tmp_path, textinv_home, damage):
    import sqlite3

    entry, _ = Registry().add(random_embedding("<good>"), source="imported", origin={"path": "/x/good.pt"})
    row = {k: (json.dumps(v) if k in ("widths", "origin", "meta", "tags") else v) for k, v in entry.to_json().items()}
    row.update(name="bad", **dict([damage]))
    conn = sqlite3.connect(textinv_home / "registry.db")
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(f"INSERT INTO embeddings ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    conn.commit()
    conn.close()
    r = cli("export", "--all", "--for", "comfyui", tmp_path)
    assert r.exit_code == 1 and "Not written: bad: bad is damaged" in r.stdout, r.output
    assert "\x1b" not in r.stdout + r.stderr and os.listdir(tmp_path) == ["good.safetensors"]


def test_versions_of_one_token_export_the_active_one_and_others_by_name(cli, tmp_path):
    """Two versions of <cat-toy>: --all sends the active one (cat-toy-v2, typed `cat-toy` in
    A1111) and says how to send the other, which by name goes out under its registry name."""
    Registry().add(random_embedding("<cat-toy>", seed=1), source="imported", origin={})
    Registry().add(random_embedding("<cat-toy>", seed=2), source="imported", origin={})  # cat-toy-v2
    active = next(e for e in Registry().entries() if e.active)
    other = next(e for e in Registry().entries() if not e.active)
    r = cli("export", "--all", "--for", "a1111", tmp_path / "emb", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [(w["name"], w["type"]) for w in out["written"]] == [(active.name, "cat-toy")]
    assert [s["name"] for s in out["skipped"]] == [other.name]
    r = cli("export", other.name, "--for", "comfyui", tmp_path / "c")
    assert r.exit_code == 0 and f"type embedding:{other.name}" in r.stdout, r.output
