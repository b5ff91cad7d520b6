"""What textinv prints cannot act on the terminal, whatever a file or the Hub holds
(README, "Guarantees").

A token, a metadata key or value, a tensor key quoted in an error, a registry row or a Hub file
name is chosen by whoever made the file. The rule (textinv_cli/cli/console.py, untrusted.py):
human output shows such text escaped (a visible \\x1b, \\u202e), never as rich markup, one
printed line per line; --json is valid ASCII JSON that round-trips the exact string; messages
are one line each; and redacting a message costs time linear in its length.

Hostile strings are drawn by hypothesis from the pieces that did harm in the review: CSI/SGR
and OSC sequences (OSC 52 writes the clipboard, OSC 8 makes links), C1 CSI (\\x9b), bidi
overrides and isolates, zero-width and separator characters, NUL/BEL/BS/CR/newlines (forged
lines), rich markup and emoji codes.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import struct
import time
import warnings

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.support.fuzz_cases import CORPUS, corpus_cases, time_bound
from tests.support.helpers import random_embedding
from tests.support.hub_server import hub  # noqa: F401 - fixture

HOSTILE_PIECES = (
    "\x1b[31m", "\x1b[2J\x1b[H", "\x1b]52;c;SGVsbG8=\x07", "\x1b]8;;file:///etc/passwd\x1b\\x\x1b]8;;\x1b\\",
    "\x9b31m", "\x9d0;title\x9c", "\x1bP+q\x1b\\", "\u202e", "\u2066", "\u2069", "\u200f", "\u200b", "\u2028",
    "\ufeff", "\n", "\r", "\r\n", "\t", "\x00", "\x07", "\x08", "\x7f", "\x85",
    "[bold]", "[/]", "[link=file:///etc]x[/link]", "[red on white]", ":warning:", ":smile:",
)
MARKUP = ("[bold]", "[/]", "[link=file:///etc]x[/link]", "[red on white]", ":warning:", ":smile:")
PLAIN = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6)


def hostile(max_pieces: int = 6, pieces=HOSTILE_PIECES):
    """A string holding at least one hostile piece, among plain ASCII."""
    return st.lists(st.one_of(st.sampled_from(pieces), PLAIN), min_size=1, max_size=max_pieces).map(
        "".join).filter(lambda s: any(p in s for p in pieces))


# What may never reach a terminal: C0 controls but the newline, DEL, C1, bidi marks, embeddings,
# overrides and isolates, zero-width characters, line/paragraph separators, BOM. Written out
# here independently of untrusted.py: this is the specification the product is held to.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def assert_terminal_safe(text: str, where: str = "output") -> None:
    m = RAW.search(text)
    assert m is None, f"raw {m.group()!r} reached the terminal in {where}: {text[:600]!r}"


def visible(s: str, limit: int | None = None) -> str:
    """How the string must appear once printed: every unsafe character as its escape (and cut
    to `limit` characters, as messages and long metadata are)."""
    from textinv_cli.untrusted import escape, shown

    return escape(s) if limit is None else shown(s, limit)


def in_text(s: str) -> str:
    """rich's Text() drops BEL, BS, VT, FF and CR on its own (harmless: nothing reaches the terminal)."""
    return s.translate({7: None, 8: None, 11: None, 12: None, 13: None})


def invoke(*args):
    from textinv_cli.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert_terminal_safe(r.stdout, f"stdout of textinv {args[0]}")
    assert_terminal_safe(r.stderr, f"stderr of textinv {args[0]}")
    return r


def assert_one_line_error(r, code: int = 1) -> None:
    """report(): an error is its message and its hint, one line each, nothing else."""
    assert r.exit_code == code, r.output
    lines = r.stderr.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("Error: "), r.stderr


