"""textinv pull offline from a Hugging Face cache that hf_hub_download filled (diffusers'
load_textual_inversion, transformers, older clients): no trees/ listing, only refs/, blobs/ and
snapshots/. Built in tmp dirs (tests/support/hub_cache.py); no server, no network."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.support.helpers import random_embedding
from tests.support.hub_cache import offline_cache  # noqa: F401 - fixture
from tests.support.hub_cache import fake_commit, hf_download_cache, repo_dir, write_ref
from tests.support.hub_server import client_env, concept_repo, use_client_env
from textinv_cli.formats import layouts
from textinv_cli.formats.folders import sdxl_pair_files
from textinv_cli.formats.safetensors_io import dump_safetensors
from textinv_cli.registry.store import Registry

REPO = "sd-concepts-library/cat-toy"


@pytest.fixture
def cache(offline_cache):
    return offline_cache


def ok(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def failed(r, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    out = r.output
    assert "Traceback" not in out and "Internal error" not in out
    assert "\x1b" not in out and "\u202e" not in out  # nothing from the cache reaches the terminal raw
    for n in needles:
        assert n in out, f"{n!r} not in {out!r}"
    assert Registry().entries() == []
    return out


def safetensors(token="<cat-toy>", seed=0) -> bytes:
    return dump_safetensors(layouts.diffusers_dict(random_embedding(token, seed=seed)))


# -- what works ---------------------------------------------------------------------------------

def test_concept_repo_fetched_by_hf_hub_download(cache, cli):
    emb, files = concept_repo()
    files = {k: v for k, v in files.items() if k in ("learned_embeds.bin", "token_identifier.txt")}
    _, commit = hf_download_cache(cache, REPO, files)
    assert not (repo_dir(cache, REPO) / "trees").exists()

    out = ok(cli("pull", REPO, "--json"))
    (e,) = out["embeddings"]
    assert (out["cache_reason"], out["cache_listing"], out["commit"]) == ("offline", "files", commit)
    assert e["created"] and e["entry"]["token"] == "<cat-toy>" and e["entry"]["sha256"] == emb.content_sha256()
    assert e["entry"]["origin"] == {"repo": REPO, "revision": "main", "commit": commit, "file": "learned_embeds.bin",
                                    "file_sha256": hashlib.sha256(files["learned_embeds.bin"]).hexdigest()}


def test_what_diffusers_load_textual_inversion_leaves(cache, cli):
    """diffusers downloads learned_embeds.safetensors alone (and records .no_exist for the rest)."""
    emb = random_embedding("<toy>", n=1, seed=3)
    _, commit = hf_download_cache(cache, "me/toy", {"learned_embeds.safetensors":
                                                    dump_safetensors(layouts.diffusers_dict(emb))})
    (repo_dir(cache, "me/toy") / ".no_exist" / commit).mkdir(parents=True)
    (repo_dir(cache, "me/toy") / ".no_exist" / commit / "learned_embeds.bin").touch()
    r = cli("pull", "me/toy")
    assert r.exit_code == 0, r.output
    assert "Pulled toy (<toy>, sd1, 1 vector) from me/toy/learned_embeds.safetensors at main" in r.stdout
    assert "HF_HUB_OFFLINE is set" in r.stderr and "holds no listing of the repo" in r.stderr
    np.testing.assert_array_equal(Registry().load("toy").vectors["clip_l"], emb.vectors["clip_l"])


@pytest.mark.parametrize("layout", ["xet", "copies", "tree"])
def test_shared_xet_store_and_copied_files(cache, cli, layout):
    """Xet-era clients link blobs into the cache-wide store; without symlinks the client copies;
    snapshot_download leaves a listing."""
    emb, files = concept_repo()
    _, commit = hf_download_cache(cache, REPO, files, **{layout: True})
    (e,) = ok(cli("pull", REPO, "--json"))["embeddings"]
    assert e["entry"]["token"] == "<cat-toy>" and e["entry"]["meta"]["learnable_property"] == "object"
    assert e["entry"]["origin"]["commit"] == commit


def test_sdxl_pair_in_the_shared_xet_store(cache, cli):
    emb = random_embedding("<xl>", family="sdxl", n=2, seed=1)
    hf_download_cache(cache, "me/xl", sdxl_pair_files(emb), xet=True)
    (e,) = ok(cli("pull", "me/xl", "--json"))["embeddings"]
    assert e["entry"]["family"] == "sdxl"


def test_sdxl_pair(cache, cli):
    emb = random_embedding("<xl>", family="sdxl", n=2, seed=1)
    hf_download_cache(cache, "me/xl", sdxl_pair_files(emb))
    (e,) = ok(cli("pull", "me/xl", "--json"))["embeddings"]
    assert e["entry"]["family"] == "sdxl" and e["entry"]["sha256"] == emb.content_sha256()


def test_revisions_by_ref_and_by_commit(cache, cli):
    _, old = hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors(seed=1)}, commit=fake_commit("a"),
                               ref="v1")
    _, new = hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors(seed=2)}, commit=fake_commit("b"))
    (e,) = ok(cli("pull", "me/cat", "--revision", "v1", "--name", "v1", "--json"))["embeddings"]
    assert (e["entry"]["origin"]["revision"], e["entry"]["origin"]["commit"]) == ("v1", old)
    (e,) = ok(cli("pull", "me/cat", "--json"))["embeddings"]
    assert e["entry"]["origin"]["commit"] == new
    # a full commit hash names the snapshot folder itself: no ref needed
    os.unlink(repo_dir(cache, "me/cat") / "refs" / "v1")
    out = ok(cli("pull", "me/cat", "--revision", old, "--name", "again", "--json"))
    assert out["revision"] == old == out["commit"] and not out["embeddings"][0]["created"]  # the v1 entry


def test_a_hub_url_pulls_from_the_cache_too(cache, cli):
    _, commit = hf_download_cache(cache, "me/two", {"a.safetensors": safetensors("<a>", 1),
                                                    "b.safetensors": safetensors("<b>", 2)})
    (e,) = ok(cli("pull", "https://huggingface.co/me/two/blob/main/b.safetensors", "--json"))["embeddings"]
    assert e["entry"]["token"] == "<b>" and e["file"] == "b.safetensors"
    (e,) = ok(cli("pull", f"https://huggingface.co/me/two/resolve/{commit}/a.safetensors?download=true",
                  "--json"))["embeddings"]
    assert e["entry"]["origin"]["revision"] == commit and e["entry"]["token"] == "<a>"


# -- what is not there ----------------------------------------------------------------------------

def test_nothing_cached(cache, cli):
    failed(cli("pull", "me/none"), "me/none@main is not in the local Hugging Face cache", "unset HF_HUB_OFFLINE")
    hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()}, ref=None)  # a snapshot, but no ref
    failed(cli("pull", "me/cat"), "me/cat@main is not in the local Hugging Face cache")


def test_the_file_asked_for_was_never_downloaded(cache, cli):
    hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()})
    failed(cli("pull", "me/cat", "--file", "other.pt"), "me/cat@main has no file 'other.pt'")


# -- a hostile cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("data, why", [
    (b"../../../../etc", "it holds '../../../../etc', not a commit hash"),
    (b"\x1b]52;c;aGk=\x07" + b"a" * 40, "not a commit hash"),
    (b"0" * 300, "larger than"),
    (b"", "it holds '', not a commit hash"),
])
def test_damaged_ref(cache, cli, data, why):
    hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()}, ref=None)
    write_ref(cache, "me/cat", "main", data)
    out = failed(cli("pull", "me/cat"), "ref for me/cat@main", "is damaged", why, "full commit hash")
    assert "\\x1b" in out or b"\x1b" not in data


def test_ref_that_links_out_of_the_cache(cache, cli, tmp_path):
    _, commit = hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()}, ref=None)
    (tmp_path / "elsewhere").write_text(commit)
    (repo_dir(cache, "me/cat") / "refs").mkdir()
    os.symlink(tmp_path / "elsewhere", repo_dir(cache, "me/cat") / "refs" / "main")
    failed(cli("pull", "me/cat"), "is damaged", "link to a file outside")


def test_revision_that_climbs_out_of_refs(cache, cli):
    hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()})
    failed(cli("pull", "me/cat", "--revision", "../../../x"), "is not a revision name")


def test_snapshot_entries_that_are_not_the_repo_s_files(cache, cli, tmp_path):
    """Links out of the cache, a FIFO, a dangling link, a folder link, control characters: each is
    skipped with an escaped line; the one real embedding is pulled."""
    snapshot, _ = hf_download_cache(cache, "me/mixed", {"good.safetensors": safetensors("<good>", 1)})
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(safetensors("<stolen>", 2))
    os.symlink(outside, snapshot / "stolen.safetensors")
    os.symlink(tmp_path, snapshot / "folder-link")
    os.symlink(snapshot / "gone", snapshot / "dangling.safetensors")
    os.mkfifo(snapshot / "pipe.safetensors")
    (snapshot / "evil\x1b[2J.safetensors").write_bytes(safetensors("<evil>", 3))

    r = cli("pull", "me/mixed", "--all")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output
    err = r.stderr
    assert "Skipped stolen.safetensors: a link to a file outside the snapshot folder" in err
    assert "Skipped pipe.safetensors: a named pipe (FIFO)" in err
    assert "Skipped dangling.safetensors: a link to a file that does not exist" in err
    assert "Skipped folder-link:" in err
    assert "Skipped evil\\x1b[2J.safetensors: holds control" in err
    assert [e.token for e in Registry().entries()] == ["<good>"]


def test_huge_file_is_never_read(cache, cli):
    snapshot, _ = hf_download_cache(cache, "me/big", {"x.txt": b"x"})
    with open(snapshot / "learned_embeds.safetensors", "wb") as f:  # sparse: 3 GiB listed, nothing on disk
        f.truncate(3 << 30)
    failed(cli("pull", "me/big"), "learned_embeds.safetensors is too big to be an embedding")
    failed(cli("pull", "me/big", "--file", "learned_embeds.safetensors"), "model weights, not an embedding")


def test_blob_swapped_for_a_link_out_of_the_cache(cache, cli, tmp_path):
    """The snapshot's link is the client's, but the blob it leads to now leads elsewhere."""
    snapshot, _ = hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()})
    blob = os.path.realpath(snapshot / "cat.safetensors")
    (tmp_path / "token").write_bytes(safetensors("<other>", 5))
    os.unlink(blob)
    os.symlink(tmp_path / "token", blob)
    failed(cli("pull", "me/cat"), "cat.safetensors: a link to a file outside the snapshot folder", "no embedding")


@pytest.mark.parametrize("tree", [False, True])
def test_a_linked_folder_in_the_snapshot(cache, cli, tmp_path, tree):
    """Listed or not, a file reached through a folder link is not the snapshot's."""
    snapshot, _ = hf_download_cache(cache, "me/sub", {"a/x.safetensors": safetensors("<x>", 1),
                                                      "b/y.safetensors": safetensors("<y>", 2)}, tree=tree)
    (tmp_path / "out").mkdir()
    os.replace(os.path.realpath(snapshot / "b" / "y.safetensors"), tmp_path / "out" / "y.safetensors")
    os.unlink(snapshot / "b" / "y.safetensors")
    os.rmdir(snapshot / "b")
    os.symlink(tmp_path / "out", snapshot / "b")
    r = cli("pull", "me/sub", "--file", "b/y.safetensors")
    assert r.exit_code == 1 and Registry().entries() == []
    assert ("which is not a folder of the snapshot" if tree else "has no file 'b/y.safetensors'") in r.output


