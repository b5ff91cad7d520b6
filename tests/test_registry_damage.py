"""A tampered registry.db row never breaks `list`, `rm` or `list --repair`,
and what may be registered at all: names and tokens with control, bidi or
invalid characters, lone surrogates, access tokens.

Rows are written straight into sqlite, the way an attacker (or a bad disk, or a hand edit) would:
bad, huge or deeply nested JSON, wrong types in every column, names that are not UTF-8, not
text, or act on a terminal. Every damaged row must list (flagged), show in `list --repair` with
the exact command that removes it, and that command, run as printed, must remove it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.helpers import random_embedding
from textinv_cli.errors import InvalidEmbeddingError, RegistryError
from textinv_cli.registry.store import Registry


class Raw(bytes):
    """Bytes stored as TEXT (CAST): a TEXT column holding bytes that are not UTF-8."""


DEEP = "[" * 50_000 + "]" * 50_000                      # json.loads: RecursionError
HUGE = "[" + ",".join(["[]"] * 400_000) + "]"             # 1.2 MB: ~40 MB once parsed
BAD_JSON = ["{", "", "null", "[1, 2]", '{"a": 1}', '{"a": [1]}', "1e999", "9" * 5000, "NaN", DEEP, HUGE,
            '{"a":' * 200 + "1" + "}" * 200, b"\x00blob", Raw(b'{"a": "\xff"}')]
BAD_TEXT = ["bad\x1b]52;c;aGVsbG8=\x07", "bad\u202etxt.exe", "bad\nname", "bad\x85\u200b", Raw(b"bad\xff\xfe"),
            b"bad-blob", "n" * 100_000, "\ud800".encode("utf-8", "surrogatepass")]
DAMAGE = ([("name", v) for v in BAD_TEXT + [None, ""]] + [("token", v) for v in BAD_TEXT + [" "]]
          + [(c, v) for c in ("widths", "origin", "meta", "tags") for v in BAD_JSON
             if (c, v) not in {("widths", '{"a": 1}'), ("origin", '{"a": 1}'), ("origin", '{"a": [1]}')}]
          + [("widths", '{"clip_l": -1}'), ("widths", '{"clip_l": true}'), ("meta", '{"k": {"deep": 1}}'),
             ("origin", '{"a": ' + "[" * 40 + "]" * 40 + "}")]
          + [("n_vectors", v) for v in ("abc", -5, 2**62, 1.5, b"\x01")]
          + [("sha256", v) for v in ("../../../etc/passwd", "", "g" * 64, b"blob", "A" * 64, "0" * 63 + "\n")]
          + [("source", v) for v in ("stolen", 7)] + [("family", v) for v in ("sd9", b"sd1")]
          + [("created", v) for v in (b"when", Raw(b"\xff"))])


def _home_reset(home) -> None:
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()


def _tamper(home, damage: list[tuple[str, object]]) -> dict:
    """A good entry "good" plus a row copied from it with `damage` applied; returns that row."""
    entry, _ = Registry().add(random_embedding("<good>"), source="imported", origin={"path": "/x/good.pt"})
    row = {k: (json.dumps(v) if k in ("widths", "origin", "meta", "tags") else v)
           for k, v in entry.to_json().items()}
    row["name"] = "damaged"
    row.update(damage)
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("PRAGMA ignore_check_constraints = ON")  # an edited file need not obey them either
    cols = list(row)
    marks = ", ".join("CAST(? AS TEXT)" if isinstance(row[c], Raw) else "?" for c in cols)
    conn.execute(f"INSERT INTO embeddings ({', '.join(cols)}) VALUES ({marks})",
                 [bytes(v) if isinstance(v, bytes) else v for v in (row[c] for c in cols)])
    conn.commit()
    conn.close()
    return row


def _clean(r) -> None:
    for text in (r.stdout, r.stderr):
        assert "Internal error" not in text and "Traceback" not in text, text[-2000:]
        assert "\x1b" not in text and "\u202e" not in text  # printed escaped, never raw


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(damage=st.lists(st.sampled_from(DAMAGE), min_size=1, max_size=3, unique_by=lambda d: d[0]))
def test_a_damaged_row_lists_and_the_printed_rm_command_removes_it(cli, textinv_home, damage):
    _home_reset(textinv_home)
    _tamper(textinv_home, damage)

    r = cli("list")
    _clean(r)
    assert r.exit_code == 0 and "good" in r.stdout
    r = cli("list", "--json")
    _clean(r)
    assert r.exit_code == 0
    listed = json.loads(r.stdout)
    assert len(listed) == 2
    assert len([e for e in listed if e.get("damaged")]) == 1
    assert [e["name"] for e in listed if "damaged" not in e] == ["good"]

    r = cli("list", "--repair", "--json")
    _clean(r)
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    (item,) = report["damaged"]
    fix = item["fix"]
    command = fix[len("Run `"):fix.index("`, then add it again")]
    assert fix.startswith("Run `textinv rm ") and command.isprintable()
    r = cli("list", "--repair")  # the same, for a person: the command is printed as is
    _clean(r)
    assert r.exit_code == 1 and command in r.stdout + r.stderr

    words = shlex.split(command)  # the command as a shell would run it
    assert words[:2] == ["textinv", "rm"]
    r = cli(*words[1:])
    _clean(r)
    assert r.exit_code == 0, r.output
    assert [e.name for e in Registry().entries()] == ["good"]
    assert cli("list", "--repair").exit_code == 0
    Registry().load("good")  # a blob the damaged row shared is still there for the good row


def test_a_damaged_entry_is_found_by_its_shown_name_and_never_loaded(textinv_home):
    _tamper(textinv_home, [("name", "bad\x1bname"), ("meta", DEEP)])
    reg = Registry()
    entry = reg.get("bad\\x1bname")  # as `list` shows it
    assert entry is not None and entry.name == "bad\x1bname" and "nested too deeply" in entry.damaged
    with pytest.raises(RegistryError) as err:
        reg.load(entry)
    assert "damaged" in err.value.message and "textinv rm 'bad\\x1bname'" in err.value.hint
    assert reg.get("bad\udcffname") is None  # a non-UTF-8 argv is a lookup, not a sqlite crash
    reg.remove("bad\\x1bname")
    assert [e.name for e in reg.entries()] == ["good"]


# -- what may be registered -------------------------------------------------------------------

UNSAFE = st.sampled_from(["\x1b", "\x07", "\n", "\r", "\x00", "\x85", "\x9b", "\u202e", "\u2066", "\u200b",
                          "\ufeff", "\u2028", "\ud800", "\udcff", "\U000e0041"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.text("abc-_", min_size=1, max_size=5), bad=UNSAFE, after=st.text("xyz", max_size=5),
       as_name=st.booleans())
def test_names_and_tokens_with_unsafe_characters_are_refused_before_anything_is_written(
        textinv_home, before, bad, after, as_name):
    _home_reset(textinv_home)
    value = f"<{before}{bad}{after}>"
    with pytest.raises(InvalidEmbeddingError) as err:  # a lone surrogate: never sqlite's UnicodeEncodeError
        if as_name:
            Registry().add(random_embedding("<fine>"), name=value, source="imported", origin={})
        else:
            Registry().add(random_embedding(value), source="imported", origin={})
    assert bad not in err.value.message + (err.value.hint or "")  # quoted escaped, if at all
    assert not (textinv_home / "blobs").exists() or not any((textinv_home / "blobs").iterdir())
    assert Registry().entries() == []


SECRET = "hf_" + "Zq9" * 10


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=st.sampled_from([SECRET, "api_org_" + "k" * 24, "users-own-token-value"]),
       wrap=st.sampled_from(["{}", "<{}>", " {} ", "x {} y"]), where=st.sampled_from(["token", "name", "meta"]))
def test_access_tokens_are_never_registered(textinv_home, monkeypatch, secret, wrap, where):
    _home_reset(textinv_home)
    monkeypatch.setenv("HF_TOKEN", "users-own-token-value")  # the user's own: refused whatever its shape
    value = wrap.format(secret)
    if where == "meta":
        emb = random_embedding("<fine>", meta={"note": value, "kept": "plain"})
        entry, _ = Registry().add(emb, source="imported", origin={})
        assert entry.meta == {"kept": "plain"} and Registry().get("fine").meta == {"kept": "plain"}
        return
    with pytest.raises(InvalidEmbeddingError) as err:
        if where == "name":
            Registry().add(random_embedding("<fine>"), name=value, source="imported", origin={})
        else:
            Registry().add(random_embedding(value), source="imported", origin={})
    assert secret not in err.value.message + (err.value.hint or "")  # refused without being quoted
    assert Registry().entries() == []
