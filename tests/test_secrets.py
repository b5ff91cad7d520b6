"""The access token never shows: not printed, logged, written, uploaded, nor in an
error, a --json answer or a TEXTINV_DEBUG=1 traceback, whatever the command.

Three recognisable fake tokens are configured at once, the three ways huggingface_hub finds
one: HF_TOKEN, the legacy HUGGING_FACE_HUB_TOKEN, and the `hf auth login` files under HF_HOME
(that one deliberately not hf_-shaped: masking must not rely on the shape alone). Every
output is searched for each token and for every 10-character piece of it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import random_embedding
from tests.support.hub_server import client_env, concept_repo, hub, use_client_env  # noqa: F401 - fixtures
from textinv_cli.engine import plugins
from textinv_cli.redact import redact

SECRET_ENV = "hf_FAKEsecretENVq7kZ3pLmN9wXy2vB5rT"        # HF_TOKEN: the one the client sends
SECRET_LEGACY = "hf_FAKEsecretOLDa8sD4fG6hJ1kL0zX3cV"     # HUGGING_FACE_HUB_TOKEN
SECRET_FILE = "tok-FILE-secret-Zq81-Wv64-Ux29-Yt07"       # saved by `hf auth login`
SECRETS = (SECRET_ENV, SECRET_LEGACY, SECRET_FILE)
PIECES = sorted({s[i:i + 10] for s in SECRETS for i in range(len(s) - 9)})

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def leaks(text) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return [p for p in PIECES if p in text]


def assert_clean(*texts, where: str = "output") -> None:
    for text in texts:
        found = leaks(text)
        assert not found, f"token pieces {found} in {where}: {text[:2000]!r}"


def assert_tree_clean(root: Path, skip: tuple[Path, ...] = ()) -> int:
    """Every file under `root` (but `skip`) holds no piece of a token; returns how many were read."""
    n = 0
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink() and path not in skip:
            assert not leaks(path.read_bytes()), f"a token in {path}"
            n += 1
    return n


@pytest.fixture
def secrets(hub, monkeypatch, tmp_path, caplog):
    """All three tokens configured (the Hub double knows them all: user "me"); returns run(*args)."""
    for token in SECRETS:
        hub.add_user(token, "me", orgs=["my-org"])
    hub.hf_home.mkdir(parents=True, exist_ok=True)
    hub.token_files = (hub.hf_home / "token", hub.hf_home / "stored_tokens")
    hub.token_files[0].write_text(SECRET_FILE)
    hub.token_files[1].write_text(f"[work]\nhf_token = {SECRET_FILE}\n")
    use_client_env(monkeypatch, client_env(hub.endpoint, hub.hf_home, token=SECRET_ENV))
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET_LEGACY)
    monkeypatch.setenv("HF_HUB_VERBOSITY", "debug")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    monkeypatch.chdir(tmp_path)
    from typer.testing import CliRunner

    from textinv_cli.cli.app import app

    def run(*args, code: int | None = 0):
        r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert_clean(r.stdout, r.stderr, caplog.text, where=f"textinv {' '.join(map(str, args))}")
        if code is not None:
            assert r.exit_code == code, r.output
        return r

    return run


def assert_hub_clean(hub) -> None:
    """What the Hub received: URLs, commit messages, stored files (cards, embeddings, images)."""
    assert_clean(*(h.path for h in hub.hits), where="a request URL")
    assert_clean(*(c.title for r in hub.repos.values() for c in r.commits.values()), where="a commit message")
    assert_tree_clean(hub.root)


def test_every_command_succeeds_without_showing_or_writing_the_token(secrets, hub, tmp_path, textinv_home):
    pytest.importorskip("torch")
    run = secrets
    model, images, runs = tmp_path / "tiny", tmp_path / "images", tmp_path / "run"
    run("--help")
    run("tiny-model", model, "--images", images)
    run("train", images, "--token", "<sec-toy>", "--init", "toy", "--model", model, "--steps", "2",
        "--checkpoint-every", "1", "--run-dir", runs, "--json")
    run("rm", "sec-toy")
    run("resume", runs, "--json")  # picks up from the newest checkpoint and registers again
    run("sample", "a <sec-toy>", "--model", model, "--steps", "2", "-o", tmp_path / "samples", "--json")
    assert list((tmp_path / "samples").glob("*.png"))

    from textinv_cli.formats import WRITERS

    out = tmp_path / "converted"
    out.mkdir()
    for fmt in (f for f, info in WRITERS.items() if "sd1" in info.families):
        run("convert", "sec-toy", "--to", fmt, "-o", out / f"sec-{fmt}", "--json")
    run("inspect", "sec-toy", "--json")
    run("inspect", out / "sec-a1111")
    run("import", out / "sec-kohya", "--name", "again", "--json")
    run("list")
    run("list", "--json")
    run("backends")
    run("backends", "--json")
    pushed = json.loads(run("push", "sec-toy", "--repo", "me/sec-toy", "--format", "a1111", "--format", "kohya",
                            "--json").stdout)
    assert "README.md" in pushed["files"]  # the card of a trained embedding: its settings are in it
    assert "Steps" in hub.content("me/sec-toy", "README.md").decode()
    run("rm", "sec-toy")
    run("pull", "me/sec-toy", "--json")
    run("pull", "me/sec-toy")

    assert all(h.auth == f"Bearer {SECRET_ENV}" for h in hub.hits if h.host == "hub")  # the token was in use
    assert_hub_clean(hub)
    for root in (tmp_path, textinv_home):  # run dir, samples, converted files, registry, HF cache
        assert_tree_clean(root, skip=hub.token_files)


def test_local_commands_failing_do_not_show_it(secrets, hub, tmp_path):
    run = secrets
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip " + SECRET_ENV.encode())  # even quoting the file is safe
    for args in (["convert", bad, "--to", "kohya"], ["convert", "nope", "--to", "kohya"],
                 ["inspect", bad, "--json"], ["import", bad],
                 ["rm", "nope"], ["train", tmp_path / "none", "--token", "<x>", "--init", "toy"],
                 ["resume", tmp_path], ["sample", "a", "--steps", "0"], ["tiny-model", tmp_path, "--family", "sd9"]):
        assert run(*args, code=None).exit_code in (1, 2)
    # the token typed where a placeholder token goes is refused without being echoed
    r = run("pull", "me/cat", "--token", SECRET_ENV, code=1)
    assert "looks like a Hugging Face access token" in r.output
    assert_tree_clean(tmp_path, skip=(*hub.token_files, bad))


def test_an_unexpected_error_quoting_the_token_is_masked(secrets, monkeypatch):
    def boom():
        raise RuntimeError(f"GET http://me:{SECRET_FILE}@x/api failed; Authorization: Bearer {SECRET_LEGACY}; "
                           f"headers={{'authorization': '{SECRET_ENV}'}}")

    monkeypatch.setattr(plugins, "probe_all", boom)
    r = secrets("backends", code=1)
    assert "Internal error: RuntimeError: GET http://me:***@x/api failed" in r.stderr
    assert "Authorization: Bearer hf_***; headers={'authorization': 'hf_***'}" in r.stderr


@pytest.mark.parametrize("status, what", [
    (401, "The Hub rejected your token (401 Unauthorized)"),
    (403, "not allowed to download from me/cat (403 Forbidden)"),
    (404, "refused to download from me/cat (HTTP 404)"),
    (500, "Could not reach the Hub"),
    (400, "refused to download from me/cat (HTTP 400): bad request, you sent Bearer hf_***"),
])
def test_hub_errors_do_not_show_it(secrets, hub, status, what):
    """Each status, with a server that echoes the Authorization header back in its error."""
    hub.seed("me/cat", concept_repo()[1])
    hub.forced = (status, "bad request, you sent {auth}")
    for args in (["pull", "me/cat"], ["pull", "me/cat", "--json"]):
        r = secrets(*args, code=1)
        assert what in r.stderr
    assert_hub_clean(hub)


def test_push_errors_do_not_show_it(secrets, hub):
    from textinv_cli.registry.store import Registry

    Registry().add(random_embedding("<cat-toy>"), source="imported", origin={})
    assert "403 Forbidden" in secrets("push", "cat-toy", "--repo", "someone-else/cat", code=1).stderr
    hub.forced = (422, "invalid commit from {auth}")
    assert "HTTP 422" in secrets("push", "cat-toy", "--repo", "me/cat", "--json", code=1).stderr
    hub.forced = None
    hub.tokens.clear()  # revoked everywhere: 401
    assert "401" in secrets("push", "cat-toy", "--repo", "me/cat", code=1).stderr
    assert_hub_clean(hub)


def test_an_endpoint_url_holding_the_token_is_masked(secrets, hub, monkeypatch):
    """A proxy URL with credentials in HF_ENDPOINT: quoted by "could not reach", never with the password."""
    port = hub.endpoint.rsplit(":", 1)[1]
    hub.stop()
    use_client_env(monkeypatch, client_env(f"http://me:{SECRET_ENV}@127.0.0.1:{port}", hub.hf_home,
                                           token=SECRET_ENV))
    r = secrets("pull", "me/cat", code=1)
    assert "Could not reach the Hub at http://me:***@127.0.0.1" in r.stderr


def test_debug_traceback_in_a_real_process_is_masked(hub, tmp_path, textinv_home):
    """TEXTINV_DEBUG=1 shows the whole chain, the client's exception too: with the token masked."""
    for token in SECRETS:
        hub.add_user(token, "me")
    hub.seed("me/cat", concept_repo()[1])
    hub.forced = (400, "bad request, you sent {auth}")
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(SECRET_FILE)
    env = {**os.environ, **client_env(hub.endpoint, home, token=SECRET_ENV), "HUGGING_FACE_HUB_TOKEN": SECRET_LEGACY,
           "TEXTINV_HOME": str(textinv_home), "TEXTINV_DEBUG": "1", "HF_HUB_VERBOSITY": "debug"}
    p = subprocess.run([sys.executable, "-m", "textinv_cli", "pull", "me/cat"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "huggingface_hub.errors.BadRequestError" in p.stderr  # the client's error...
    assert "bad request, you sent Bearer hf_***" in p.stderr  # ...masked
    assert_clean(p.stdout, p.stderr, where="the debug run")


def test_redact_masks_known_and_token_shaped_values(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.delenv("HF_STORED_TOKENS_PATH", raising=False)
    (tmp_path / "stored_tokens").write_text(f"[a]\nhf_token = {SECRET_FILE}\nrefresh_token = refresh-{SECRET_FILE}\n")
    text = redact(f"{SECRET_FILE} / refresh-{SECRET_FILE} / hf_{'x' * 30} / token=Bearer abc.def-ghi")
    assert text == "hf_*** / hf_*** / hf_*** / token=Bearer ***"
    assert redact("https://user:pw-123@host/x and the word hf_short") == "https://user:***@host/x and the word hf_short"
    # a secret in a URL's query (a signed download link, ?token=): masked; short values are no secret
    assert (redact("https://h/f?token=Zq81Wv64Ux&x=1 https://s3/b?X-Amz-Signature=0e2816607bc8&y=2 ?key=a", tokens=[])
            == "https://h/f?token=***&x=1 https://s3/b?X-Amz-Signature=***&y=2 ?key=a")
