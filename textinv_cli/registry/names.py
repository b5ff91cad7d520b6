"""What may be registered, and how a registered name is shown and typed back.

A name and a token come from a file (an A1111 `name`, a token_identifier.txt, a safetensors
key) or from the Hub. They go on to become file names (convert, push), shell words and Python
strings (the model card), prompt words, and text on the terminal. So Registry.add applies one
rule to both, before anything is written:
- embedding.safe_name's rule (never ./../empty/a path/control or bidi characters, at most
  200 bytes);
- no lone surrogate (sqlite cannot store one, no terminal can print one) and nothing that
  untrusted.unsafe_chars() flags;
- never an access token: shaped like one, or one of the user's own (embedding.holds_credential).
  Such a value is refused without being quoted; a metadata value like that is dropped instead.

Rows written before these rules, or by hand, can still hold anything: db.decode_row
marks them damaged, and `display_name` / `rm_command` give a form of the name that prints
safely and that `textinv rm` accepts back (Registry._find_row), so such a row can always go.
"""

from __future__ import annotations

import re
import shlex

from ..errors import InvalidEmbeddingError
from ..untrusted import escape, quoted, shown, unsafe_chars

MAX_NAME = 200                  # characters of a name shown uncut (safe_name allows 200 bytes)
MAX_META_VALUE = 64 * 1024      # characters in one metadata value (a row's JSON is capped when read back)
MAX_META_TOTAL = 512 * 1024     # characters of metadata kept per entry
_SURROGATE = re.compile("[\ud800-\udfff]")
TOKEN_HINT = "Pass --token with the word to type in prompts, e.g. --token '<cat-toy>'."
NAME_HINT = "Pass --name with a plain name such as cat-toy."


def is_secret(text: str, known: list[str] | None = None) -> bool:
    """True when `text` holds an access token (embedding.holds_credential: the one rule)."""
    from ..embedding import holds_credential

    return holds_credential(text, known)


def check_name(name: str, *, what: str = "registry name", hint: str = NAME_HINT,
               known: list[str] | None = None) -> str:
    """The registry name for `name` (brackets and spaces stripped), or InvalidEmbeddingError."""
    from ..embedding import safe_name

    if not isinstance(name, str):
        raise InvalidEmbeddingError(f"A {what} must be text.", hint)
    if is_secret(name, known):  # never quoted: it may be the user's real token
        raise InvalidEmbeddingError(f"The {what} looks like an access token; it was not used.", hint)
    bad = unsafe_chars(name)
    if bad:  # safe_name looks inside the brackets and spaces; a token is printed whole ("cat\n")
        raise InvalidEmbeddingError(
            f"{quoted(name)} cannot be used as a {what}: it holds control, invisible or invalid "
            f"characters ({' '.join(bad)}).", hint)
    return safe_name(name, hint)


def check_token(token: str, known: list[str] | None = None) -> str:
    """The token unchanged, when it obeys the registration rule (it is the default name too)."""
    check_name(token, what="token", hint=TOKEN_HINT, known=known)
    return token


MAX_TAG = 100  # characters


def check_tag(tag: str) -> str:
    """A tag as stored: trimmed, one line of visible text, no comma (`list` joins tags with
    commas), never an access token. InvalidEmbeddingError otherwise."""
    hint = "Tags are short words such as toy or style, e.g. textinv tag cat-toy toy."
    text = tag.strip() if isinstance(tag, str) else ""
    if not text or len(text) > MAX_TAG or "," in text:
        raise InvalidEmbeddingError(f"{quoted(tag if isinstance(tag, str) else '')} cannot be a tag: tags are 1 to "
                                    f"{MAX_TAG} characters without commas.", hint)
    if is_secret(text) or unsafe_chars(text) or _SURROGATE.search(text):
        raise InvalidEmbeddingError("A tag holds control, invisible or invalid characters, or looks like an "
                                    "access token; nothing was changed.", hint)
    return text


def clean_meta(meta: dict, known: list[str] | None = None) -> dict:
    """The metadata to store: without values that hold an access token (they would be printed,
    and pushed into public files), without huge values, lone surrogates made U+FFFD."""
    from ..redact import known_tokens

    known = known_tokens() if known is None else known
    out, total = {}, 0
    for k, v in meta.items():
        k, v = _SURROGATE.sub("\ufffd", str(k)), _SURROGATE.sub("\ufffd", str(v))
        if len(v) > MAX_META_VALUE or total + len(k) + len(v) > MAX_META_TOTAL or is_secret(k, known) \
                or is_secret(v, known):
            continue
        out[k] = v
        total += len(k) + len(v)
    return out


def display_name(name: str) -> str:
    """A registered name as printed: escaped, and cut only past MAX_NAME (a real name never is).
    `textinv rm` and every NAME argument accept this form back."""
    return shown(name, MAX_NAME)


def matches_shown(name: str, typed: str) -> bool:
    """Whether `typed` is how `name` is shown: escaped in full, or display_name(). ("" is how a
    NULL name shows: no real name is empty.)"""
    return typed in (escape(name), display_name(name))


def rm_command(name: str) -> str:
    """The exact command that removes the entry `name`, safe to print and to paste into a shell."""
    return f"textinv rm {shlex.quote(display_name(name))}"


def readd_hint(name: str, origin: dict) -> str:
    """What to do about an entry whose stored copy is lost or damaged: remove it, add it again."""
    again = origin.get("path") or origin.get("repo") or origin.get("run") if isinstance(origin, dict) else None
    where = f" (from {shown(again)})" if isinstance(again, str) and again else ""
    return f"Run `{rm_command(name)}`, then add it again{where}."
