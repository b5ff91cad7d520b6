"""Names and tokens through the real CLI: versions of a token (one active), `use`, `mv`, `tag`,
`sample --use` and registry names typed as words, resume after its name was taken, a registry
name beside a same-named folder, and ordinary words refused as tokens.

Every hint a test follows is run as printed (shlex-split from the output), so a hint that does
not work fails here.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.support.helpers import random_embedding
from textinv_cli.formats import write_embedding
from textinv_cli.registry.store import Registry


def printed(text: str, after: str) -> list[str]:
    """The command printed after `after` (up to a backquote or the line's end), as argv without `textinv`."""
    line = text[text.index(after) + len(after):].splitlines()[0]
    command = line.split("`")[0].strip().rstrip(".") if "`" in line else line.strip()
    argv = shlex.split(command)
    assert argv[0] == "textinv", command
    return argv[1:]


def _file(tmp_path, token="<cat-toy>", seed=0, name="e.safetensors"):
    path = tmp_path / name
    write_embedding(random_embedding(token, seed=seed), path, "safetensors")
    return path


# -- registry only (no backend): import, list, use, mv, tag ------------------------------------------

def test_importing_a_token_again_makes_the_next_version_active_and_list_says_how_to_switch(cli, tmp_path):
    assert cli("import", _file(tmp_path, seed=1, name="a.safetensors")).exit_code == 0
    r = cli("import", _file(tmp_path, seed=2, name="b.safetensors"))
    assert r.exit_code == 0 and "Imported cat-toy-v2 (<cat-toy>" in r.stdout, r.output
    assert "cat-toy-v2 is now the active <cat-toy>" in r.stdout
    listing = cli("list").stdout
    assert listing.splitlines()[0].split()[-1] == "active"
    assert "<cat-toy> in a prompt uses cat-toy-v2 (the active version); also cat-toy." in listing
    r = cli(*printed(listing, "Switch with `"))  # textinv use cat-toy
    assert r.exit_code == 0 and "cat-toy is now the active <cat-toy> (was cat-toy-v2" in r.stdout, r.output
    assert Registry().resolve("<cat-toy>").name == "cat-toy"
    assert cli(*printed(r.stdout, "switch back with `")).exit_code == 0  # textinv use cat-toy-v2
    assert Registry().resolve("<cat-toy>").name == "cat-toy-v2"
    docs = json.loads(cli("list", "--json").stdout)
    assert [(d["name"], d["active"]) for d in docs] == [("cat-toy", False), ("cat-toy-v2", True)]
    r = cli("rm", "cat-toy-v2")  # the active version goes: the one left takes over, and rm says so
    assert "cat-toy is now the active <cat-toy> (the newest remaining version)." in r.stdout, r.output
    assert Registry().resolve("<cat-toy>").name == "cat-toy" and "Switch" not in cli("list").stdout


def test_mv_renames_and_a_taken_name_prints_a_working_mv(cli, tmp_path):
    cli("import", _file(tmp_path, seed=1, name="a.safetensors"))
    cli("import", _file(tmp_path, seed=2, name="b.safetensors"))
    r = cli("mv", "cat-toy-v2", "cat-toy")
    assert r.exit_code == 1 and "already taken" in r.stderr
    r = cli(*printed(r.stderr, "Pick a free name: `"))  # textinv mv cat-toy-v2 cat-toy-v3 (the free one)
    assert r.exit_code == 0 and "Renamed cat-toy-v2 to cat-toy-v3 (<cat-toy>, active)" in r.stdout, r.output
    assert cli("rename", "cat-toy-v3", "best").exit_code == 0  # mv's other name
    assert [(e.name, e.active) for e in Registry().entries()] == [("best", True), ("cat-toy", False)]
    assert cli("mv", "nope", "x").exit_code == 1


def test_tags_are_set_after_import_shown_filtered_and_searched(cli, tmp_path):
    cli("import", _file(tmp_path, seed=1, name="a.safetensors"), "--tag", "toy")
    cli("import", _file(tmp_path, "<my-style>", seed=2, name="b.safetensors"))
    r = cli("tag", "my-style", "painting", "Watercolor")
    assert r.exit_code == 0 and "my-style: tags painting, Watercolor." in r.stdout
    listing = cli("list").stdout
    assert listing.splitlines()[0].split()[-1] == "tags" and "painting, Watercolor" in listing
    names = lambda *a: [d["name"] for d in json.loads(cli("list", "--json", *a).stdout)]  # noqa: E731
    assert names("--tag", "toy") == ["cat-toy"] and names("--tag", "painting", "--tag", "toy") == []
    assert names("--search", "watercolor") == ["my-style"] and names("--search", "CAT") == ["cat-toy"]
    assert cli("tag", "my-style", "--remove", "painting").exit_code == 0
    assert json.loads(cli("list", "--json", "--search", "style").stdout)[0]["tags"] == ["Watercolor"]
    r = cli("list", "--tag", "nothing")
    assert "No registered embeddings match --tag nothing" in r.stdout
    assert cli("tag", "my-style", "a,b").exit_code == 1


def test_import_refuses_an_ordinary_word_as_token_and_the_hint_imports_it(cli, tmp_path):
    path = _file(tmp_path)
    r = cli("import", path, "--token", "cat")
    assert r.exit_code == 1 and "The token 'cat' is an ordinary word" in r.stderr and Registry().entries() == []
    r = cli(*printed(r.stderr, "Import it under a token of its own: "))
    assert r.exit_code == 0 and Registry().resolve("<cat>").name == "cat"


def test_a_bare_registry_name_beats_a_same_named_folder_with_a_note(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gray").mkdir()  # the training photos the embedding was made from
    (tmp_path / "gray" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cli("import", _file(tmp_path, "<gray-cat>"), "--name", "gray")
    r = cli("inspect", "gray", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["token"] == "<gray-cat>", r.output
    assert r.stderr.count("\n") == 1 and "using the registry entry (for the folder, pass ./gray)" in r.stderr
    assert cli("inspect", "./gray").exit_code == 1  # the folder, as the note says: photos, no embedding


# -- with the torch backend: train -> train -> sample as the README does it ------------------------

def _sampled(cli, model, tmp_path, argv) -> tuple[list, str]:
    r = cli(*argv, "--model", model, "--steps", "1", "--json", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    started = next(json.loads(line) for line in r.stdout.splitlines() if '"started"' in line)
    return [(e["name"], e["token"]) for e in started["embeddings"]], r.stderr


def test_train_twice_sample_resume_and_name_hints_work_as_printed(cli, tiny_model, demo_images, tmp_path, monkeypatch):
    """The README's train -> train -> sample; then a finished run whose name was taken is
    registered by `resume` under the next version, and "registered as" names only its entry."""
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    model = tiny_model("sd1")
    train = ("train", demo_images, "--token", "<cat-toy>", "--init", "toy", "--model", model, "--steps", "1",
             "--checkpoint-every", "0")
    first, second = cli(*train), cli(*train, "--seed", "1")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "Registered as cat-toy-v2 (<cat-toy>, sd1, 1 vector(s))." in second.stdout
    assert "cat-toy-v2 is now the active <cat-toy>" in second.stdout
    used, _ = _sampled(cli, model, tmp_path, printed(second.stdout, "Try: "))
    assert used == [("cat-toy-v2", "<cat-toy>")]  # the active version, as the message said
    used, _ = _sampled(cli, model, tmp_path, printed(cli("list").stdout, "or for one run `"))  # --use cat-toy
    assert used == [("cat-toy", "<cat-toy>")]
    used, note = _sampled(cli, model, tmp_path, ["sample", "a photo of cat-toy and <cat-toy>"])
    assert used == [("cat-toy", "cat-toy"), ("cat-toy-v2", "<cat-toy>")]  # a name typed as a word, as A1111
    assert "cat-toy in the prompt is a registry name" in note

    # resume: the run's entry is gone and another embedding took its name meanwhile
    run = re.search(r"Embedding: (.*)/learned_embeds.safetensors", second.stdout)[1]
    assert cli("rm", "cat-toy-v2").exit_code == 0
    cli("import", _file(tmp_path, seed=7), "--name", "cat-toy-v2")
    r = cli("resume", run)
    assert r.exit_code == 0, r.output
    assert "Registered as cat-toy-v3 (<cat-toy>, sd1, 1 vector(s)): the name cat-toy-v2 was taken" in r.stdout
    again = cli("resume", run)
    assert again.exit_code == 1 and "This run already finished and is registered as cat-toy-v3." in again.stderr
    used, _ = _sampled(cli, model, tmp_path, printed(again.stderr, "Try: "))
    assert used == [("cat-toy-v3", "<cat-toy>")]

    # an explicit --name that is taken: refused before any work; the hint's name trains
    r = cli(*train, "--name", "cat-toy", "--seed", "2")
    assert r.exit_code == 1 and "--name cat-toy-v4" in r.stderr and not list((tmp_path / "runs").glob("cat-toy-v4*"))
    r = cli(*train, "--name", "cat-toy-v4", "--seed", "2")
    assert r.exit_code == 0 and "Registered as cat-toy-v4" in r.stdout and Registry().get("cat-toy-v4").active
    assert cli(*printed(r.stdout, "Switch back with `")).exit_code == 0  # textinv use cat-toy-v3
    assert Registry().resolve("<cat-toy>").name == "cat-toy-v3"
