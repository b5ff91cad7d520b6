"""URLs where textinv takes a repo id or a file: a huggingface.co URL names a repo (and a file,
a revision); any other URL is refused with a download command that works as printed; no
credential in a URL is ever echoed. Through the CLI, offline, no server."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.support.helpers import random_embedding
from tests.support.hub_cache import offline_cache  # noqa: F401 - fixture
from tests.support.hub_cache import hf_download_cache
from tests.support.hub_server import client_env, concept_repo, hub, hubcli, use_client_env  # noqa: F401 - fixtures
from textinv_cli.formats import layouts, write_embedding
from textinv_cli.formats.safetensors_io import dump_safetensors
from textinv_cli.hub.urls import RepoRef, parse_repo
from textinv_cli.registry.store import Registry

SECRETS = ("s3cret-pass", "civitaiKEY123", "hf_FAKEtokenABCDEF123456", "AMZSIGNATURE99", "ghp_abcdef1234567890")


@pytest.fixture
def cache(offline_cache):
    return offline_cache


def refused(r) -> str:
    """Exit 1, one clear message, no secret, no traceback, nothing registered."""
    out = r.output
    assert r.exit_code == 1, out
    assert "Traceback" not in out and "Internal error" not in out and "does not exist" not in out
    assert not [s for s in SECRETS if s in out], out
    assert Registry().entries() == []
    return out


def hinted_command(out: str, start: str) -> list[str]:
    """The shell command in the hint that starts with `start`, as a POSIX shell splits it."""
    line = out.strip().splitlines()[-1]
    cmd = line[line.index(start):]
    for end in (" && ", "; then", "), then", " (put"):
        cmd = cmd.split(end)[0]
    return shlex.split(cmd)


# -- Hub URLs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ref", [
    ("sd-concepts-library/cat-toy", RepoRef("sd-concepts-library/cat-toy")),
    ("https://huggingface.co/sd-concepts-library/cat-toy", RepoRef("sd-concepts-library/cat-toy")),
    ("huggingface.co/sd-concepts-library/cat-toy/", RepoRef("sd-concepts-library/cat-toy")),
    ("https://hf.co/me/toy/blob/main/learned_embeds.bin", RepoRef("me/toy", "main", "learned_embeds.bin")),
    ("https://huggingface.co/me/toy/resolve/v2/sub/x.pt?download=true#top", RepoRef("me/toy", "v2", "sub/x.pt")),
    ("https://huggingface.co/me/toy/tree/main/embeddings", RepoRef("me/toy", "main", "embeddings")),
    ("https://huggingface.co/me/toy/blob/refs%2Fpr%2F3/x.pt", RepoRef("me/toy", "refs/pr/3", "x.pt")),
    ("hf://me/toy@v1/x.pt", RepoRef("me/toy", "v1", "x.pt")),
    ("https://user:s3cret-pass@huggingface.co/me/toy", RepoRef("me/toy")),
    ("https://WWW.HuggingFace.co/me/toy/tree/v3", RepoRef("me/toy", "v3")),
])
def test_hub_urls_name_the_repo_file_and_revision(text, ref):
    assert parse_repo(text) == ref


def test_a_mirror_set_by_hf_endpoint_is_the_hub(monkeypatch, tmp_path):
    use_client_env(monkeypatch, client_env("https://hub.example.org", tmp_path, offline=True))
    assert parse_repo("https://hub.example.org/me/toy/blob/main/x.pt") == RepoRef("me/toy", "main", "x.pt")


@pytest.mark.parametrize("url, needle", [
    ("https://huggingface.co/datasets/me/toy", "is a dataset repository"),
    ("https://huggingface.co/me/toy/discussions/3", "is a Hugging Face page, not a repository"),
    ("https://huggingface.co/gpt2?token=hf_FAKEtokenABCDEF123456", "is a Hugging Face page, not a repository"),
])
def test_hub_urls_that_are_no_model_repo(cli, url, needle):
    assert needle in refused(cli("pull", url))


def test_url_and_options_must_agree(cli):
    out = refused(cli("pull", "https://huggingface.co/me/toy/blob/main/x.pt", "--file", "y.pt"))
    assert "The URL names the file 'x.pt', and --file says 'y.pt'" in out


def test_a_pasted_file_url_is_pulled_and_the_hint_of_convert_works_as_printed(cache, cli):
    """convert/inspect/import with a Hub URL say to pull it; the pull command printed runs as is."""
    emb = random_embedding("<toy>", n=1, seed=3)
    hf_download_cache(cache, "me/toy", {"learned_embeds.safetensors": dump_safetensors(layouts.diffusers_dict(emb))})
    url = "https://huggingface.co/me/toy/blob/main/learned_embeds.safetensors"
    for args in (["inspect", url], ["convert", url, "--to", "a1111"], ["import", url]):
        out = refused(cli(*args))
        assert "is on the Hugging Face Hub" in out
        assert "textinv pull me/toy --file learned_embeds.safetensors --revision main" in out
    argv = hinted_command(out, "textinv pull")
    r = cli(*argv[1:], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["embeddings"][0]["entry"]["sha256"] == emb.content_sha256()


# -- every other URL -------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["https://civitai.com/models/3036/charturner",
                                 "civitai.com/models/3036/charturner?modelVersionId=5637",
                                 "https://www.civitai.com/models/3036"])
def test_a_civitai_page_is_not_a_hub_repo(cli, url):
    out = refused(cli("pull", url))
    assert "is not on the Hugging Face Hub" in out and "does not download from" in out
    assert "Repository" not in out and "not found" not in out  # not taken as the repo 3036/charturner
    assert "Download button" in out and "textinv import" in out


@pytest.mark.parametrize("command", ["pull", "import"])
def test_a_file_link_gets_a_curl_command_that_works_as_printed(cli, command):
    url = "https://example.com/dl/$(touch pwned)/it's cat.pt/a%20b.pt?x=1&y=`id`"
    out = refused(cli(command, url))
    assert "is not on the Hugging Face Hub" in out if command == "pull" else "is a URL" in out
    curl = hinted_command(out, "curl")
    assert curl[:4] == ["curl", "-fL", "-o", "a b.pt"] or curl[:2] == ["curl", "-fLOJ"]
    assert curl[-1] == url
    plain = "https://example.com/emb/easynegative.safetensors"
    out = refused(cli(command, plain))
    assert hinted_command(out, "curl") == ["curl", "-fL", "-o", "easynegative.safetensors", plain]
    assert "&& textinv import easynegative.safetensors" in out


def test_a_github_page_link_becomes_its_raw_file(cli):
    out = refused(cli("import", "https://github.com/someone/embeddings/blob/main/neg/bad-hands.pt"))
    assert hinted_command(out, "curl") == ["curl", "-fL", "-o", "bad-hands.pt",
                                           "https://raw.githubusercontent.com/someone/embeddings/main/neg/bad-hands.pt"]


@pytest.mark.parametrize("url", [
    "https://user:s3cret-pass@example.com/emb/cat.safetensors",
    "https://civitai.com/api/download/models/5637?token=civitaiKEY123",
    "https://bucket.s3.amazonaws.com/cat.pt?X-Amz-Signature=AMZSIGNATURE99&X-Amz-Expires=60",
    "https://ghp_abcdef1234567890@github.com/o/r/raw/main/cat.pt",
    "https://example.com/hf_FAKEtokenABCDEF123456/cat.pt",
    "https://example.com/cat.pt#access_token=hf_FAKEtokenABCDEF123456",
])
@pytest.mark.parametrize("command", [["pull"], ["import"], ["inspect"], ["convert", "--to", "a1111"]])
def test_no_credential_in_a_url_is_echoed(cli, url, command):
    out = refused(cli(command[0], url, *command[1:]))
    if "?" in url and "@" not in url:
        assert "***" in out and "put your own value back in place of ***" in out


def test_convert_and_inspect_say_what_to_do_instead_of_asking_the_registry(cli):
    for args in (["inspect", "https://civitai.com/api/download/models/5637"],
                 ["convert", "https://example.com/x.safetensors", "--to", "kohya"]):
        out = refused(cli(*args))
        assert "is a URL: textinv reads local files" in out and "textinv list" not in out


def test_file_urls_name_the_path(cli, tmp_path):
    r = cli("import", f"file://{tmp_path}/my%20cat.pt")
    out = r.output
    assert r.exit_code == 1 and f"not a file:// URL: '{tmp_path}/my cat.pt'" in out


def test_an_existing_path_wins_over_a_url_look(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "civitai.com" / "models").mkdir(parents=True)
    write_embedding(random_embedding("<cat>"), tmp_path / "civitai.com" / "models" / "cat.safetensors", "safetensors")
    r = cli("import", "civitai.com/models/cat.safetensors")
    assert r.exit_code == 0, r.output
    assert cli("inspect", "civitai.com/models/cat.safetensors").exit_code == 0


def test_pull_by_url_from_the_hub(hub, hubcli):
    """Online: huggingface.co URLs and URLs on HF_ENDPOINT's host pull from the endpoint in use."""
    commit = hub.seed("sd-concepts-library/cat-toy", concept_repo()[1])
    r = hubcli("pull", "https://huggingface.co/sd-concepts-library/cat-toy/blob/main/learned_embeds.bin", "--json")
    assert r.exit_code == 0, r.output
    (e,) = json.loads(r.stdout)["embeddings"]
    assert e["entry"]["origin"]["commit"] == commit and e["file"] == "learned_embeds.bin"
    r = hubcli("pull", f"{hub.endpoint}/sd-concepts-library/cat-toy", "--json")
    assert r.exit_code == 0, r.output
    assert not json.loads(r.stdout)["embeddings"][0]["created"]  # the same one


@pytest.mark.parametrize("url", ["https://e.com/" + "a" * 100_000 + ".pt", "https://e.com/x.pt?" + "a=b&" * 20_000,
                                 "https://[::1/x.pt", "http://a:99999/x.pt", "https://\x1b[31m.com/x\u202e.pt",
                                 "ftp://e.com/x.pt", "hf://", "https://huggingface.co/" + "a/" * 5000])
@pytest.mark.parametrize("command", ["pull", "import", "inspect"])
def test_hostile_urls_get_a_short_escaped_answer(cli, url, command):
    out = refused(cli(command, url))
    assert "\x1b" not in out and "\u202e" not in out and len(out) < 2000
