"""Finding registered embeddings in prompts (pure Python: no torch, no registry on disk)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from textinv_cli.errors import TextinvError
from textinv_cli.engine.prompt_tokens import (bracket_words, check_families, embeddings_in_prompt,
                                       family_mismatch_error, find_tokens)


@dataclass
class E:  # the fields of registry.Entry that prompt matching reads
    name: str
    token: str
    family: str = "sd1"


CAT = E("cat-toy", "<cat-toy>")
STYLE = E("watercolor", "<watercolor-style>")
CHART = E("charturner", "charturner")
XL = E("xl-thing", "<xl-thing>", "sdxl")
ENTRIES = [CAT, STYLE, CHART, XL]


def names(entries):
    return [e.name for e in entries]


@pytest.mark.parametrize("prompt", [
    "A <cat-toy> backpack", "A <cat-toy>, backpack", "<cat-toy>", "(<cat-toy>:1.2) on a table",
    "a photo of<cat-toy>", "<cat-toy>s everywhere",  # brackets delimit the token themselves
])
def test_bracket_token_is_found_wherever_its_brackets_are(prompt):
    assert names(embeddings_in_prompt(prompt, "", ENTRIES)) == ["cat-toy"]


@pytest.mark.parametrize("prompt, found", [
    ("charturner, a woman in a red coat", ["charturner"]),
    ("a charturner sheet", ["charturner"]),
    ("(charturner:1.1)", ["charturner"]),
    ("charturner-style sheet", ["charturner"]),
    ("charturnerv2, a woman", []),        # a longer word, not the token
    ("mycharturner", []),
    ("charturner_2", []),                 # underscore is a word character
    ("Charturner", []),                   # case-sensitive, as the tokenizer's added tokens are
])
def test_plain_word_token_only_as_a_whole_word(prompt, found):
    assert names(embeddings_in_prompt(prompt, "", ENTRIES)) == found


def test_several_tokens_in_order_of_appearance_each_once():
    got = embeddings_in_prompt("<watercolor-style> painting of <cat-toy>, charturner, <cat-toy> again", "", ENTRIES)
    assert names(got) == ["watercolor", "cat-toy", "charturner"]


def test_negative_prompt_tokens_are_loaded_too():
    got = embeddings_in_prompt("A backpack", "<watercolor-style>, charturner", ENTRIES)
    assert names(got) == ["watercolor", "charturner"]
    both = embeddings_in_prompt("A <cat-toy>", "<cat-toy>, blurry", ENTRIES)
    assert names(both) == ["cat-toy"]


def test_no_tokens_no_embeddings():
    assert embeddings_in_prompt("a photo of a dog", "blurry", ENTRIES) == []
    assert embeddings_in_prompt("a photo of a dog", "", []) == []


def test_unknown_bracket_token_lists_close_names():
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-tyo> backpack", "", ENTRIES)
    assert err.value.message == "Unknown embedding <cat-tyo> in the prompt."
    assert "<cat-toy>" in err.value.hint
    assert "textinv list" in err.value.hint and "textinv import" in err.value.hint


def test_unknown_token_in_negative_prompt_and_empty_registry():
    with pytest.raises(TextinvError, match="Unknown embedding <bad-hands>"):
        embeddings_in_prompt("a dog", "<bad-hands>", ENTRIES)
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-toy>", "", [])
    assert "registry is empty" in err.value.hint


def test_unknown_token_suggests_by_name_too():
    entries = [E("cat-toy", "cat-toy-token")]
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-toy> backpack", "", entries)
    assert "cat-toy-token" in err.value.hint  # typed <name>: the real token is suggested


def test_not_every_angle_bracket_is_a_token():
    # "<3" has no closing bracket before a space; <lora:x:0.8> is A1111's extra-network syntax
    assert bracket_words("I <3 cats, <lora:add-detail:0.8>, a < b > c") == []
    assert embeddings_in_prompt("I <3 <cat-toy>", "", ENTRIES) == [CAT]


def test_longest_token_wins_where_tokens_overlap():
    short, long = E("cat", "cat"), E("cat-toy-word", "cat-toy")
    assert [m.token for m in find_tokens("a cat-toy and a cat", ["cat", "cat-toy"])] == ["cat-toy", "cat"]
    assert names(embeddings_in_prompt("a cat-toy", "", [short, long])) == ["cat-toy-word"]


def test_a_token_shared_by_two_entries_is_an_error_naming_both():
    a, b = E("cat-toy", "<cat-toy>"), E("cat-toy-v2", "<cat-toy>")
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-toy>", "", [a, b])
    assert "cat-toy, cat-toy-v2" in err.value.message


def test_family_mismatch_names_both_families():
    sd2 = E("wide", "<wide>", "sd2")
    with pytest.raises(TextinvError) as err:
        check_families([CAT, sd2], "tiny-sd1", "sd1")
    assert err.value.message == "<wide> is a Stable Diffusion 2.x embedding but tiny-sd1 is Stable Diffusion 1.x."
    assert "--model" in err.value.hint
    check_families([CAT], "tiny-sd1", "sd1")  # same family: fine
    check_families([sd2, XL], "owner/model", None)  # unknown here (Hub id): the backend checks
    msg = family_mismatch_error("<x>", "sdxl", "m", "sd2", "its vectors are clip_l 768, clip_g 1280 wide").message
    assert msg.startswith("<x> is a Stable Diffusion XL embedding but m is Stable Diffusion 2.x.") and "1280" in msg


def test_module_imports_without_torch_or_numpy():
    code = ("import sys, textinv_cli.engine.prompt_tokens; "
            "bad = [m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