@pytest.mark.parametrize("tree", [False, True])
def test_a_snapshot_folder_that_is_a_link(cache, cli, tmp_path, tree):
    snapshot, commit = hf_download_cache(cache, "me/cat", {"cat.safetensors": safetensors()}, tree=tree)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cat.safetensors").write_bytes(safetensors("<other>", 9))
    os.rename(snapshot, tmp_path / "moved")
    os.symlink(tmp_path / "elsewhere", snapshot)
    failed(cli("pull", "me/cat"), "me/cat@main is not in the local Hugging Face cache")


def test_hub_unreachable_uses_what_hf_hub_download_left(cache, cli, monkeypatch, tmp_path):
    """Online mode, but nothing answers (a closed local port): the same fallback as offline."""
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    use_client_env(monkeypatch, client_env(f"http://127.0.0.1:{port}", cache.parent, offline=False))
    _, commit = hf_download_cache(cache, "me/toy", {"learned_embeds.safetensors": safetensors("<toy>", 4)})
    r = cli("pull", "me/toy", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["cache_reason"], out["cache_listing"], out["commit"]) == ("unreachable", "files", commit)


def test_a_fresh_process_configured_only_by_the_environment(cache, tmp_path):
    """`python -m textinv_cli pull` as a user runs it: HF_HOME and HF_HUB_OFFLINE from the environment."""
    import subprocess
    import sys
    from pathlib import Path

    emb, files = concept_repo()
    _, commit = hf_download_cache(cache, REPO, {"learned_embeds.bin": files["learned_embeds.bin"]})
    env = {**os.environ, **client_env(None, cache.parent, offline=True), "TEXTINV_HOME": str(tmp_path / "home")}
    env.pop("HF_ENDPOINT", None)
    out = subprocess.run([sys.executable, "-m", "textinv_cli", "pull", "https://huggingface.co/" + REPO, "--json"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    (e,) = json.loads(out.stdout)["embeddings"]
    assert e["entry"]["origin"]["commit"] == commit and e["entry"]["token"] == "<cat_toy_v0>"


@pytest.mark.parametrize("damage", ["no marker", "wrong prefix", "store is a link"])
def test_the_shared_store_is_followed_only_where_it_is_one(cache, cli, damage, tmp_path):
    """A snapshot member may resolve into <cache>/blobs/XX/HASH only when that is
    huggingface_hub's marked store and the path has the store's own shape."""
    import shutil

    emb = random_embedding("<xl>", family="sdxl", n=2, seed=1)
    hf_download_cache(cache, "me/xl", sdxl_pair_files(emb), xet=True)
    store = Path(cache) / "blobs"
    assert (store / ".huggingface-shared-blobs").is_file() and list(store.glob("??/*"))
    if damage == "no marker":
        (store / ".huggingface-shared-blobs").unlink()
    elif damage == "wrong prefix":
        for payload in [p for p in store.glob("??/*") if p.is_file()]:
            moved = store / ("00" if payload.parent.name != "00" else "11") / payload.name
            moved.parent.mkdir(exist_ok=True)
            payload.rename(moved)
            for link in Path(cache).glob("models--*/blobs/*"):
                if link.is_symlink() and os.readlink(link).endswith(payload.name):
                    link.unlink()
                    link.symlink_to(os.path.relpath(moved, link.parent))
    else:
        elsewhere = tmp_path / "elsewhere-store"
        shutil.move(str(store), str(elsewhere))
        store.symlink_to(elsewhere)
    r = cli("pull", "me/xl", "--json")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
