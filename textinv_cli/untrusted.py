"""Text that came from a file or the network, made safe to print and to quote.

A token, a metadata key, a pickle's global name, a zip member or a Hub file name is chosen by
whoever made the file. Printed raw, ESC/OSC sequences drive the terminal (OSC 52 writes the
clipboard), a newline forges an output line, bidi overrides reorder what the reader sees,
a lone surrogate crashes the encoder, and a 100 KB key floods the screen. So:

    escape_lines(text)    escape() line by line, the line breaks kept (tracebacks, child output)
    escape(text)          every control, format (bidi, zero-width), separator and surrogate
                          character as a visible escape (\\x1b, \\u202e, \\ud800); the rest as is
    shown(text, limit)    escape() and cut to `limit` characters: for quoting inside a message
    unsafe_chars(text)    the characters escape() would change (names refuse any of them)

All three are linear in the length of the text (one character class, no backtracking).
app.report() escapes every message and hint it prints, so a quote that was not made with
shown() still cannot reach the terminal raw; shown() is what keeps it short.
"""

from __future__ import annotations

import re

QUOTE_LIMIT = 80  # characters of an attacker's string quoted in one message

# C0 and C1 controls, DEL, soft hyphen, Arabic/Syriac format marks, Mongolian vowel separator,
# zero-width and bidi marks/embeddings/overrides/isolates, line/paragraph separators, word
# joiner and invisible operators, BOM, interlinear annotations, tag characters, and lone
# surrogates (which only reach a str through errors="surrogateescape" or JSON "\\ud800").
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]")


def _visible(m: re.Match) -> str:
    code = ord(m.group())
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text) -> str:
    """`text` with every character that could act on a terminal made visible."""
    return _UNSAFE.sub(_visible, str(text))


def escape_lines(text) -> str:
    """escape() each line of `text`, keeping its line breaks: for what is multi-line by nature
    (a traceback, a formatted warning, a child process's output)."""
    return "\n".join(escape(line) for line in str(text).split("\n"))


def shown(text, limit: int = QUOTE_LIMIT) -> str:
    """escape(text), cut to `limit` characters with "..." and the full length when longer.

    Cut before escaping (bounded work on huge input), then again after (escapes are longer).
    """
    text = str(text)
    n = len(text)
    out = escape(text[: limit + 1])
    if n > limit or len(out) > limit:
        out = out[:limit] + f"...({n} chars)"
    return out


def quoted(text, limit: int = QUOTE_LIMIT) -> str:
    """shown() in single quotes: how messages name an attacker's string."""
    return "'" + shown(text, limit) + "'"


def unsafe_chars(text: str) -> list[str]:
    """The characters of `text` that escape() would rewrite, escaped, first 5 distinct."""
    seen: list[str] = []
    for m in _UNSAFE.finditer(text):
        v = _visible(m)
        if v not in seen:
            seen.append(v)
            if len(seen) == 5:
                break
    return seen
