"""`textinv import`, `list` and `rm` through the CLI: exit codes, messages, JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.support.helpers import random_embedding
from tests.support.registry_worker import run_together
from textinv_cli.formats import write_embedding
from textinv_cli.formats.safetensors_io import dump_safetensors
from textinv_cli.registry.store import Registry


def _write(tmp_path: Path, name: str, emb=None, fmt: str = "safetensors") -> Path:
    emb = emb or random_embedding()
    out = tmp_path / name
    write_embedding(emb, out, fmt)
    return out


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output and "Traceback" not in result.stderr


# -- import -----------------------------------------------------------------------------

def test_import_registers_a_file(cli, tmp_path, textinv_home):
    src = _write(tmp_path, "cat.safetensors")
    r = cli("import", src)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"Imported cat-toy (<cat-toy>, sd1, 2 vectors) from {src}"
    entry = Registry().get("cat-toy")
    assert entry.source == "imported" and entry.meta["format"] == "diffusers"
    assert entry.origin == {"path": str(src.resolve()), "file_sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert entry.sha256 == random_embedding().content_sha256()
    assert Registry().blob_path(entry.sha256).is_file()


def test_reimporting_identical_content_in_another_format_says_where_it_is(cli, tmp_path):
    assert cli("import", _write(tmp_path, "cat.safetensors")).exit_code == 0
    # same vectors, same token (kohya keeps it in metadata; an A1111 .pt's token is its file stem)
    r = cli("import", _write(tmp_path, "cat-kohya.safetensors", fmt="kohya"))
    assert r.exit_code == 0, r.output
    sha = random_embedding().content_sha256()
    assert r.stdout.startswith(f"Already registered as cat-toy (sha256 {sha[:12]}")
    r = cli("import", tmp_path / "cat.safetensors", "--name", "other")
    assert r.exit_code == 0 and "Already registered as cat-toy" in r.stdout and "other" in r.stdout
    assert [e.name for e in Registry().entries()] == ["cat-toy"]


def test_import_sdxl_folder_with_name_token_and_tags(cli, tmp_path):
    folder = _write(tmp_path, "xl", random_embedding("<xl>", "sdxl", n=4), fmt="diffusers-sdxl")
    r = cli("import", folder, "--name", "my-xl", "--token", "<mine>", "--tag", "a", "--tag", "b", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["created"] is True
    e = doc["entry"]
    assert (e["name"], e["token"], e["family"], e["n_vectors"], e["tags"]) == ("my-xl", "<mine>", "sdxl", 4, ["a", "b"])
    assert e["widths"] == {"clip_g": 1280, "clip_l": 768} and e["origin"]["path"] == str(folder.resolve())
    assert Registry().load("my-xl").token == "<mine>"


def test_import_name_clash_suggests_a_free_name_that_works(cli, tmp_path):
    assert cli("import", _write(tmp_path, "a.safetensors", random_embedding(seed=1))).exit_code == 0
    src = _write(tmp_path, "b.safetensors", random_embedding(seed=2))
    assert cli("import", src, "--name", "other").exit_code == 0
    src3 = _write(tmp_path, "c.safetensors", random_embedding(seed=3))
    r = cli("import", src3, "--name", "cat-toy")  # an explicit name that is taken
    assert r.exit_code == 1
    assert "'cat-toy' is already taken" in r.stderr and "--name cat-toy-v2" in r.stderr
    _no_traceback(r)
    assert cli("import", src3, "--name", "cat-toy-v2").exit_code == 0
    assert [e.name for e in Registry().entries()] == ["cat-toy", "cat-toy-v2", "other"]


def test_import_token_that_is_a_path_writes_nothing(cli, tmp_path, textinv_home):
    src = tmp_path / "evil.safetensors"
    src.write_bytes(dump_safetensors({"../../evil": random_embedding().vectors["clip_l"]}))
    r = cli("import", src)
    assert r.exit_code == 1 and "--token" in r.stderr
    _no_traceback(r)
    assert list(textinv_home.iterdir()) == []
    # A token is the default name and becomes a file name (convert, push): --name alone is not enough
    assert cli("import", src, "--name", "fine").exit_code == 1
    assert list(textinv_home.iterdir()) == []
    r = cli("import", src, "--token", "<fine>")  # the way out the hint names
    assert r.exit_code == 0 and Registry().get("fine").token == "<fine>"


@pytest.mark.parametrize("bad", ["../x", "a/b"])
def test_import_refuses_bad_names(cli, tmp_path, textinv_home, bad):
    r = cli("import", _write(tmp_path, "cat.safetensors"), "--name", bad)
    assert r.exit_code == 1 and "cannot be used" in r.stderr
    assert list(textinv_home.iterdir()) == []


def test_import_missing_or_broken_file(cli, tmp_path, textinv_home):
    r = cli("import", tmp_path / "nope.pt")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    half = tmp_path / "half.safetensors"
    whole = _write(tmp_path, "whole.safetensors").read_bytes()
    half.write_bytes(whole[: len(whole) // 2])
    r = cli("import", half)
    assert r.exit_code == 1 and r.stderr.startswith("Error:")
    _no_traceback(r)
    assert list(textinv_home.iterdir()) == []


def test_import_size_cap_and_max_size(cli, tmp_path):
    src = _write(tmp_path, "big.safetensors", random_embedding("<big>", n=400))  # 1.2 MB
    r = cli("import", src, "--max-size", "0.5")
    assert r.exit_code == 1 and "--max-size" in r.stderr
    assert cli("import", src, "--max-size", "2").exit_code == 0


# -- list -------------------------------------------------------------------------------------

def test_list_empty_says_how_to_add(cli):
    r = cli("list")
    assert r.exit_code == 0
    for how in ("textinv import", "textinv pull", "textinv train"):
        assert how in r.stdout
    r = cli("list", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == []


def _populate():
    reg = Registry()
    reg.add(random_embedding("<cat-toy>", "sd1", seed=1), source="imported", origin={"path": "/x"})
    reg.add(random_embedding("<xl>", "sdxl", seed=2), source="pulled", origin={"repo": "me/xl", "commit": "c0"})
    reg.add(random_embedding("<style>", "sd2", seed=3), source="trained", origin={"run": "runs/1"})
    return {e.name: e for e in reg.entries()}


def test_list_table(cli):
    entries = _populate()
    r = cli("list")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "token", "family", "vectors", "source", "sha256", "created"]
    rows = [line.split() for line in lines[1:4]]
    assert [row[0] for row in rows] == ["cat-toy", "style", "xl"]  # sorted by name
    assert rows[2][:6] == ["xl", "<xl>", "sdxl", "2", "pulled", entries["xl"].sha256[:12]]
    assert "3 embeddings" in r.stdout


def test_list_json_and_filters(cli):
    entries = _populate()
    docs = json.loads(cli("list", "--json").stdout)
    assert [d["name"] for d in docs] == ["cat-toy", "style", "xl"]
    assert docs[2] == entries["xl"].to_json() and docs[2]["origin"] == {"repo": "me/xl", "commit": "c0"}
    assert [d["name"] for d in json.loads(cli("list", "--family", "sdxl", "--json").stdout)] == ["xl"]
    assert [d["name"] for d in json.loads(cli("list", "--source", "trained", "--json").stdout)] == ["style"]
    r = cli("list", "--family", "sd1", "--source", "pulled")
    assert r.exit_code == 0 and "No registered embeddings match --family sd1 --source pulled" in r.stdout
    assert cli("list", "--family", "sd3").exit_code == 0  # every family an embedding can have is a choice
    assert cli("list", "--family", "sd4").exit_code == 2


# -- rm ------------------------------------------------------------------------------------------

def test_rm_removes_entry_and_blob(cli):
    entries = _populate()
    r = cli("rm", "xl")
    assert r.exit_code == 0 and r.stdout.startswith("Removed xl (<xl>, sdxl")
    assert not Registry().blob_path(entries["xl"].sha256).exists()
    assert [d["name"] for d in json.loads(cli("list", "--json").stdout)] == ["cat-toy", "style"]
    r = cli("rm", "style", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["removed"] == entries["style"].to_json()


def test_rm_unknown_suggests_close_names(cli):
    _populate()
    r = cli("rm", "cat-tyo")
    assert r.exit_code == 1
    assert "No embedding named 'cat-tyo'" in r.stderr and "Did you mean: cat-toy?" in r.stderr
    _no_traceback(r)
    assert len(json.loads(cli("list", "--json").stdout)) == 3


def test_rm_on_empty_registry(cli):
    r = cli("rm", "anything")
    assert r.exit_code == 1 and "empty" in r.stderr and "textinv import" in r.stderr


def test_registry_commands_honour_textinv_home(cli, tmp_path, monkeypatch):
    src = _write(tmp_path, "cat.safetensors")
    monkeypatch.setenv("TEXTINV_HOME", str(tmp_path / "one"))
    assert cli("import", src).exit_code == 0
    monkeypatch.setenv("TEXTINV_HOME", str(tmp_path / "two"))
    assert json.loads(cli("list", "--json").stdout) == []
    assert (tmp_path / "one" / "registry.db").is_file() and not (tmp_path / "two").exists()


# -- two real `textinv import` processes at once ---------------------------------------------------

def test_concurrent_cli_imports(tmp_path, textinv_home):
    # three processes (CI has two cores): one distinct file, and the same content twice
    a = _write(tmp_path, "ab.pt", random_embedding("<a>", "sdxl", seed=1), fmt="kohya-pt")
    same = [_write(tmp_path, f"same{i}.safetensors", random_embedding("<same>", seed=3)) for i in (1, 2)]
    jobs = [["cli", "import", str(a)], ["cli", "import", str(same[0])], ["cli", "import", str(same[1])]]
    results = run_together(jobs, tmp_path / "barrier")
    for rc, out, err in results:
        assert rc == 0, err
    assert results[0][1].startswith("Imported ab (")  # kohya files carry no token: the file name is used
    assert sorted(out.split(" ")[0] for _, out, _ in results[1:]) == ["Already", "Imported"]
    assert [e.name for e in Registry().entries()] == ["ab", "same"]
