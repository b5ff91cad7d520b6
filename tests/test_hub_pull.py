"""textinv pull against the local Hub double, through the unmodified huggingface_hub client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.support.helpers import random_embedding
from tests.support.hub_server import FAKE_TOKEN, client_env, concept_repo, hub, hubcli  # noqa: F401 - fixtures
from textinv_cli.formats import layouts
from textinv_cli.formats.folders import sdxl_pair_files
from textinv_cli.formats.pickle_writer import dump_torch_pickle
from textinv_cli.formats.safetensors_io import dump_safetensors
from textinv_cli.registry.store import Registry

UNET = "unet/diffusion_pytorch_model.safetensors"


def pulled(r) -> list[dict]:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["embeddings"]


def test_pull_sd_concepts_repo_downloads_only_the_embedding(hub, hubcli):
    emb, files = concept_repo()
    files[UNET] = os.urandom(3 << 20)  # model weights beside it: must never be fetched
    commit = hub.seed("sd-concepts-library/cat-toy", files)

    (e,) = pulled(hubcli("pull", "sd-concepts-library/cat-toy", "--json"))
    entry = e["entry"]
    assert e["created"] and e["file"] == "learned_embeds.bin"
    assert (entry["name"], entry["token"], entry["family"], entry["source"]) == ("cat-toy", "<cat-toy>", "sd1", "pulled")
    assert entry["meta"]["learnable_property"] == "object" and entry["meta"]["format"] == "sd-concepts"
    import hashlib

    assert entry["origin"] == {"repo": "sd-concepts-library/cat-toy", "revision": "main", "commit": commit,
                               "file": "learned_embeds.bin",
                               "file_sha256": hashlib.sha256(files["learned_embeds.bin"]).hexdigest()}
    np.testing.assert_array_equal(Registry().load("cat-toy").vectors["clip_l"], emb.vectors["clip_l"])

    assert sorted(hub.served()) == ["learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt"]
    assert not [h for h in hub.hits if "unet" in h.path or h.path.endswith(hashlib.sha256(files[UNET]).hexdigest())]
    assert not list(hub.hf_home.rglob("diffusion_pytorch_model*"))
    # LFS bytes come from the storage host, which must never see the access token
    assert [h for h in hub.hits if h.host == "storage"] and all(h.auth is None for h in hub.hits if h.host == "storage")
    assert all(h.auth == f"Bearer {FAKE_TOKEN}" for h in hub.hits if h.host == "hub")


def test_pull_prints_what_it_registered(hub, hubcli):
    hub.seed("sd-concepts-library/cat-toy", concept_repo()[1])
    r = hubcli("pull", "sd-concepts-library/cat-toy")
    assert r.exit_code == 0, r.output
    assert "Pulled cat-toy (<cat-toy>, sd1, 1 vector) from sd-concepts-library/cat-toy/learned_embeds.bin at main" in r.stdout
    assert [e.name for e in Registry().entries()] == ["cat-toy"]


def test_single_file_repos_in_each_format(hub, hubcli):
    emb = random_embedding("<charturner>", n=3, seed=4)
    repos = {"someone/charturner-pt": ("charturner.pt", dump_torch_pickle(layouts.a1111_dict(emb))),
             "someone/charturner-kohya": ("charturner.safetensors",
                                          dump_safetensors(layouts.kohya_dict(emb), layouts.kohya_metadata(emb))),
             "someone/charturner-bin": ("learned_embeds.bin", dump_torch_pickle(layouts.diffusers_dict(emb)))}
    for i, (repo, (path, data)) in enumerate(repos.items()):
        hub.seed(repo, {path: data, "README.md": b"# charturner\n"})
        (e,) = pulled(hubcli("pull", repo, "--name", f"ct{i}", "--json"))
        if i == 0:
            assert e["created"] and e["entry"]["token"] == "<charturner>" and e["entry"]["origin"]["file"] == path
            assert e["entry"]["meta"]["format"] == "a1111"
        else:  # the same token and vectors in another format: the registry already has it
            assert not e["created"] and e["entry"]["name"] == "ct0"
    np.testing.assert_array_equal(Registry().load("ct0").vectors["clip_l"], emb.vectors["clip_l"])


def test_sdxl_pair(hub, hubcli):
    emb = random_embedding("<xl-toy>", family="sdxl", n=2, seed=1)
    files = sdxl_pair_files(emb)
    hub.seed("me/xl-toy", {**files, "README.md": b"# xl\n"})
    (e,) = pulled(hubcli("pull", "me/xl-toy", "--json"))
    entry = e["entry"]
    assert (entry["family"], entry["widths"], e["file"]) == ("sdxl", {"clip_g": 1280, "clip_l": 768},
                                                             "learned_embeds.safetensors")
    assert set(entry["origin"]["files"]) == {"learned_embeds.safetensors", "learned_embeds_2.safetensors"}
    loaded = Registry().load(entry["name"])
    for slot in ("clip_l", "clip_g"):
        np.testing.assert_array_equal(loaded.vectors[slot], emb.vectors[slot])


def test_sdxl_step_checkpoints_pull_as_pairs(hub, hubcli):
    """diffusers' SDXL script with --save_steps: learned_embeds(_2)-steps-N, one pair per step;
    pulling either file of a step brings its partner."""
    files = {}
    for step, seed in ((500, 1), (1000, 2)):
        pair = sdxl_pair_files(random_embedding("<xl-toy>", family="sdxl", n=2, seed=seed))
        files.update({name.replace(".safetensors", f"-steps-{step}.safetensors"): data for name, data in pair.items()})
    hub.seed("me/xl-steps", files)
    (e,) = pulled(hubcli("pull", "me/xl-steps", "--file", "learned_embeds-steps-500.safetensors", "--json"))
    assert e["entry"]["family"] == "sdxl"
    assert set(e["entry"]["origin"]["files"]) == {"learned_embeds-steps-500.safetensors",
                                                   "learned_embeds_2-steps-500.safetensors"}
    (later,) = pulled(hubcli("pull", "me/xl-steps", "--file", "learned_embeds_2-steps-1000.safetensors",
                             "--name", "xl-toy-1000", "--json"))  # either file names the pair
    assert later["entry"]["family"] == "sdxl" and later["entry"]["sha256"] != e["entry"]["sha256"]


def test_a_pulled_token_that_exists_becomes_the_next_version(hub, hubcli):
    import shlex

    hub.seed("me/one", {"learned_embeds.safetensors": dump_safetensors(layouts.diffusers_dict(random_embedding(seed=5)))})
    hub.seed("me/two", {"learned_embeds.safetensors": dump_safetensors(layouts.diffusers_dict(random_embedding(seed=6)))})
    assert hubcli("pull", "me/one").exit_code == 0
    r = hubcli("pull", "me/two")
    assert r.exit_code == 0 and "Pulled cat-toy-v2 (<cat-toy>" in r.stdout, r.output
    assert "cat-toy-v2 is now the active <cat-toy>" in r.stdout
    back = r.stdout[r.stdout.index("Switch back with `") + 18:].split("`")[0]
    assert hubcli(*shlex.split(back)[1:]).exit_code == 0 and Registry().get("cat-toy").active


def test_an_ordinary_word_as_token_is_refused_with_the_pull_that_works(hub, hubcli):
    import shlex

    hub.seed("me/cat", {"cat.safetensors": dump_safetensors(layouts.diffusers_dict(random_embedding("cat", seed=4)))})
    r = hubcli("pull", "me/cat")
    assert r.exit_code == 1 and "is an ordinary word" in r.stderr and not Registry().entries(), r.output
    again = r.stderr.strip().splitlines()[-1].split(": ", 1)[1]
    r = hubcli(*shlex.split(again)[1:], "--json")  # as printed
    assert r.exit_code == 0 and json.loads(r.stdout)["embeddings"][0]["entry"]["token"] == "<cat>", r.output


def test_repo_with_several_embeddings(hub, hubcli):
    a, b = random_embedding("<bad-hands>", seed=2), random_embedding("<bad-prompt>", seed=3)
    hub.seed("someone/negatives", {"embeddings/bad-hands.pt": dump_torch_pickle(layouts.a1111_dict(a)),
                                   "embeddings/bad-prompt.safetensors": dump_safetensors(layouts.diffusers_dict(b)),
                                   "README.md": b"# negatives\n"})
    r = hubcli("pull", "someone/negatives")
    assert r.exit_code == 1
    assert "holds 2 embeddings: embeddings/bad-hands.pt, embeddings/bad-prompt.safetensors" in r.output
    assert "--file PATH" in r.output and "--all" in r.output
    assert Registry().entries() == [] and hub.served() == []  # decided from the listing: nothing fetched

    (e,) = pulled(hubcli("pull", "someone/negatives", "--file", "embeddings/bad-prompt.safetensors", "--json"))
    assert e["entry"]["token"] == "<bad-prompt>"
    both = pulled(hubcli("pull", "someone/negatives", "--all", "--json"))
    assert [(x["file"], x["created"]) for x in both] == [("embeddings/bad-hands.pt", True),
                                                         ("embeddings/bad-prompt.safetensors", False)]
    assert sorted(e.name for e in Registry().entries()) == ["bad-hands", "bad-prompt"]


def test_one_embedding_in_two_formats_is_one_embedding(hub, hubcli):
    emb = random_embedding("<EasyNegative>", seed=5)  # A1111 takes the .pt file stem as the token
    hub.seed("someone/easynegative", {"EasyNegative.safetensors": dump_safetensors(layouts.diffusers_dict(emb)),
                                      "EasyNegative.pt": dump_torch_pickle(layouts.a1111_dict(emb))})
    (e,) = pulled(hubcli("pull", "someone/easynegative", "--json"))
    assert e["file"] == "EasyNegative.safetensors"  # preferred: no pickle
    assert hub.served() == ["EasyNegative.safetensors"]
    (again,) = pulled(hubcli("pull", "someone/easynegative", "--file", "EasyNegative.pt", "--json"))
    assert not again["created"]


def test_revision_by_branch_and_by_commit(hub, hubcli):
    v1, files = concept_repo(seed=10)
    first = hub.seed("me/cat", files)
    v2, files2 = concept_repo(seed=11)
    hub.seed("me/cat", files2, branch="v2")
    hub.seed("me/cat", concept_repo(seed=12)[1])  # main moves on

    (e,) = pulled(hubcli("pull", "me/cat", "--revision", "v2", "--json"))
    assert e["entry"]["origin"]["revision"] == "v2" and e["entry"]["origin"]["commit"] == hub.head("me/cat", "v2").sha
    np.testing.assert_array_equal(Registry().load("cat-toy").vectors["clip_l"], v2.vectors["clip_l"])

    (e,) = pulled(hubcli("pull", "me/cat", "--revision", first, "--name", "cat-v1", "--json"))
    assert e["entry"]["origin"]["revision"] == first == e["entry"]["origin"]["commit"]
    np.testing.assert_array_equal(Registry().load("cat-v1").vectors["clip_l"], v1.vectors["clip_l"])


def test_pulling_again_changes_nothing(hub, hubcli):
    hub.seed("sd-concepts-library/cat-toy", concept_repo()[1])
    assert hubcli("pull", "sd-concepts-library/cat-toy").exit_code == 0
    before = Registry().entries()
    r = hubcli("pull", "sd-concepts-library/cat-toy", "--name", "other")
    assert r.exit_code == 0
    assert "Already registered as cat-toy" in r.stdout and "nothing changed" in r.stdout
    assert "not added again as other" in r.stdout
    assert Registry().entries() == before


def test_pulled_pickles_go_through_the_safe_reader(hub, hubcli, tmp_path):
    from tests.support import malicious_pickles as mp

    marker = tmp_path / "pwned"
    hub.seed("evil/embedding", {"learned_embeds.bin": mp.build("os_system", marker).data})
    r = hubcli("pull", "evil/embedding")
    assert r.exit_code == 1
    assert "os.system" in r.output and "evil/embedding/learned_embeds.bin" in r.output
    assert not marker.exists() and Registry().entries() == []


def test_offline_from_a_filled_cache_with_no_server(hub, hubcli, tmp_path):
    emb, files = concept_repo()
    commit = hub.seed("sd-concepts-library/cat-toy", {**files, UNET: b"\0" * 4096})
    assert hubcli("pull", "sd-concepts-library/cat-toy").exit_code == 0
    hub.stop()  # nothing answers any more

    # A fresh process, configured only by the environment a user would set.
    env = {**os.environ, **client_env(None, hub.hf_home, offline=True), "TEXTINV_HOME": str(tmp_path / "elsewhere")}
    env.pop("HF_ENDPOINT", None)
    env.pop("HF_TOKEN", None)
    out = subprocess.run([sys.executable, "-m", "textinv_cli", "pull", "sd-concepts-library/cat-toy", "--json"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    (e,) = json.loads(out.stdout)["embeddings"]
    assert json.loads(out.stdout)["cache_reason"] == "offline"
    assert e["created"] and e["entry"]["origin"]["commit"] == commit and e["entry"]["token"] == "<cat-toy>"
    assert e["entry"]["sha256"] == emb.content_sha256()


def test_hub_down_falls_back_to_the_cache(hub, hubcli, monkeypatch, tmp_path):
    hub.seed("sd-concepts-library/cat-toy", concept_repo()[1])
    assert hubcli("pull", "sd-concepts-library/cat-toy").exit_code == 0
    hub.stop()  # online mode, but the Hub does not answer: like the client's own downloads, use the cache
    monkeypatch.setenv("TEXTINV_HOME", str(tmp_path / "elsewhere"))
    r = hubcli("pull", "sd-concepts-library/cat-toy")
    assert r.exit_code == 0, r.output
    assert "Using the local Hugging Face cache (the Hub could not be reached)" in r.stderr, (r.stdout, r.stderr)
    assert "Pulled cat-toy" in r.stdout
