"""textinv push against the local Hub double, and the round trip back with pull."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.support.helpers import random_embedding
from tests.support.hub_server import FAKE_TOKEN, concept_repo, hub, hubcli  # noqa: F401 - fixtures
from textinv_cli.registry.store import Registry

# huggingface_hub's LFS upload hands httpx2 a file object as `data=`; httpx2 deprecates that spelling.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 3)])


def pushed(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_push_then_pull_back_under_another_name(hub, hubcli, monkeypatch, tmp_path):
    emb = random_embedding("<cat-toy>", n=2, seed=7, meta={"learnable_property": "style"})
    entry, _ = Registry().add(emb, source="imported", origin={"path": "/somewhere/cat-toy.pt"})

    out = pushed(hubcli("push", "cat-toy", "--repo", "me/cat-toy", "--json"))
    head = hub.head("me/cat-toy")
    assert out["commit"] == head.sha and out["url"] == f"{hub.endpoint}/me/cat-toy" and out["changed"]
    assert out["commit_url"] == f"{hub.endpoint}/me/cat-toy/commit/{head.sha}"
    assert sorted(head.files) == [".gitattributes", "README.md", "learned_embeds.bin", "learned_embeds.safetensors",
                                  "token_identifier.txt", "type_of_concept.txt"]
    assert head.title == "Upload <cat-toy> textual inversion embedding (textinv)"
    # one commit on top of the repo's initial one; binaries went through LFS, text as git blobs
    assert hub.repos["me/cat-toy"].commits[head.parent].title == "initial commit"
    assert head.files["learned_embeds.safetensors"].lfs and head.files["learned_embeds.bin"].lfs
    assert not head.files["README.md"].lfs and not head.files["token_identifier.txt"].lfs
    assert hub.content("me/cat-toy", "token_identifier.txt") == b"<cat-toy>"
    assert hub.content("me/cat-toy", "type_of_concept.txt") == b"style"
    assert all(h.auth is None for h in hub.hits if h.host == "storage")  # the upload URL is signed, no token

    card = hub.content("me/cat-toy", "README.md")
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["license"] == "creativeml-openrail-m"
    assert meta["tags"] == ["textual_inversion", "stable-diffusion", "text-to-image", "diffusers", "textinv",
                            "stable-diffusion-v1"]
    assert meta["instance_prompt"] == "<cat-toy>" and "base_model" not in meta  # unknown: not invented
    text = card.decode()
    assert 'pipe.load_textual_inversion("me/cat-toy")' in text and "textinv pull me/cat-toy" in text
    assert "stable-diffusion-webui/embeddings/" in text and "embedding:cat-toy" in text
    assert entry.sha256 in text and "/somewhere" not in text and "Training settings" not in text

    # Someone else pulls it: same vectors, same content hash, the commit just made.
    monkeypatch.setenv("TEXTINV_HOME", str(tmp_path / "someone-else"))
    got = json.loads(hubcli("pull", "me/cat-toy", "--name", "cat-toy-from-hub", "--json").stdout)
    (e,) = got["embeddings"]
    assert e["created"] and e["entry"]["name"] == "cat-toy-from-hub" and e["file"] == "learned_embeds.safetensors"
    assert e["entry"]["sha256"] == entry.sha256 and e["entry"]["origin"]["commit"] == head.sha
    assert got["others"] == []
    np.testing.assert_array_equal(Registry().load("cat-toy-from-hub").vectors["clip_l"], emb.vectors["clip_l"])


def test_sdxl_push_writes_the_pair_and_kohya(hub, hubcli):
    emb = random_embedding("<xl-toy>", family="sdxl", n=1, seed=8, meta={"base_model": "stabilityai/stable-diffusion-xl-base-1.0"})
    Registry().add(emb, source="imported", origin={})
    r = hubcli("push", "xl-toy", "--repo", "me/xl", "--format", "a1111")
    assert r.exit_code == 1 and "a1111 format cannot hold an sdxl embedding" in r.output and "kohya" in r.output
    assert "me/xl" not in hub.repos  # refused before anything was created

    pushed(hubcli("push", "xl-toy", "--repo", "me/xl", "--format", "kohya", "--license", "openrail++", "--json"))
    files = hub.head("me/xl").files
    assert {"learned_embeds.safetensors", "learned_embeds_2.safetensors", "xl-toy.safetensors"} <= set(files)
    assert "learned_embeds.bin" not in files
    card = hub.content("me/xl", "README.md")
    meta = front_matter(card)
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["license"] == "openrail++"
    assert "stable-diffusion-xl" in meta["tags"]
    text = card.decode()
    assert "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in text and "StableDiffusionXLPipeline" in text
    assert "Download `xl-toy.safetensors`" in text

    (e,) = json.loads(hubcli("pull", "me/xl", "--json").stdout)["embeddings"]
    assert not e["created"] and e["entry"]["name"] == "xl-toy"  # the same content: already registered


def test_sd3_and_flux_are_refused_before_anything_is_created(hub, hubcli, tmp_path):
    import shlex

    emb = random_embedding("<f-toy>", family="flux", n=1, seed=9)
    Registry().add(emb, source="imported", origin={})
    r = hubcli("push", "f-toy", "--repo", "me/f")
    assert r.exit_code == 1 and "diffusers loads no FLUX.1 embeddings" in r.stderr, r.output
    assert "me/f" not in hub.repos
    hint = r.stderr.strip().splitlines()[-1]
    convert = hint[hint.index("`") + 1:hint.index("`", hint.index("`") + 1)]
    assert shlex.split(convert) == ["textinv", "convert", "f-toy", "--to", "comfyui"]
    assert hubcli(*shlex.split(convert)[1:], "-o", str(tmp_path / "f-toy.safetensors")).exit_code == 0  # works as printed


def test_trained_embedding_card_has_settings_and_images(hub, hubcli, tmp_path):
    from textinv_cli.engine.spec import TrainSpec

    run = tmp_path / "runs" / "cat-toy-1"
    (run / "samples").mkdir(parents=True)
    for step in (100, 200):
        (run / "samples" / f"step-{step:06d}-0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    spec = TrainSpec(data_dir=str(tmp_path / "my-private-photos"), token="<cat-toy>", init=["toy"],
                     model="stable-diffusion-v1-5/stable-diffusion-v1-5", run_dir=str(run), steps=200, lr=0.005,
                     batch_size=2, seed=42)
    emb = random_embedding("<cat-toy>", seed=9, meta={"base_model": spec.model, "step": "200"})
    Registry().add(emb, source="trained", origin={"run": str(run), "config": spec.to_json()})

    out = pushed(hubcli("push", "cat-toy", "--repo", "my-org/cat-toy", "--private", "--branch", "exp",
                        "--message", "first try", "--json"))
    repo = hub.repos["my-org/cat-toy"]
    assert repo.private and out["private"] and out["branch"] == "exp" and out["url"].endswith("/my-org/cat-toy/tree/exp")
    head = hub.head("my-org/cat-toy", "exp")
    assert head.title == "first try" and sorted(hub.head("my-org/cat-toy").files) == [".gitattributes"]
    assert {"samples/step-000100-0.png", "samples/step-000200-0.png"} <= set(head.files)

    text = hub.content("my-org/cat-toy", "README.md", "exp").decode()
    assert front_matter(text.encode())["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "## Training settings" in text
    for row in ("| Steps | `200` |", "| Learning rate | `0.005` |", "| Batch size | `2` |", "| Seed | `42` |",
                "| Initializer token(s) | `toy` |", "| Backend | `torch` |"):
        assert row in text
    assert "![samples/step-000200-0.png](samples/step-000200-0.png)" in text
    assert str(tmp_path) not in text and "my-private-photos" not in text  # no local paths in a public card


def test_second_identical_push_changes_nothing(hub, hubcli):
    Registry().add(random_embedding("<cat-toy>", seed=1), source="imported", origin={})
    first = pushed(hubcli("push", "cat-toy", "--repo", "me/cat-toy", "--format", "a1111", "--json"))
    assert "cat-toy.pt" in hub.head("me/cat-toy").files
    r = hubcli("push", "cat-toy", "--repo", "me/cat-toy", "--format", "a1111")
    assert r.exit_code == 0 and "Nothing changed" in r.stdout and f"Commit: {first['commit']}" in r.stdout
    assert hub.head("me/cat-toy").sha == first["commit"]
    # the A1111 copy is the same embedding: pulling takes the diffusers files and does not list it
    got = json.loads(hubcli("pull", "me/cat-toy", "--json").stdout)
    assert got["others"] == [] and not got["embeddings"][0]["created"]


def test_private_flag_never_publishes_into_an_existing_public_repo(hub, hubcli):
    hub.seed("me/public", {"README.md": b"# hi\n"})
    Registry().add(random_embedding("<cat-toy>", seed=1), source="imported", origin={})
    r = hubcli("push", "cat-toy", "--repo", "me/public", "--private")
    assert r.exit_code == 1 and "already exists and is public" in r.output
    assert sorted(hub.head("me/public").files) == [".gitattributes", "README.md"]


@pytest.mark.parametrize("args, message", [
    (["--format", "png"], "--format takes: safetensors, a1111, kohya"),
    (["--repo", "no-namespace"], "is not a Hub repository id"),
    (["--repo", "https://civitai.com/models/3036/charturner"], "is not on the Hugging Face Hub: textinv pushes only"),
    (["--repo", "https://huggingface.co/datasets/me/x"], "is a dataset repository"),
])
def test_bad_push_arguments(hub, hubcli, args, message):
    Registry().add(random_embedding("<cat-toy>", seed=1), source="imported", origin={})
    full = ["push", "cat-toy", "--repo", "me/x", *args] if args[0] != "--repo" else ["push", "cat-toy", *args]
    r = hubcli(*full)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not [h for h in hub.hits if h.method == "POST"]


def test_pull_and_push_never_import_torch_or_jax(hub, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    
    hub.seed("sd-concepts-library/cat-toy", concept_repo()[1])
    code = (
        "import json, sys\n"
        "from textinv_cli.cli.app import main\n"
        "codes = []\n"
        "for args in (['pull', 'sd-concepts-library/cat-toy'], ['push', 'cat-toy', '--repo', 'me/cat-toy']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "print(json.dumps({'codes': codes, 'modules': sorted(sys.modules)}))\n")
    # The fixture put HF_ENDPOINT, HF_HOME, HF_TOKEN... in os.environ: a fresh process reads them itself.
    env = {**os.environ, "TEXTINV_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).parent.parent, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0], out.stdout + out.stderr
    assert not {m for m in result["modules"] if m.split(".")[0] in ("torch", "jax", "jaxlib")}
    assert "learned_embeds.safetensors" in hub.head("me/cat-toy").files
    assert FAKE_TOKEN not in out.stdout + out.stderr
