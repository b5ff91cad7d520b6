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
- Several entries may share a token (versions, registry/versions.py): a token means its
  active entry, or the one `--use NAME` names for this run.
- A registry *name* typed as a whole word (`a photo of cat-toy-v3`) loads that entry, as A1111
  loads an embedding by its name, under the name itself as its token, and says so on
  stderr. A name that is an ordinary word (`gray`, `watercolor`: is_ordinary_word) stays a
  word, with a note saying how to use the embedding: swapping every "gray" of every prompt is
  what nobody wants (the same reason import refuses such a token).
"""

from __future__ import annotations

import difflib
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache

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
    named = next((e for e in entries if e.name == word.strip("<>")), None)
    close = close_names(word, entries)
    if named is not None:  # <cat-toy-v2>: a name in brackets
        return TextinvError(f"Unknown embedding {word} in the prompt.",
                            f"{named.name} is a registry name ({named.token}): write {named.name} without brackets, "
                            f"or {named.token} with --use {shlex.quote(named.name)}.")
    if close:
        hint = f"Did you mean: {', '.join(close)}? "
    elif entries:
        hint = "No registered embedding looks like it. "
    else:
        hint = "The registry is empty. "
    hint += "See `textinv list` for what is registered; add one with `textinv import FILE` (or pull/train)."
    return TextinvError(f"Unknown embedding {word} in the prompt.", hint)


@dataclass
class Used:
    entry: object            # registry Entry
    token: str               # what the prompt holds for it: the entry's token, or its name


@dataclass
class PromptEmbeddings:
    used: list = field(default_factory=list)     # [Used], in order of first appearance
    notes: list = field(default_factory=list)    # one line each, for stderr


def is_ordinary_word(text: str) -> bool:
    """Whether `text` is a plain word of CLIP's vocabulary (one token, e.g. "cat", "gray"), as
    far as textinv can tell without a model: the built-in tokenizer's words (models/tiny_tokenizer,
    real CLIP BPE, the common subjects, colours and prompt words) and single characters. A
    model's full vocabulary is checked when the model is loaded (train, sample)."""
    word = text.strip().lower()
    return len(word) <= 1 or word in _vocabulary()


def refuse_ordinary_word(token: str, retry, verb: str) -> None:
    """Refuse registering a plain vocabulary word as a token ("cat" would take over that word
    in every prompt; train refuses it too: engine/checks.check_token). `retry(bracketed token)`
    is the command that registers it under a token of its own, for the hint ("Import it ...")."""
    from ..errors import InvalidEmbeddingError
    from ..untrusted import quoted

    if not is_ordinary_word(token):
        return
    word = token.strip()
    raise InvalidEmbeddingError(
        f"The token {quoted(word)} is an ordinary word: every prompt with {quoted(word)} would use this "
        "embedding instead of the word.", f"{verb} it under a token of its own: {retry('<' + word + '>')}")


@lru_cache(maxsize=1)
def _vocabulary() -> frozenset:
    from ..models.tiny_tokenizer import vocabulary_words

    return frozenset(vocabulary_words())


def _active(e) -> bool:
    return getattr(e, "active", True)


def prompt_embeddings(prompt: str, negative: str, entries, use=()) -> PromptEmbeddings:
    """What the prompt and negative prompt use: tokens (each its active entry, or the entry of
    `use`, a list of Entries picked with --use), and registry names typed as words.

    Raises TextinvError for an unknown `<token>`, for two `use` entries of one token, for a
    `use` entry whose token is not in the prompt, and for a token whose entries are all
    inactive (a damaged active row: the prompt cannot say which one)."""
    by_token: dict[str, list] = {}
    for e in entries:
        by_token.setdefault(e.token, []).append(e)
    chosen: dict[str, object] = {}
    for e in use:
        if e.token in chosen and chosen[e.token].name != e.name:
            raise TextinvError(f"--use {e.name} and --use {chosen[e.token].name} are both {e.token}; "
                               "a prompt can use one of them.", "Pass --use once per token.")
        chosen[e.token] = e
    for token, hits in by_token.items():
        if token not in chosen:
            active = [e for e in hits if _active(e)]
            if len(active) == 1 or len(hits) == 1:
                chosen[token] = (active or hits)[0]
    out = PromptEmbeddings()
    names = {e.name: e for e in entries if e.name not in by_token and e.name != e.token
             and not any(c.isspace() for c in e.name)}
    by_name = {n: e for n, e in names.items() if not is_ordinary_word(n)}
    seen_tokens = set()
    for text in (prompt, negative or ""):
        for m in find_tokens(text, set(by_token) | set(by_name)):
            if m.token in by_token:
                seen_tokens.add(m.token)
                entry = chosen.get(m.token)
                if entry is None:
                    raise TextinvError(
                        f"Several registered embeddings use the token {m.token} and none is active: "
                        + ", ".join(e.name for e in by_token[m.token]) + ".",
                        f"Pick one: textinv use {shlex.quote(by_token[m.token][0].name)}")
                used = Used(entry, m.token)
                if is_ordinary_word(m.token):  # registered before import refused such tokens: say so, once
                    note = (f'"{m.token}" in the prompt is the token of the registry entry {entry.name}: the '
                            f"embedding is used instead of the word (`textinv rm {shlex.quote(entry.name)}` "
                            "and import it again with --token '<...>' to free the word).")
                    if note not in out.notes:
                        out.notes.append(note)
            else:
                used = Used(by_name[m.token], m.token)
                note = (f"{m.token} in the prompt is a registry name: it loads that entry ({used.entry.token}), "
                        "as A1111 loads an embedding by its name.")
                if note not in out.notes:
                    out.notes.append(note)
            if not any(u.entry is used.entry and u.token == used.token for u in out.used):
                out.used.append(used)
        for word in bracket_words(text):
            if word not in by_token:
                raise unknown_token_error(word, entries)
        for name in names.keys() - by_name.keys():
            if find_tokens(text, [name]):
                e = names[name]
                note = (f'"{name}" in the prompt is an ordinary word and stays one; the registry entry {name} '
                        f"is typed {e.token}" + ("" if _active(e) else f" (with --use {shlex.quote(name)})") + ".")
                if note not in out.notes:
                    out.notes.append(note)
    for e in use:
        if e.token not in seen_tokens:
            raise TextinvError(f"--use {e.name} is for {e.token}, which the prompt does not hold.",
                               f'Write {e.token} in the prompt, e.g. textinv sample "a photo of {e.token}" '
                               f"--use {shlex.quote(e.name)}")
    return out


def embeddings_in_prompt(prompt: str, negative: str, entries, use=()) -> list:
    """The registry entries the prompt and the negative prompt use (prompt_embeddings), each once."""
    out: list = []
    for u in prompt_embeddings(prompt, negative, entries, use).used:
        if u.entry not in out:
            out.append(u.entry)
    return out


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
    from ..models.resolve import base_model_hint

    for e in entries:
        if e.family != model_family:
            error = family_mismatch_error(e.token, e.family, model_name, model_family)
            error.hint = base_model_hint(getattr(e, "meta", None) or {}, e.family) or error.hint
            raise error
