"""Hostile Hub repos and secrets on their way out (README, "Guarantees").

- A repo listing `../`, absolute, backslashed, control-character or over-long file names: pull
  never downloads, reads or writes them (never outside the cache), never crashes, and names
  them escaped; the rest of the repo still pulls.
- Push never uploads an access token: not as the token (token_identifier.txt, the card, the
  commit message), not in metadata, not in a --message. It refuses before creating anything,
  and without printing it.
"""

from __future__ import annotations

import itertools
import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.helpers import random_embedding
from tests.support.hub_server import FAKE_TOKEN, hub, hubcli  # noqa: F401 - fixtures
from textinv_cli.formats import layouts
from textinv_cli.formats.safetensors_io import dump_safetensors
from textinv_cli.registry.store import Registry

# huggingface_hub's LFS upload hands httpx2 a file object as `data=`; httpx2 deprecates that spelling.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

HOSTILE = ["../evil", "../../../../tmp/evil", "/evil", "/abs/dir/evil", "a\\..\\evil", "C:/evil", "sub/../../evil",
           "./evil", "sub//evil", "evil\x1b]52;c;aGk=\x07", "evil\u202etxt", "evil\nline", "evil" + "n" * 300,
           "d/" * 600 + "evil", "sub/./evil", "evil\udcff"]
EXTS = [".pt", ".safetensors", ".bin"]
_repo_ids = itertools.count()
SETTINGS = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _clean(r) -> None:
    for text in (r.stdout, r.stderr):
        assert "Internal error" not in text and "Traceback" not in text, text[-1500:]
        assert "\x1b" not in text and "\u202e" not in text


@SETTINGS
@given(names=st.lists(st.tuples(st.sampled_from(HOSTILE), st.sampled_from(EXTS)).map("".join),
                      min_size=1, max_size=3, unique=True),
       with_good=st.booleans())
def test_pull_skips_listed_paths_that_could_leave_the_cache(hub, hubcli, tmp_path, names, with_good):
    good = random_embedding("<good>", seed=1)
    files = {n: dump_safetensors(layouts.diffusers_dict(random_embedding("<evil>", seed=2))) for n in names}
    if with_good:
        files["ok.safetensors"] = dump_safetensors(layouts.diffusers_dict(good))
    repo = f"someone/hostile-{next(_repo_ids)}"
    hub.seed(repo, files)
    hub.hits.clear()

    r = hubcli("pull", repo, "--json")
    _clean(r)
    if with_good:
        assert r.exit_code == 0, r.output
        (e,) = json.loads(r.stdout)["embeddings"]
        assert e["file"] == "ok.safetensors" and e["entry"]["token"] == "<good>"
    else:
        assert r.exit_code == 1 and "holds no embedding file" in r.stderr
    assert hub.served() == (["ok.safetensors"] if with_good else [])  # nothing hostile was fetched
    assert not [p for p in tmp_path.rglob("*evil*")]  # nor written anywhere, in or out of the cache
    assert all(e.token != "<evil>" for e in Registry().entries())

    from textinv_cli.hub.pull import pull

    if with_good:  # what the command reports as skipped: one escaped line per path
        skipped = pull(repo).skipped
        assert len(skipped) == len(names) and all(s.isprintable() for s in skipped)
    r = hubcli("pull", repo, "--file", names[0])  # asking for one by name does not reach it either
    _clean(r)
    assert r.exit_code == 1 and "has no file" in r.stderr


OWN = "myOwnSecretValue42"  # one of the user's tokens, not token-shaped: only the exact match catches it
SHAPED = "hf_" + "Q7x" * 9


def _register_then_become_owner(hub, monkeypatch, emb) -> None:
    """Register while OWN is nobody's token, then log in with it: the registry already holds it."""
    Registry().add(emb, source="imported", origin={})
    hub.add_user(OWN, "me2")
    monkeypatch.setenv("HF_TOKEN", OWN)


@SETTINGS
@given(where=st.sampled_from(["token", "meta value", "meta key", "tampered meta", "message"]),
       secret=st.sampled_from([OWN, SHAPED]))
def test_push_never_uploads_an_access_token(hub, hubcli, monkeypatch, textinv_home, where, secret):
    import shutil

    shutil.rmtree(textinv_home, ignore_errors=True)
    textinv_home.mkdir()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    if secret == SHAPED and where in ("token", "meta value", "meta key"):
        secret = OWN  # registration refuses a token-shaped token and drops such metadata (test_registry_damage)
    token = f"<{secret}>" if where == "token" else "<cat-toy>"
    meta = {"note": secret} if where == "meta value" else {secret: "x"} if where == "meta key" else {}
    _register_then_become_owner(hub, monkeypatch, random_embedding(token, meta=meta))
    if where == "tampered meta":  # written into registry.db by hand (or by a version without the rule)
        conn = sqlite3.connect(textinv_home / "registry.db")
        conn.execute("UPDATE embeddings SET meta = ?", (json.dumps({"note": f"see {secret}"}),))
        conn.commit()
        conn.close()
    name = Registry().entries()[0].name
    args = ["push", name, "--repo", "me2/leak"] + (["--message", f"upload {secret}"] if where == "message" else [])
    before = len(hub.hits)

    r = hubcli(*args)
    _clean(r)
    assert r.exit_code == 1 and "nothing was pushed" in r.stderr, r.output
    assert secret not in r.output + r.stderr and OWN not in r.output + r.stderr
    assert "me2/leak" not in hub.repos and len(hub.hits) == before  # refused before the first request


@SETTINGS
@given(wrap=st.sampled_from(["{}", "<{}>", " {}\n"]), shaped=st.booleans())
def test_pull_never_takes_an_access_token_as_the_token(hub, hubcli, monkeypatch, wrap, shaped):
    """token_identifier.txt holding the user's token (a link to ~/.cache/huggingface/token, once
    uploaded by a push) or anything token-shaped: refused unquoted, nothing registered."""
    from tests.support.hub_server import concept_repo

    secret = SHAPED if shaped else FAKE_TOKEN  # FAKE_TOKEN: the token this user is logged in with
    _, files = concept_repo()
    files["token_identifier.txt"] = wrap.format(secret).encode()
    repo = f"someone/leaky-{next(_repo_ids)}"
    hub.seed(repo, files)
    r = hubcli("pull", repo)
    _clean(r)
    assert r.exit_code == 1 and "access token" in r.stderr and secret not in r.output
    assert Registry().entries() == []


def test_push_leaves_out_validation_images_that_are_not_files_of_the_run(hub, hubcli, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\nPRIVATE")
    run = tmp_path / "runs" / "cat-toy-1"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step-000100-0.png").write_bytes(b"\x89PNG\r\n\x1a\nmine")
    (run / "samples" / "step-000200-0.png").symlink_to(outside)
    (run / "samples" / "step-000300-0.png").symlink_to("/proc/self/environ")
    Registry().add(random_embedding("<cat-toy>"), source="trained", origin={"run": str(run), "config": {}})
    r = hubcli("push", "cat-toy", "--repo", "me/cat-toy")
    assert r.exit_code == 0, r.output
    files = hub.head("me/cat-toy").files
    assert "samples/step-000100-0.png" in files
    assert "samples/step-000200-0.png" not in files and "samples/step-000300-0.png" not in files