def safetensors_bytes(tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> bytes:
    """A safetensors file written by hand: any key and metadata the format can carry."""
    header, body = {}, b""
    for key, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


_VEC = np.linspace(-1, 1, 768, dtype=np.float32).reshape(1, 768)
_CLI = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- class 3: redaction is linear ----------------------------------------------------------------

REDOS_PIECES = ("a.", "a-", "a", ".", "://", ":", "@", "x:", "hf_", "Bearer ", "bearer\t", "api_org_", "/", " ",
                "?token=", "&sig=", "&", "=")


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(runs=st.lists(st.tuples(st.sampled_from(REDOS_PIECES), st.integers(1, 100_000)), min_size=1, max_size=4),
       where=st.floats(0, 1))
def test_redact_is_linear_on_hostile_text_and_still_masks(runs, where):
    """Up to 200 KB built from the patterns' own alphabets (the review's 100 KB of "a." took 30 s)."""
    from textinv_cli.redact import redact

    text = "".join(piece * n for piece, n in runs)[:200_000]
    text += "a." * ((200_000 - len(text)) // 2)  # always the full size: the worst case is the long one
    secret, password = "hf_" + "Q7kZ3pLmN9wXy2vB5rT8uI", "pw-Zq81Wv64Ux"
    cut = int(len(text) * where)
    text = f"{text[:cut]} {secret} https://me:{password}@host {text[cut:]}"
    with time_bound(10):  # the quadratic patterns take minutes here: fail, don't stall CI
        start = time.perf_counter()
        out = redact(text, tokens=[])
        took = time.perf_counter() - start
    assert took < 0.5, f"redact took {took:.2f}s on {len(text)} characters"
    assert secret not in out and password not in out


# The masking redact() did before it was made linear, kept as the reference it must agree with.
_OLD_TOKEN = re.compile(r"\b(?:hf_|api_org_)[A-Za-z0-9]{20,}")
_OLD_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_OLD_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
URL_PIECES = ("a", "Z", "q", "1", ".", "+", "-", "_", "://", ":", "@", "/", " ", "\t", "\n", "hf_", "Bearer ", "http",
              "pw", "api_org_", "s3+x", "é", "\u212a", "\u017f", "\u0131", "x" * 20)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(URL_PIECES), max_size=30).map("".join))
def test_linear_redact_masks_exactly_what_the_old_patterns_masked(text):
    from textinv_cli.redact import redact

    old = _OLD_TOKEN.sub("hf_***", text)
    old = _OLD_BEARER.sub(lambda m: m.group(1) + "***", old)
    old = _OLD_URL.sub(lambda m: m.group(1) + "***@", old)
    assert redact(text, tokens=[]) == old


# -- the consoles ----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(s=hostile(8))
def test_the_consoles_escape_whatever_they_render(s):
    """str, Text, table cells, progress descriptions: on textinv's own consoles, nothing raw,
    no markup or emoji interpreted, no line break added; styles still work."""
    from rich.progress import Progress, TextColumn
    from rich.table import Table
    from rich.text import Text

    from textinv_cli.cli.console import console, err_console

    for con in (console, err_console):
        # wide enough for every escaped cell: a narrower table cuts a long cell with "…" by design
        # (print(width=) cannot widen past the console's own width, 80 under pytest)
        saved, con.width = con._width, 4000
        try:
            with con.capture() as cap:
                con.print(f"token {s} end")
                con.print(Text(f"text {s}", style="bold"))
                table = Table("name", box=None)
                table.add_row(s)
                table.add_row(Text(s))
                con.print(table)
        finally:
            con._width = saved
        out = cap.get()
        assert_terminal_safe(out, "a console")
        lines = out.splitlines()
        assert lines[0] == f"token {visible(s)} end" and lines[1] == f"text {visible(in_text(s))}"
        assert len(lines) == 5 and [line.strip() for line in lines[3:]] == [visible(s).strip(),
                                                                          visible(in_text(s)).strip()]
    progress = Progress(TextColumn("{task.description}", markup=False), console=console)
    progress.add_task(s)
    with console.capture() as cap:
        console.print(progress.get_renderable(), width=4000)
    assert_terminal_safe(cap.get(), "a progress bar")
    # a Text is measured before it is escaped (rich measures Text itself): it may be cut, never raw
    assert visible(in_text(s)).strip().startswith(cap.get().strip().rstrip("…"))


def test_on_a_terminal_only_rich_itself_writes_escape_sequences():
    """force_terminal: styles and cursor moves are rich's; the text's ESC/OSC/CSI are shown."""
    from rich.text import Text

    from textinv_cli.cli.console import SafeConsole

    buf = io.StringIO()
    con = SafeConsole(file=buf, force_terminal=True, color_system="standard", width=200)
    evil = "a\x1b]52;c;SGVsbG8=\x1b\\b\x9b2Jc\u202ed\x00"
    con.print(evil)
    con.print(Text(evil, style="bold"))
    out = buf.getvalue()
    first, second = out.split("\n")[:2]
    assert first == visible(evil)
    assert second == "\x1b[1m" + visible(evil) + "\x1b[0m"  # rich's bold, around the escaped text


