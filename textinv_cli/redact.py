"""Keeping access tokens out of everything textinv prints.

A Hugging Face token must never show: not in a message, a hint, a traceback (TEXTINV_DEBUG=1),
a warning or a log line. Errors are rendered in one place (app.report), but a message can quote
text we do not control (a server's error, a URL the user typed, a library's exception), so this
module scrubs at the exits: `redact()` for what we print, `print_traceback()` for TEXTINV_DEBUG=1,
`install()` for what Python prints for us (warnings, log records).

Two nets: the user's actual tokens (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, the `hf auth login` files),
replaced wherever they appear whatever their shape, and anything token-shaped (hf_..., api_org_...,
a Bearer credential, a password in a URL) even if we do not know it is theirs.

No huggingface_hub import here: `textinv convert` and friends must stay light, and the files
are read the way the client reads them (HF_TOKEN_PATH / HF_STORED_TOKENS_PATH / HF_HOME).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

MASK = "hf_***"
_MIN_LITERAL = 8   # shorter values are not real tokens, and masking them would garble ordinary text
# Every pattern here runs on text an attacker chose (a 100 KB safetensors key quoted in a message),
# so each is linear: a match may only start where a failed attempt cannot be retried a character
# later over the same run. _TOKEN_SHAPE and _BEARER are already so (a start needs \b plus a
# literal that ends the run a previous attempt scanned). The URL pattern is split in two, see
# _mask_url_password.
_TOKEN_SHAPE = re.compile(r"\b(?:hf_|api_org_)[A-Za-z0-9]{20,}")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
# A password in a URL: scheme://user:PASSWORD@. Written as one pattern, \b[a-z][a-z0-9+.-]*://
# restarts at every letter of a long scheme-like run ("a.a.a...") and rescans it: quadratic (100 KB:
# 30 s). Here a candidate starts only where a maximal run of scheme characters starts (the
# lookbehind), so each run is scanned once; the userinfo cannot hold "/", so a failed candidate's
# scan ends before the next "://". Whether the run holds a valid scheme start (\b then a letter,
# as the single pattern required) is checked inside the run, once per candidate.
_URL_CANDIDATE = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z0-9+.-]+)(://[^/\s:@]*:)[^/\s@]+@")
_SCHEME_START = re.compile(r"(?i)\b[a-z]")
# A secret in a URL's query (?token=..., &X-Amz-Signature=...), the one rule for which query
# parameters hold credentials (hub/urls.display_url masks the same names in a parsed URL): any
# name holding one of these words. A match starts only at ? or &, and neither the name nor the
# value can hold either, so each character is scanned at most twice. In free text, values under
# 8 characters are left alone (`?key=a` is no credential; masking it would garble ordinary text).
_SECRET_WORDS = re.compile(r"(?i)token|key|secret|pass|pwd|auth|sig|credential|session|jwt|cookie|otp|code")
_QUERY_PARAM = re.compile(r"([?&])([^?&=\s#]*)=([^?&\s#]{8,})")
_STORED_FIELDS = ("hf_token", "refresh_token", "access_token")


def looks_like_token(text: str) -> bool:
    return bool(_TOKEN_SHAPE.fullmatch(text.strip()))


def known_tokens(ask_client: bool = True) -> list[str]:
    """The user's own tokens, longest first (so a token containing another is masked whole).

    `ask_client`: also ask huggingface_hub, when it is loaded anyway (pull/push), which token it
    sends. Not from inside a log call: the client may be logging while it holds its token lock.
    """
    found = {os.environ.get(k, "").strip() for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    found.add(_read_small(_hf_file("HF_TOKEN_PATH", "token")).strip())
    found.update(_stored_tokens())
    hub = sys.modules.get("huggingface_hub") if ask_client else None
    if hub is not None:
        try:
            found.add((hub.get_token() or "").strip())
        except Exception:  # noqa: BLE001 - a broken token store must not break an error message
            pass
    return sorted((t for t in found if len(t) >= _MIN_LITERAL), key=len, reverse=True)


def redact(text, tokens: list[str] | None = None) -> str:
    """`text` with every token (`tokens`, default the user's, or token-shaped) replaced by hf_***."""
    text = str(text)
    for token in known_tokens() if tokens is None else tokens:
        text = text.replace(token, MASK)
    text = _TOKEN_SHAPE.sub(MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + "***", text)
    text = _QUERY_PARAM.sub(_mask_query_value, text)
    return _URL_CANDIDATE.sub(_mask_url_password, text)


def secret_param(name: str) -> bool:
    """Whether a URL query parameter of this name (already unquoted) may hold a credential."""
    return _SECRET_WORDS.search(name) is not None


def _mask_query_value(m: re.Match) -> str:
    return f"{m.group(1)}{m.group(2)}=***" if secret_param(m.group(2)) else m.group(0)


def _mask_url_password(m: re.Match) -> str:
    """scheme://user:*** @ when the run before "://" holds a scheme (a letter after a word boundary:
    `x_y://` has none, `x.y://` has y); what precedes that letter stays as it was either way."""
    if _SCHEME_START.search(m.string, m.start(1), m.end(1)) is None:
        return m.group(0)
    return m.group(1) + m.group(2) + "***@"


def _hf_file(env: str, name: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / name


def _read_small(path: Path) -> str:
    try:
        if path.is_file() and path.stat().st_size <= 64 * 1024:
            return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    return ""


def _stored_tokens() -> set[str]:
    """Every token saved by `hf auth login` (an INI file: one section per saved token)."""
    import configparser

    text = _read_small(_hf_file("HF_STORED_TOKENS_PATH", "stored_tokens"))
    if not text:
        return set()
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        return set()
    return {parser[s].get(f, "").strip() for s in parser.sections() for f in _STORED_FIELDS}


# -- Python's own output ---------------------------------------------------------------------

def print_traceback(exc: BaseException) -> None:
    """The TEXTINV_DEBUG=1 traceback, chained causes included, with tokens masked and every
    control/bidi character escaped: the traceback's own lines stay lines, but an exception's
    message (which may quote a file's key) is one line, its newlines shown as \\x0a."""
    import traceback

    from .untrusted import escape_lines
    from .untrusted import escape

    out = []
    for chunk in traceback.TracebackException(type(exc), exc, exc.__traceback__).format():
        chunk = redact(chunk)
        if chunk.startswith(_TRACEBACK_FRAME):  # the header, a frame, a chain separator: ours
            out.append(escape_lines(chunk))
        else:  # "ValueError: message", a note: the exception's text
            out.append(escape(chunk[:-1] if chunk.endswith("\n") else chunk) + "\n")
    sys.stderr.write("".join(out))
    sys.stderr.flush()


# traceback.TracebackException.format() chunks laid out by Python itself (each holds a newline
# of its own); every other chunk is an exception's message or note
_TRACEBACK_FRAME = ("Traceback (most recent call last):", "  File ", "  [Previous line repeated", "\n")


def install() -> None:
    """Redact and escape what Python prints on textinv's behalf: warnings and log records (the
    client's debug log quotes request URLs, HF_ENDPOINT with its credentials included, and Hub
    file names: a record is escaped whole, newlines too, so it cannot forge another line).

    Called when a command runs (app): it changes process-wide hooks, once; the tokens are looked
    up per record (only records that pass their logger's level are made, so this costs nothing
    unless the user turned logging up).
    """
    import logging
    import warnings

    if getattr(warnings.formatwarning, "_textinv_redacting", False):
        return
    plain_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        from .untrusted import escape_lines
        from .untrusted import escape

        # the message escaped whole (one line); the rest ("file:line: Category: ..." and the
        # source line under it) keeps Python's two-line layout
        message = escape(redact(message))
        return escape_lines(redact(plain_format(message, category, filename, lineno, line)))

    formatwarning._textinv_redacting = True
    warnings.formatwarning = formatwarning
    make_record = logging.getLogRecordFactory()

    def record_factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call: leave it to logging to report
            return record
        from .untrusted import escape

        cleaned = escape(redact(message, known_tokens(ask_client=False)))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record

    logging.setLogRecordFactory(record_factory)
