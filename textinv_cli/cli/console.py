"""Output helpers shared by the commands: rich for people, JSON for programs.

Human output shows text we do not control (tokens, metadata keys and values, pickle global
names, zip members, Hub file names, registry names), so the consoles themselves make it safe;
no command has to remember to:

- nothing is markup or emoji unless a call asks for it (`markup=True`): a token such as
  "[link=file:///etc]x[/link]", "[/]" or ":warning:" prints as typed;
- every string and Text rendered has its control, bidi, format and separator characters
  made visible (untrusted.escape: \\x1b, \\u202e), the newline included, before rich lays it
  out: one printed string is one line, so a name cannot forge an output line;
- last, whatever segment reaches the file (from any renderable, rich's own included) is
  escaped again except for its newlines (rich's line breaks); only rich's control segments
  (cursor moves of a progress bar) and the styles rich renders itself pass as they are.

Rich measures a Text object itself, before it is escaped: a Text holding such text may be
cut short in a table column (never shown raw). Pass str, or escape() it first, for layout.

Rich alone is not enough: Text drops BEL/BS/VT/FF/CR silently but passes ESC, OSC, C1
(\\x9b is CSI on many terminals) and bidi overrides through. A multi-line message is
printed one line at a time (each line is its own print). --json output never comes
through here: json.dumps escapes every control and non-ASCII character (ensure_ascii).
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.segment import Segment
from rich.text import Span, Text

from ..untrusted import escape, escape_lines


def escaped_text(text: Text) -> Text:
    """A copy of `text` with its plain text escaped (newlines too) and its styles kept in place."""
    plain = text.plain
    out = escape(plain)
    if out == plain:
        return text
    # escape() maps each character on its own, so a span boundary b moves to len(escape(plain[:b])):
    # computed boundary to boundary, in one pass over the text
    moved, done, at = {0: 0}, 0, 0
    for b in sorted({min(max(o, 0), len(plain)) for s in text.spans for o in (s.start, s.end)}):
        done += len(escape(plain[at:b]))
        moved[b], at = done, b
    copy = text.blank_copy(out)
    clamp = lambda o: moved[min(max(o, 0), len(plain))]  # noqa: E731
    copy.spans = [Span(clamp(s.start), clamp(s.end), s.style) for s in text.spans]
    return copy


class SafeConsole(Console):
    """A rich Console that never lets a character act on the terminal (see the module doc)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs) -> Text:
        # before rich makes it a Text: Text() would drop CR/BS silently (no trace for the reader)
        return super().render_str(escape(text), **kwargs)

    def render(self, renderable, options=None):
        if isinstance(renderable, Text):
            renderable = escaped_text(renderable)
        return super().render(renderable, options)

    def _render_buffer(self, buffer):
        # The net under everything: a segment's own text, escaped line by line. Rich's control
        # segments are its cursor moves; styles are applied after this, by rich.
        return super()._render_buffer(_escaped_segments(buffer))


def _escaped_segments(buffer):
    for segment in buffer:
        text, style, control = segment
        if control or not text:
            yield segment
            continue
        shown = escape_lines(text)
        yield segment if shown == text else Segment(shown, style, control)


# Piped output is read by programs and people alike: don't squeeze tables into 80 columns.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = SafeConsole(soft_wrap=True, width=_WIDTH)
err_console = SafeConsole(stderr=True, soft_wrap=True)


def print_json(obj) -> None:
    """One JSON document on stdout (plain print: rich would re-wrap it). ensure_ascii (the
    default) writes every control, bidi and non-ASCII character as a \\u escape."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str, ensure_ascii=True) + "\n")


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null: its reader left (a closed pipe), and what
    is still buffered or printed later must go nowhere instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no descriptor (a test's captured stream), or already closed
        pass


def print_json_line(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str, ensure_ascii=True) + "\n")
    sys.stdout.flush()