def test_report_and_debug_traceback_and_python_output_are_escaped(capsys):
    from textinv_cli.cli.app import report
    from textinv_cli.errors import FormatError
    from textinv_cli.redact import install, print_traceback

    evil = "k\x1b]52;c;SGVsbG8=\x07\n\u202eFAKE: done\r"
    assert report(FormatError(f"bad key {evil}", f"try {evil}")) == 1
    assert report(RuntimeError(evil)) == 1
    try:
        raise ValueError(evil)
    except ValueError as e:
        print_traceback(e)
    err = capsys.readouterr().err
    assert_terminal_safe(err, "report / traceback")
    lines = err.splitlines()
    assert lines[:4] == [f"Error: bad key {visible(evil)}", f"try {visible(evil)}",
                         f"Internal error: RuntimeError: {visible(evil)}",
                         "This is a bug in textinv; rerun with TEXTINV_DEBUG=1 for the traceback and report it."]
    assert lines[4] == "Traceback (most recent call last):" and lines[-1] == f"ValueError: {visible(evil)}"

    with time_bound(10):  # an unexpected error quoting a 100 KB key: redacted in linear time, cut
        assert report(RuntimeError("a." * 50_000 + "\x1b[2J")) == 1
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("Internal error: RuntimeError: a.a.") and len(first) < 2100
    assert first.endswith("(100037 characters; the rest is not shown)")  # its prefix and the escaped ESC count too

    install()
    record = logging.getLogRecordFactory()("x", logging.WARNING, __file__, 1, "file %s", (evil,), None)
    assert record.getMessage() == f"file {visible(evil)}"  # one record, one line
    shown = warnings.formatwarning(f"file {evil}", UserWarning, "f.py", 3)
    assert_terminal_safe(shown, "a warning")
    assert visible(evil) in shown


# -- the commands ----------------------------------------------------------------------------------

@_CLI
@given(meta=st.dictionaries(hostile(4), hostile(4), min_size=1, max_size=3))
def test_inspect_shows_hostile_metadata_escaped_and_json_round_trips_it(tmp_path, meta):
    path = tmp_path / "meta.safetensors"
    path.write_bytes(safetensors_bytes({"<cat-toy>": _VEC}, meta))
    js = invoke("inspect", path, "--json")
    assert js.exit_code == 0, js.output
    assert js.stdout.isascii()  # every control, bidi and non-ASCII character as a \u escape
    report = json.loads(js.stdout)
    assert {k: report["metadata"][k] for k in meta} == meta  # exactly the file's strings

    human = invoke("inspect", path)
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert len(lines) == 10 + len(report["metadata"])  # no forged line, none swallowed
    for k, v in meta.items():  # literal (no markup, no emoji applied); long ones cut
        assert f"    {visible(k, 80)}: {visible(v, 240)}" in lines


@_CLI
@given(token=hostile(4))
@example(token="[bold]x:warning:")  # what a reader and the registry accept: markup, shown as typed
@example(token="x\x1b]52;c;SGVsbG8=\x07\u202e\r\nFAKE")
def test_a_hostile_token_is_shown_escaped_or_refused_in_one_line(tmp_path, token):
    path = tmp_path / "tok.safetensors"
    path.write_bytes(safetensors_bytes({f"<{token}>": _VEC}, {"note": token}))
    js = invoke("inspect", path, "--json")
    human = invoke("inspect", path)
    if js.exit_code:  # a reader may refuse such a token: then one clean message
        assert_one_line_error(js)
        assert_one_line_error(human)
        return
    assert js.stdout.isascii() and json.loads(js.stdout)["token"] == f"<{token}>"
    assert f"  token       <{visible(token)}>" in human.stdout.splitlines()
    conv = invoke("convert", path, "--to", "kohya", "-o", tmp_path / "out.safetensors", "--force")
    if conv.exit_code == 0:
        assert f"<{visible(token)}>" in conv.stdout
    else:
        assert_one_line_error(conv)
    imp = invoke("import", path, "--name", "plain-name")
    assert imp.exit_code in (0, 1), imp.output  # registration refuses control characters: one clean message
    if imp.exit_code:
        assert_one_line_error(imp)


