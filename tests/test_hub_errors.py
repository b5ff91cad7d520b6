"""Every way pull/push can fail says what to do, registers nothing, and never shows the token."""

from __future__ import annotations

import types

import pytest

from tests.support.helpers import random_embedding
from tests.support.hub_server import FAKE_TOKEN, client_env, concept_repo, hub, hubcli, use_client_env  # noqa: F401
from textinv_cli.hub import pull as hub_api
from textinv_cli.errors import HubError, TextinvError
from textinv_cli.hub.layout import choose_units, find_units, is_weight
from textinv_cli.registry.store import Registry

# huggingface_hub's LFS upload hands httpx2 a file object as `data=`; httpx2 deprecates that spelling.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def failed(r, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "Internal error" not in r.output
    for n in needles:
        assert n in r.output, f"{n!r} not in {r.output!r}"
    assert Registry().entries() == []
    return r.output


def logged_out(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_repository_not_found(hub, hubcli):
    failed(hubcli("pull", "me/nope"), f"Repository me/nope was not found on {hub.endpoint}",
           "or your token cannot see it", "Check the repo id")


def test_private_repository_without_a_token(hub, hubcli, monkeypatch):
    hub.seed("someone/secret", concept_repo()[1], private=True)
    logged_out(monkeypatch)
    failed(hubcli("pull", "someone/secret"), "not found", "private and you are not logged in",
                 "hf auth login", "HF_TOKEN")
    assert [h.auth for h in hub.hits] == [None]  # anonymous, and the Hub answered 401 RepoNotFound


def test_gated_repository(hub, hubcli, monkeypatch):
    hub.seed("someone/gated", concept_repo()[1], gated="manual")
    failed(hubcli("pull", "someone/gated"), "someone/gated is a gated repository",
           f"Ask for access at {hub.endpoint}/someone/gated")
    logged_out(monkeypatch)
    failed(hubcli("pull", "someone/gated"), "gated", "you are not logged in", "hf auth login")
    assert hub.served() == []
    # once the account has access, the same pull works
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub.repos["someone/gated"].allowed.add("me")
    assert hubcli("pull", "someone/gated").exit_code == 0


def test_unknown_revision(hub, hubcli):
    hub.seed("me/cat", concept_repo()[1])
    failed(hubcli("pull", "me/cat", "--revision", "v9"), "me/cat has no revision 'v9'", "--revision")


def test_repo_without_an_embedding_lists_what_is_there(hub, hubcli):
    hub.seed("me/a-model", {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"\0" * 2048,
                            "v1-5-pruned.ckpt": b"\0" * 2048, "README.md": b"# a model\n"})
    failed(hubcli("pull", "me/a-model"), "me/a-model@main holds no embedding file",
           "It has: .gitattributes, README.md, model_index.json, unet/diffusion_pytorch_model.safetensors, "
           "v1-5-pruned.ckpt", "--file PATH")
    assert hub.served() == []


def test_file_that_is_not_there_or_not_an_embedding(hub, hubcli):
    hub.seed("me/cat", concept_repo()[1])
    failed(hubcli("pull", "me/cat", "--file", "nope.pt"), "has no file 'nope.pt'", "learned_embeds.bin")
    failed(hubcli("pull", "me/cat", "--file", "README.md"), "README.md is not an embedding file")


def test_offline_with_nothing_cached(hub, hubcli, monkeypatch):
    use_client_env(monkeypatch, client_env(hub.endpoint, hub.hf_home, offline=True, token=FAKE_TOKEN))
    failed(hubcli("pull", "sd-concepts-library/cat-toy"),
           "sd-concepts-library/cat-toy@main is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set",
           "unset HF_HUB_OFFLINE")
    assert hub.hits == []  # offline means offline


def test_hub_unreachable_with_nothing_cached(hub, hubcli):
    hub.stop()
    failed(hubcli("pull", "sd-concepts-library/cat-toy"), f"Could not reach the Hub at {hub.endpoint}",
           "not in the local cache", "Check your connection")


def test_network_failure_mid_download_registers_nothing(hub, hubcli, monkeypatch):
    import hashlib

    from huggingface_hub import file_download

    # The client retries a broken download 5 times, a second apart; keep the retries, skip the waits.
    fast = types.SimpleNamespace(**{k: getattr(file_download.time, k) for k in dir(file_download.time)
                                    if not k.startswith("__")})
    fast.sleep = lambda seconds: None
    monkeypatch.setattr(file_download, "time", fast)
    files = concept_repo()[1]
    files["learned_embeds.bin"] += b"\0" * 8192  # zip readers ignore trailing bytes; a longer transfer to cut
    hub.seed("sd-concepts-library/cat-toy", files)
    oid = hashlib.sha256(files["learned_embeds.bin"]).hexdigest()
    hub.cut[oid] = 1000  # the storage host dies 1000 bytes into the file

    failed(hubcli("pull", "sd-concepts-library/cat-toy"), "The download from sd-concepts-library/cat-toy@main "
           "was interrupted", "nothing was registered", "run the command again")
    assert len([h for h in hub.hits if h.host == "storage" and h.method == "GET"]) == 6  # 1 + 5 retries
    leftovers = [p for p in hub.hf_home.rglob("*") if p.name.endswith(".incomplete") or p.name == "learned_embeds.bin"]
    assert leftovers == []  # nothing half-written in the cache either


def test_invalid_token(hub, hubcli):
    hub.tokens.clear()  # the Hub does not know this token (revoked)
    failed(hubcli("pull", "me/cat"), "The Hub rejected your token (401 Unauthorized)", "hf auth login")


def test_push_without_a_token(hub, hubcli, monkeypatch):
    Registry().add(random_embedding("<cat-toy>"), source="imported", origin={})
    logged_out(monkeypatch)
    r = hubcli("push", "cat-toy", "--repo", "me/cat-toy")
    assert r.exit_code == 1
    assert "Pushing needs a Hugging Face access token" in r.output and "hf auth login" in r.output
    assert "HF_TOKEN" in r.output and hub.hits == []


def test_push_while_offline(hub, hubcli, monkeypatch):
    Registry().add(random_embedding("<cat-toy>"), source="imported", origin={})
    use_client_env(monkeypatch, client_env(hub.endpoint, hub.hf_home, offline=True, token=FAKE_TOKEN))
    r = hubcli("push", "cat-toy", "--repo", "me/cat-toy")
    assert r.exit_code == 1 and "Pushing needs the network, and HF_HUB_OFFLINE is set" in r.output
    assert hub.hits == []


def test_push_to_a_namespace_without_rights(hub, hubcli):
    Registry().add(random_embedding("<cat-toy>"), source="imported", origin={})
    r = hubcli("push", "cat-toy", "--repo", "someone-else/cat-toy")
    assert r.exit_code == 1
    assert "not allowed to push to someone-else/cat-toy (403 Forbidden)" in r.output and "write access" in r.output
    assert "someone-else/cat-toy" not in hub.repos


def test_access_token_given_as_placeholder_is_refused_and_not_echoed(hub, hubcli):
    hub.seed("me/cat", concept_repo()[1])
    failed(hubcli("pull", "me/cat", "--token", FAKE_TOKEN), "looks like a Hugging Face access token", "HF_TOKEN")


ERROR_PATHS = {
    "not found": lambda h: hub_api.pull("me/nope"),
    "bad revision": lambda h: (h.seed("me/c", concept_repo()[1]), hub_api.pull("me/c", revision="x")),
    "gated": lambda h: (h.seed("o/g", concept_repo()[1], gated="auto"), hub_api.pull("o/g")),
    "bad token": lambda h: (h.tokens.clear(), hub_api.pull("me/c")),
    "placeholder": lambda h: hub_api.pull("me/c", token=FAKE_TOKEN),
    "repo id": lambda h: hub_api.pull(f"https://x/{FAKE_TOKEN}"),
    "push 403": lambda h: (Registry().add(random_embedding(), source="imported", origin={}),
                           __import__("textinv_cli.hub.push").hub.push.push("cat-toy", "other/x")),
}


@pytest.mark.parametrize("path", sorted(ERROR_PATHS))
def test_the_token_is_in_no_exception_message(hub, path):
    with pytest.raises(Exception) as info:
        ERROR_PATHS[path](hub)
    exc, texts = info.value, []
    while exc is not None:  # ours and every client exception it was translated from
        texts += [str(exc), repr(exc), str(getattr(exc, "hint", "")), str(getattr(exc, "server_message", ""))]
        exc = exc.__cause__ or exc.__context__
    assert isinstance(info.value, TextinvError)
    assert not [t for t in texts if FAKE_TOKEN in t]


def test_layout_rules_on_listings():
    assert is_weight("unet/diffusion_pytorch_model.safetensors") and is_weight("model.ckpt")
    assert is_weight("checkpoint-500/learned_embeds.safetensors") and is_weight("text_encoder/model.safetensors")
    assert not is_weight("learned_embeds.safetensors") and not is_weight("embeddings/cat.pt")
    units, big = find_units({"huge.safetensors": 2 << 30, "README.md": 10})
    assert units == [] and big == ["huge.safetensors"]
    with pytest.raises(HubError, match="huge.safetensors is too big to be an embedding"):
        choose_units(units, {"huge.safetensors": 2 << 30}, big, repo="r", file=None, take_all=False)
    with pytest.raises(HubError, match="model weights, not an embedding"):
        choose_units(units, {"huge.safetensors": 2 << 30}, big, repo="r", file="huge.safetensors", take_all=False)
    # the diffusers files at the root are the default, like load_textual_inversion(repo)
    units, _ = find_units({"learned_embeds.safetensors": 10, "learned_embeds.bin": 10, "token_identifier.txt": 5,
                           "learned_embeds-steps-500.safetensors": 10, "samples/a.png": 9})
    chosen, others = choose_units(units, {}, [], repo="r", file=None, take_all=False)
    assert chosen[0].files == ["learned_embeds.safetensors"] and chosen[0].alternates == ["learned_embeds.bin"]
    assert chosen[0].extras == ["token_identifier.txt"]
    assert [u.primary for u in others] == ["learned_embeds-steps-500.safetensors"]
