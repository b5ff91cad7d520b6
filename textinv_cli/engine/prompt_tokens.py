"""Which registered embeddings a prompt uses: whole-token matching, unknown `<tokens>`, families.

Pure Python (no numpy, no torch) so `textinv sample` can refuse a mistyped token or a
wrong model family before any backend or model is loaded.

Matching rules (what users of A1111 and diffusers expect):
- A token is matched as a whole token. An edge of the token that is a word character must
  sit at a word boundary in the prompt, so the plain-word token `charturner` matches in
  "charturner, a woman" but not inside "charturnerv2". An edge that is punctuation (the
  brackets of `<cat-toy>`) delimits itself, so `<cat-toy>` matches in "A <cat-toy>, backpack"
  and "<cat-toy>s" alike, just as the tokenizer splits an added token out of any text.
- Where registered tokens overlap, the longest one at a position wins ("cat-toy" over "cat"),
  as the tokenizer's added-token trie does; the shorter one is not loaded for that span.
- Any other `<word>` in the prompt is taken for an embedding the user expects to be there
  and is an error listing close registry names. A1111's extra-network syntax (`<lora:x:0.8>`)
  contains a colon and is not an embedding token, so it is not flagged.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import TextinvError
from ..families import FAMILY_NAMES

# Angle-bracket words: "<cat-toy>", not "<3 hearts" (space) nor "<lora:x:1>" (colon, see above).
_BRACKET_WORD = re.compile(r"<[^<>\s:]+>")



@dataclass(frozen=True)
class Match:
    token: str
    start: int
    end: int


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def find_tokens(text: str, tokens) -> list[Match]:
    """Whole-token occurrences of `tokens` in `text`, left to right, longest first, no overlaps."""
    found: list[Match] = []
    for token in {t for t in tokens if t}:
        start = text.find(token)
        while start != -1:
            end = start + len(token)
            left_ok = not _is_word(token[0]) or start == 0 or not _is_word(text[start - 1])
            right_ok = not _is_word(token[-1]) or end == len(text) or not _is_word(text[end])
            if left_ok and right_ok:
                found.append(Match(token, start, end))
            start = text.find(token, start + 1)
    found.sort(key=lambda m: (m.start, -(m.end - m.start)))
    chosen: list[Match] = []
    for m in found:
        if not chosen or m.start >= chosen[-1].end:
            chosen.append(m)
    return chosen


def bracket_words(text: str) -> list[str]:
    """Every `<word>` in the text, in order, without duplicates."""
    seen: list[str] = []
    for w in _BRACKET_WORD.findall(text):
        if w not in seen:
            seen.append(w)
    return seen


def close_names(word: str, entries, n: int = 5) -> list[str]:
    """Registry tokens whose token or name looks like `word` (a typo), best first."""
    # Compared against tokens and names, always suggested as the token: that is what goes
    # in a prompt ("<cat-toy>" typed for a registry name cat-toy whose token differs).
    keys: dict[str, str] = {}
    for e in entries:
        keys.setdefault(e.token, e.token)
        keys.setdefault(e.name, e.token)
        keys.setdefault(f"<{e.name}>", e.token)
    out: list[str] = []
    for key in difflib.get_close_matches(word, list(keys), n=n * 2, cutoff=0.6):
        shown = keys[key]
        if shown not in out:
            out.append(shown)
    return out[:n]


def unknown_token_error(word: str, entries) -> TextinvError:
    close = close_names(word, entries)
    if close:
        hint = f"Did you mean: {', '.join(close)}? "
    elif entries:
        hint = "No registered embedding looks like it. "
    else:
        hint = "The registry is empty. "
    hint += "See `textinv list` for what is registered; add one with `textinv import FILE` (or pull/train)."
    return TextinvError(f"Unknown embedding {word} in the prompt.", hint)


def embeddings_in_prompt(prompt: str, negative: str, entries) -> list:
    """The registry entries whose tokens appear in the prompt or the negative prompt.

    In order of first appearance (prompt, then negative), each once. Raises TextinvError
    for an unknown `<token>` and for a token that several entries share (the prompt cannot
    say which one is meant).
    """
    by_token: dict[str, list] = {}
    for e in entries:
        by_token.setdefault(e.token, []).append(e)
    used: list = []
    for text in (prompt, negative or ""):
        for m in find_tokens(text, by_token):
            hits = by_token[m.token]
            if len(hits) > 1:
                raise TextinvError(
                    f"Several registered embeddings use the token {m.token}: "
                    + ", ".join(e.name for e in hits) + ".",
                    "Keep one (`textinv rm NAME`), or import the other under a new token with --token.")
            if hits[0] not in used:
                used.append(hits[0])
        for word in bracket_words(text):
            if word not in by_token:
                raise unknown_token_error(word, entries)
    return used


def family_mismatch_error(token: str, emb_family: str, model_name: str, model_family: str,
                          detail: str = "") -> TextinvError:
    """`<x> is a Stable Diffusion 2.x embedding but tiny-sd1 is Stable Diffusion 1.x.`"""
    emb = FAMILY_NAMES.get(emb_family, emb_family)
    model = FAMILY_NAMES.get(model_family, model_family)
    message = f"{token} is a {emb} embedding but {model_name} is {model}."
    if detail:
        message += f" ({detail})"
    hint = f"Pass --model with a {emb} model, or leave {token} out of the prompt."
    return TextinvError(message, hint)


def check_families(entries, model_name: str, model_family: str | None) -> None:
    """Refuse an embedding made for another model family; nothing to check when unknown."""
    if model_family is None:
        return  # a Hub id: the backend compares widths once the model is loaded
    for e in entries:
        if e.family != model_family:
            raise family_mismatch_error(e.token, e.family, model_name, model_family)