@_CLI
@given(a=hostile(4), b=hostile(4), long=st.sampled_from([0, 0, 300, 20_000]))
def test_an_error_quoting_two_hostile_keys_is_two_short_clean_lines(tmp_path, a, b, long):
    """An ambiguous file: the message lists its keys, the hint suggests --key. A key of 40 KB is
    quoted cut short (and redacting the message stays fast: see the linear redact test)."""
    a += "a." * long
    if a == b:
        b += "2"
    path = tmp_path / "two.safetensors"
    path.write_bytes(safetensors_bytes({a: _VEC, b: _VEC}))
    for args in (("inspect", path), ("inspect", path, "--json"),
                 ("convert", path, "--to", "kohya", "-o", tmp_path / "o.safetensors", "--force"),
                 ("import", path)):
        with time_bound(10):
            r = invoke(*args)
        assert_one_line_error(r)
        assert max(map(len, r.stderr.splitlines())) < 400 + len(str(path)), r.stderr[:1000]


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=hostile(3), token=hostile(3), meta=st.dictionaries(hostile(3), hostile(3), max_size=2))
def test_list_inspect_and_rm_of_a_tampered_registry_row(tmp_path, monkeypatch, name, token, meta):
    """A registry row holding what registration refuses (a tampered registry.db): every command
    that shows it prints it escaped, --json stays ASCII JSON, each error is one clean message."""
    import tempfile

    from textinv_cli.registry.store import Registry

    monkeypatch.setenv("TEXTINV_HOME", tempfile.mkdtemp(dir=tmp_path))  # a fresh registry per example
    reg = Registry()
    reg.add(random_embedding("<row-toy>"), source="imported", origin={}, name="row-toy")
    with sqlite3.connect(reg.db_path) as db:
        db.execute("UPDATE embeddings SET name=?, token=?, meta=? WHERE name='row-toy'", (name, token, json.dumps(meta)))
    db.close()
    for args in (("list",), ("list", "--repair"), ("inspect", name), ("rm", name)):
        r = invoke(*args)
        assert r.exit_code in (0, 1), r.output
        if r.exit_code:
            assert_one_line_error(r)
    js = invoke("list", "--json")
    assert js.exit_code in (0, 1), js.output
    if js.exit_code == 0:
        assert js.stdout.isascii()
        json.loads(js.stdout)


def test_hostile_hub_file_names_are_shown_escaped(hub):
    from textinv_cli.formats import layouts
    from textinv_cli.formats.pickle_writer import dump_torch_pickle

    @settings(max_examples=4, deadline=None, derandomize=True, database=None)
    @given(st.lists(hostile(3, tuple(p for p in HOSTILE_PIECES if "/" not in p and p not in ("\x00", "\n", "\r\n"))),
                    min_size=1, max_size=2, unique=True))
    @example(["[bold]", "[red on white]x"])  # names the listing keeps: must print as typed
    @example(["\x1b]52;c;SGVsbG8=\x07", "\u202e"])
    def check(names):
        seen.append(names)
        repo = f"me/hostile-{len(seen)}"
        files = {"good-toy.pt": dump_torch_pickle(layouts.a1111_dict(random_embedding("<good-toy>")))}
        files.update({f"x{n}.pt": dump_torch_pickle(layouts.a1111_dict(random_embedding("<other-toy>", seed=i + 1)))
                      for i, n in enumerate(names)})
        hub.seed(repo, files)
        r = invoke("pull", repo)  # several embeddings: the message lists them, escaped
        if r.exit_code == 0:  # the listing may skip names it refuses: then only good.pt was taken
            assert "good-toy" in r.stdout
            return
        assert_one_line_error(r)
        for n in names:
            if RAW.search(n) is None and ":" not in n:  # a name the listing keeps (it skips the others)
                assert visible(f"x{n}.pt") in r.stderr

    seen: list = []
    check()


def test_every_corpus_input_prints_clean_and_quickly():
    """Each input that ever broke a reader, through `inspect` and `inspect --json`: whatever a
    reader says about it reaches the terminal escaped, in one line, in bounded time (a message
    quoting a 100 KB key once took 30 s in redact)."""
    names = sorted(corpus_cases())
    assert any("redact" in n for n in names), "the ReDoS input belongs in the corpus"
    for name in names:
        for args in (("inspect", CORPUS / name), ("inspect", CORPUS / name, "--json")):
            with time_bound(10):
                r = invoke(*args)
            if r.exit_code:
                assert_one_line_error(r)
            elif "--json" in args:
                assert r.stdout.isascii()
                json.loads(r.stdout)


def _save_corpus_cases() -> None:  # pragma: no cover - run once by hand: the files are committed
    from tests.support.fuzz_cases import save_to_corpus

    meta = {"k\x1b[31m": "v\x1b]8;;http://x\x07y\nforged", "[link=file:///etc]a[/link]": "\u2066z\r"}
    token = "<x\x1b]52;c;SGVsbG8=\x07\u202e[bold]y[/]\x9b31m\r\nFAKE LINE>"
    save_to_corpus(safetensors_bytes({token: _VEC}, meta), "safetensors", "terminal-escapes-in-token-and-metadata",
                   ".safetensors", expect="ok", found="test_terminal_output (issue 11, class 6)")
    save_to_corpus(safetensors_bytes({token: _VEC, token + "2": _VEC}), "safetensors",
                   "two-keys-with-terminal-escapes", ".safetensors", expect="AmbiguousEmbeddingError",
                   mentions="candidate", found="test_terminal_output (issue 11, class 6)")
    save_to_corpus(safetensors_bytes({"a." * 40_000: _VEC, "b": _VEC}), "safetensors",
                   "80KB-dotted-key-quoted-redact-quadratic", ".safetensors", expect="AmbiguousEmbeddingError",
                   mentions="candidate", found="test_terminal_output (issue 11, class 3)")
