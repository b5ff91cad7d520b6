"""The model card quotes the token for each language it lands in.

A crafted token closed the Python string in the card's snippet (running `__import__("os")`),
expanded in the bash snippet, and broke out of the markdown code spans into raw HTML. For random
tokens built from the characters that do that, the card must read back the same in every
language: the YAML front matter gives the token, the Python snippet parses to the same program
as for a plain token with the token only inside string constants, the bash line is one word that
no shell expands, and the rendered markdown has exactly the elements of a plain token's card.
A token no quoting can make safe is refused before the card (and so any upload) exists.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections import Counter

import pytest
import yaml
from hypothesis import given, note, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from tests.support.helpers import random_embedding
from textinv_cli.errors import TextinvError
from textinv_cli.hub.model_card import _diffusers_usage, _textinv_usage, render_card
from textinv_cli.registry.store import Entry
from textinv_cli.untrusted import unsafe_chars

PLAIN = "<cat-toy>"
FRAGMENTS = ["cat", "toy", "-", " ", "'", '"', "\\", "`", "```", '"""', "$", "$(id)", "(", ")", ";", "|", "*", "_",
             "[x](javascript:alert(1))", "<script>", "<img src=x onerror=alert(1)>", "&amp;", "#", "{", "}", "~",
             "\n", "\r", "\x1b[31m", "\u202e", "é", "漢", "😀", "!", "%s", "{0}", "\\n", "\t", "\x00"]
TOKENS = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join) \
    | st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map(lambda p: "<" + "".join(p) + ">")
MD = MarkdownIt("commonmark").enable("table")  # html on, as the Hub renders raw HTML in cards


def _block(lines: list[str] | str, lang: str) -> str:
    text = lines if isinstance(lines, str) else "\n".join(lines)
    (body,) = re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)
    return body


def _program(source: str, token: str) -> str:
    """The parsed program with the string constants that are the token (or the prompt around it)
    replaced by a placeholder: equal for two tokens iff each sits whole inside one string literal."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in (token, "a photo of " + token):
            node.value = "TOKEN" if node.value == token else "a photo of TOKEN"
    return ast.dump(tree)


def _unexpanded(line: str) -> bool:
    """No `$` or backtick outside single quotes: a shell would expand nothing in `line`."""
    quote, escaped = None, False
    for c in line:
        if escaped:
            escaped = False
        elif quote == "'":
            quote = None if c == "'" else quote
        elif c == "\\":
            escaped = True
        elif c in "$`":
            return False
        elif c in "'\"":
            quote = None if quote == c else c if quote is None else quote
    return quote is None


def _check_snippets(token: str, family: str) -> None:
    py = _block(_diffusers_usage("me/cat-toy", family, token, None), "python")
    assert _program(py, token) == _program(_block(_diffusers_usage("me/cat-toy", family, PLAIN, None), "python"),
                                           PLAIN)
    constants = [n.value for n in ast.walk(ast.parse(py)) if isinstance(n, ast.Constant) and token in str(n.value)]
    assert "a photo of " + token in constants
    if unsafe_chars(token):  # a line break cannot stay on one shell line; the card refuses these tokens
        return
    (sample,) = [x for x in _block(_textinv_usage("me/cat-toy", token), "bash").splitlines() if "sample" in x]
    assert shlex.split(sample) == ["textinv", "sample", "a photo of " + token] and _unexpanded(sample)


@settings(max_examples=150, deadline=None)
@given(token=TOKENS, family=st.sampled_from(["sd1", "sdxl"]))
def test_snippets_quote_any_token(token, family):
    _check_snippets(token, family)


def _card(token: str, family: str) -> str:
    emb = random_embedding(token, family=family, n=1)
    entry = Entry(name="x", token=token, family=family, n_vectors=1, widths=emb.widths, sha256="0" * 64,
                  source="imported", origin={}, meta={}, tags=[], created="2024-01-01T00:00:00Z")
    files = {"learned_embeds.safetensors": b"x", "x.pt": b"y"}
    return render_card(entry, emb, repo_id="me/cat-toy", files=files, license="mit")


def _tags(html: str) -> Counter:
    return Counter(re.findall(r"<(/?[A-Za-z][A-Za-z0-9]*)", html))


@settings(max_examples=150, deadline=None)
@given(token=TOKENS, family=st.sampled_from(["sd1", "sdxl"]))
def test_the_card_reads_back_the_token_in_every_language(token, family):
    try:
        card = _card(token, family)
    except TextinvError as e:  # refused: only a token that cannot be a file name or holds unsafe characters
        note(f"refused: {e.message}")
        from textinv_cli.embedding import safe_name

        if not unsafe_chars(token):
            with pytest.raises(TextinvError):
                safe_name(token)
        return
    plain = _card(PLAIN, family)
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]  # the Hub renders the body only
    assert yaml.safe_load(front) == {**yaml.safe_load(plain.split("---\n")[1]), "instance_prompt": token}
    assert _program(_block(card, "python"), token) == _program(_block(plain, "python"), PLAIN)
    (sample,) = [x for x in _block(card, "bash").splitlines() if "sample" in x]
    assert shlex.split(sample) == ["textinv", "sample", "a photo of " + token] and _unexpanded(sample)
    fences = re.compile(r"^ {0,3}(`{3,}|~{3,})", re.M)  # CommonMark: what opens or closes a code block
    assert len(fences.findall(card)) == len(fences.findall(plain))
    html, plain_html = MD.render(body), MD.render(plain.split("---\n", 2)[2])
    assert _tags(html) == _tags(plain_html)  # no element the token brought in: no <script>, <img>, <a>
    from markdown_it.common.utils import escapeHtml

    assert f"<code>{escapeHtml(token)}</code>" in html  # shown literally, as typed


def test_tokens_with_control_characters_are_refused_before_the_card():
    for token in ("<a\nb>", "<cat\x1b]52;c;x\x07>", "<cat\u202etxt>", "cat\r"):
        with pytest.raises(TextinvError) as err:
            _card(token, "sd1")
        assert "nothing was pushed" in err.value.message or "cannot be used" in err.value.message
